"""Fold a condensed conv's input gather into the convolution that produces its input.

A condensed layer starts with ``index_select`` over its input channels. When that input comes from
a plain convolution through per-channel modules only (batch norm, ReLU, identities), each used once,
the producer can compute the gathered channels itself: its output rows become ``weight[index]``
(an input kept by several groups is computed once per group), the batch norms between are indexed
alike, and the condensed layer reads its input as it comes. The maths is the same; runtimes that
keep a blocked channel layout between convolutions (ONNX Runtime's NCHWc, OpenVINO) lose a
``Gather`` and the layout conversions around it. A batch norm right after the producer is folded
into it, so no clamp is needed at the condensed layer. Only done where the producer does not
grow: ``len(index) <= out_channels``.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from lgconv.inference import _norm_affine, _set
from lgconv.layers import CondensedConv2d


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (CondensedConv2d, nn.BatchNorm2d)) or super().is_leaf_module(
            module, qualified_name
        )


def _per_channel(module: nn.Module) -> bool:
    """Applies one function per channel (an eval batch norm) or the same one to each (ReLU, identity)."""
    if isinstance(module, (nn.ReLU, nn.Identity)) or (isinstance(module, nn.Dropout) and not module.training):
        return True
    return isinstance(module, nn.BatchNorm2d) and not module.training and module.running_mean is not None


def _producer_path(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> list[str] | None:
    """Module names from ``node``'s input back to a plain conv (last), each run once and read once;
    None if the input does not come from one that way."""
    path: list[str] = []
    current = node.args[0] if node.args else None
    while isinstance(current, fx.Node) and current.op == "call_module" and len(current.users) == 1:
        module = modules[current.target]
        if calls[current.target] != 1 and not isinstance(module, (nn.ReLU, nn.Identity, nn.Dropout)):
            return None  # a shared conv or batch norm serves other inputs too
        path.append(current.target)
        if type(module) is nn.Conv2d and module.groups == 1:
            return path
        if not _per_channel(module):
            return None
        current = current.args[0] if current.args else None
    return None


def _index_norm(norm: nn.BatchNorm2d, index: Tensor) -> None:
    """Keep (and repeat) the channels ``index`` names of an eval batch norm, in that order."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            value = getattr(norm, name)
            if value is not None:
                setattr(norm, name, nn.Parameter(value[index].clone(), requires_grad=False))
        norm.running_mean = norm.running_mean[index].clone()
        norm.running_var = norm.running_var[index].clone()
    norm.num_features = index.numel()


def _rows(conv: nn.Conv2d, index: Tensor, norm: nn.BatchNorm2d | None) -> nn.Conv2d:
    """``conv`` computing only output rows ``index`` (repeats allowed), ``norm`` (if any) folded in."""
    weight = conv.weight.detach().double()[index]
    bias = torch.zeros(index.numel(), dtype=torch.float64, device=weight.device)
    if conv.bias is not None:
        bias = conv.bias.detach().double()[index]
    if norm is not None:
        scale, shift = (values[index] for values in _norm_affine(norm))
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale + shift
    rows = nn.Conv2d(
        conv.in_channels,
        index.numel(),
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None or norm is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        rows.weight.copy_(weight.to(conv.weight.dtype))
        if rows.bias is not None:
            rows.bias.copy_(bias.to(conv.weight.dtype))
    return rows.eval()


def fold_gathers_into_producers(model: nn.Module) -> list[str]:
    """Fold, in place, the input gather of every ``CondensedConv2d`` of ``model`` (eval mode) that
    can take it into its producing conv; returns those layers' names. An untraceable model is left
    as it is."""
    modules = dict(model.named_modules())
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: keep every gather
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, CondensedConv2d) or calls[node.target] != 1:
            continue
        path = _producer_path(node, modules, calls)
        if path is None:
            continue
        *between, producer_name = path
        producer = modules[producer_name]
        index = layer.index.to(torch.long)
        if index.numel() > producer.out_channels:
            continue
        next_to_producer = modules[between[-1]] if between else None
        fold_norm = next_to_producer if type(next_to_producer) is nn.BatchNorm2d else None
        for name in between:
            module = modules[name]
            if module is fold_norm:
                _set(model, name, nn.Identity())
            elif isinstance(module, nn.BatchNorm2d):
                _index_norm(module, index)
        _set(model, producer_name, _rows(producer, index, fold_norm))
        layer.in_channels = index.numel()
        layer.index = torch.arange(index.numel(), device=index.device)
        folded.append(node.target)
    return folded
