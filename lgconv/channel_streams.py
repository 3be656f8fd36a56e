"""Channel streams: tensors joined by residual sums and per-channel ops that can all carry their
channels in one grouped conv's output order instead of the masked layer's.

A condensed layer with the interleaved layout emits its channels group by group; putting them back
in order costs a channel shuffle. When its output joins a residual stream (a ResNet stage: every
block's last 1x1, the downsample, the sums, the ReLUs), the whole stream can travel in the grouped
order instead, provided every condensed layer writing into it emits that same order, every plain
conv writing into it can permute its output rows, and every layer reading it can permute its
input columns (a conv, a condensed layer's gather index, a linear head after global pooling).
This module finds such streams; ``lgconv.export`` applies them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from lgconv.layers import Folded, FusedCondensedConv2d

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {torch.relu, nn.functional.relu}
_POOLS = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)


@dataclass(frozen=True)
class Stream:
    """One stream: the condensed layers writing it in ``order`` (``y = z[:, order]``), the plain convs
    writing it (rows to permute), its batch norms (channels to permute) and the layers reading it
    (convs, condensed layers and linear heads whose inputs to permute)."""

    condensed: tuple[str, ...]
    plain: tuple[str, ...]
    norms: tuple[str, ...]
    readers: tuple[str, ...]
    order: Tensor


class _NotAStream(Exception):
    """Some node of the would-be stream cannot carry a permuted channel order."""


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function" and node.target in _RELUS:
        return True
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return True
    return node.op == "call_module" and isinstance(modules[node.target], (nn.ReLU, Folded, nn.Identity))


def _is_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op != "call_module":
        return False
    module = modules[node.target]
    return type(module) is nn.BatchNorm2d and not module.training


def _linear_head(
    node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int], channels: int
) -> str | None:
    """The ``nn.Linear`` over ``channels`` features that ``node`` (a stream reader) reaches through
    global average pooling, flatten and eval dropout, each read once; None otherwise."""
    current, pooled = node, False
    while current.op in ("call_module", "call_method", "call_function"):
        if current.op == "call_module":
            module = modules[current.target]
            if isinstance(module, nn.Linear):
                reads_stream = pooled and module.in_features == channels
                return current.target if reads_stream and calls[current.target] == 1 else None
            if isinstance(module, nn.AdaptiveAvgPool2d):
                pooled = module.output_size in (1, (1, 1))
            elif getattr(module, "pool_type", None) == "avg":
                pooled = True  # timm's SelectAdaptivePool2d with average pooling
            elif not isinstance(module, _POOLS) or (isinstance(module, nn.Dropout) and module.training):
                return None
        elif current.op == "call_method" and current.target == "mean":
            dims = current.args[1] if len(current.args) > 1 else current.kwargs.get("dim")
            pooled = tuple(sorted(dims)) in ((2, 3), (-2, -1)) if isinstance(dims, (tuple, list)) else False
        elif not _flattens(current):
            return None
        if len(current.users) != 1:
            return None
        current = next(iter(current.users))
    return None


def _flattens(node: fx.Node) -> bool:
    """A flatten, view or reshape (after global pooling: each channel stays one feature)."""
    if node.op == "call_method":
        return node.target in ("flatten", "view", "reshape")
    return node.op == "call_function" and node.target is torch.flatten


def find_streams(model: nn.Module, orders: dict[str, Tensor], tracer: fx.Tracer) -> list[Stream]:
    """The streams of ``model`` (traced with ``tracer``) that the condensed layers in ``orders``
    (name -> output order) write, each found once; layers whose stream cannot be permuted are left out."""
    modules = dict(model.named_modules())
    try:
        graph = tracer.trace(model)
    except Exception:  # noqa: BLE001 - untraceable: every order stays a shuffle
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    streams, seen = [], set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in orders or node.target in seen:
            continue
        try:
            stream = _grow(node, modules, calls, orders)
        except _NotAStream:
            continue
        seen.update(stream.condensed)
        streams.append(stream)
    return streams


def _grow(
    start: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int], orders: dict[str, Tensor]
) -> Stream:
    """Everything joined to ``start``'s output by sums and per-channel ops; ``_NotAStream`` if any
    writer or reader cannot take the permutation."""
    order = orders[start.target]
    members: set[fx.Node] = set()
    queue: list[fx.Node] = []
    condensed, plain, norms, readers = [], [], [], []

    def enter(node: fx.Node) -> None:
        """Put ``node`` (whose output is in the stream) in, checking how it makes that output."""
        if node in members:
            return
        if not isinstance(node, fx.Node):
            raise _NotAStream
        members.add(node)
        queue.append(node)
        if node.op == "call_module" and node.target in orders:
            if calls[node.target] != 1 or not torch.equal(orders[node.target], order):
                raise _NotAStream
            condensed.append(node.target)
        elif node.op == "call_module" and type(modules[node.target]) is nn.Conv2d:
            if calls[node.target] != 1 or modules[node.target].groups != 1:
                raise _NotAStream
            plain.append(node.target)
        elif _is_add(node):
            for arg in node.args[:2]:
                enter(arg)
        elif _is_norm(node, modules):
            if calls[node.target] != 1:
                raise _NotAStream
            norms.append(node.target)
            enter(node.args[0])
        elif _is_relu(node, modules):
            enter(node.args[0])
        else:
            raise _NotAStream

    enter(start)
    while queue:
        node = queue.pop()
        for user in node.users:
            if user in members:
                continue
            if _is_add(user) or _is_norm(user, modules) or _is_relu(user, modules):
                enter(user)
                continue
            if user.op == "call_module" and user.args[:1] == (node,) and calls[user.target] == 1:
                module = modules[user.target]
                if isinstance(module, FusedCondensedConv2d) or (
                    type(module) is nn.Conv2d and module.groups == 1
                ):
                    readers.append(user.target)
                    continue
            head = _linear_head(user, modules, calls, order.numel())  # None for the model's output too
            if head is None:
                raise _NotAStream
            readers.append(head)
    if not readers:
        raise _NotAStream
    return Stream(tuple(condensed), tuple(plain), tuple(norms), tuple(dict.fromkeys(readers)), order)
