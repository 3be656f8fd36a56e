"""optimize_for_inference: make a finalized model as fast as its FLOPs promise, keeping its outputs.

Each ``CondensedConv2d`` becomes a ``FusedCondensedConv2d``: a batch norm + ReLU right before it
turns into one per-channel clamp (its scale and shift move into the conv), a batch norm right after
it moves into the conv's weight and bias, and the connections are computed by the kernel that is
fastest for the layer's shape (grouped conv with gather and reorder, or a plain conv with the
dropped connections' weights at zero, which absorbs the gather and the reorder). The folded
modules are replaced by ``Folded`` so module names, ``lgconv.save`` and ``lgconv.load`` still work.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from lgconv import kernels
from lgconv.layers import CondensedConv2d, CondensedLinear, NativeAvgPool2d, NativeGroupedConv2d
from lgconv.layers.condensed_conv import CondensedConvNd
from lgconv.layers.conv_geometry import conv_geometry
from lgconv.layers.fused_condensed_conv import (
    KERNELS,
    POINTWISE_KERNELS,
    DenseGroupedConv2d,
    Folded,
    FusedCondensedConv2d,
    is_pointwise,
)
from lgconv.layers.learned_group import LearnedGroupMixin, grouped_connections
from lgconv.layers.native_avg_pool import computes_avg_pool2x2
from lgconv.layers.native_grouped_conv import computes_grouped_conv3x3

_MIN_SAMPLE_S = 1e-3  # one timing sample of a candidate lasts at least this long


@dataclass(frozen=True)
class _Chain:
    """A condensed conv and the batch norms (with their ReLU) that can be folded into it."""

    conv: str
    pre_norm: str | None = None
    pre_relu: str | None = None
    post_norm: str | None = None
    post_relu: bool = False


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (CondensedConv2d, nn.BatchNorm2d)):
            return True
        return super().is_leaf_module(module, qualified_name)


def _is_relu(module: nn.Module) -> bool:
    return type(module) is nn.ReLU


def _norm_relu(module: nn.Module) -> bool | None:
    """None if not a foldable eval batch norm; else whether it applies a ReLU itself (timm BatchNormAct2d)."""
    if not isinstance(module, nn.BatchNorm2d) or module.training or module.running_mean is None:
        return None
    if type(module) is nn.BatchNorm2d:
        return False
    act, drop = getattr(module, "act", None), getattr(module, "drop", None)
    if isinstance(drop, nn.Identity) and act is not None:
        if isinstance(act, nn.Identity):
            return False
        if _is_relu(act):
            return True
    return None


def _chains(model: nn.Module) -> list[_Chain]:
    """Trace ``model`` and find the batch norms that only feed, or only read, a condensed conv."""
    modules = dict(model.named_modules())
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - untraceable models are optimised layer by layer
        return [_Chain(name) for name, m in modules.items() if isinstance(m, CondensedConv2d)]
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def single_module(node: object, only_user: bool = True) -> str | None:
        """The module ``node`` calls, if that module runs once and (``only_user``) feeds one node."""
        if not isinstance(node, fx.Node) or node.op != "call_module":
            return None
        if only_user and len(node.users) != 1:
            return None
        return node.target if calls[node.target] == 1 else None

    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], CondensedConv2d):
            continue
        if calls[node.target] != 1:
            chains.append(_Chain(node.target))
            continue
        pre_norm = pre_relu = None
        source_node = _skip_identities(node.args[0], modules)
        source = single_module(source_node)
        if source is not None and _is_relu(modules[source]):
            norm = single_module(source_node.args[0])
            if norm is not None and _norm_relu(modules[norm]) is False:
                pre_norm, pre_relu = norm, source
        elif source is not None and _norm_relu(modules[source]) is True:
            pre_norm = source
        post_norm, post_relu = None, False
        if len(node.users) == 1:
            user = single_module(next(iter(node.users)), only_user=False)
            relu = None if user is None else _norm_relu(modules[user])
            if relu is not None:
                post_norm, post_relu = user, relu
        chains.append(_Chain(node.target, pre_norm, pre_relu, post_norm, post_relu))
    return chains


def _skip_identities(node: object, modules: dict[str, nn.Module]) -> object:
    """Walk back over ``Identity`` and eval ``Dropout`` modules that only pass their input on."""
    while (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and len(node.users) == 1
        and (
            isinstance(modules[node.target], nn.Identity)
            or (isinstance(modules[node.target], nn.Dropout) and not modules[node.target].training)
        )
    ):
        node = node.args[0]
    return node


def _norm_affine(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval batch norm as ``scale * x + shift`` (float64)."""
    var = norm.running_var.double()
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -norm.running_mean.double() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return scale, shift


def _dense_weight(layer: CondensedConv2d) -> tuple[Tensor, Tensor]:
    """The condensed layer as a dense (out, in, kh, kw) float64 weight with zeros, and its bias."""
    conv = layer.conv
    rows, columns = grouped_connections(layer.index, layer.out_channels, layer.groups, layer.layout)
    dense = conv.weight.new_zeros(
        (layer.out_channels, layer.in_channels, *conv.kernel_size), dtype=torch.float64
    )
    dense[rows[:, None], columns] = conv.weight.detach().double()
    bias = conv.weight.new_zeros(layer.out_channels, dtype=torch.float64)
    if conv.bias is not None:
        bias[rows] = conv.bias.detach().double()
    return dense, bias


@dataclass
class _Folded:
    """A condensed conv with its neighbours folded: dense float64 weight, bias and clamp bounds per input."""

    layer: CondensedConv2d
    weight: Tensor
    bias: Tensor
    low: Tensor | None
    high: Tensor | None


def _fold(layer: CondensedConv2d, pre: nn.BatchNorm2d | None, post: nn.BatchNorm2d | None) -> _Folded:
    """relu(a x + b) == a * clamp(x, -b/a) + b: the clamp stays, a and b move into the conv."""
    weight, bias = _dense_weight(layer)
    low = high = None
    if pre is not None:
        scale, shift = _norm_affine(pre)
        threshold = torch.where(scale != 0, -shift / torch.where(scale != 0, scale, 1.0), 0.0)
        low = torch.where(scale > 0, threshold, -torch.inf)
        high = torch.where(scale < 0, threshold, torch.inf)
        low = torch.where(scale == 0, 0.0, low)
        high = torch.where(scale == 0, 0.0, high)
        constant = torch.where(scale == 0, shift.clamp_min(0), shift)
        bias = bias + (weight.sum((2, 3)) * constant).sum(1)
        weight = weight * scale.view(1, -1, 1, 1)
    if post is not None:
        scale, shift = _norm_affine(post)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale + shift
    return _Folded(layer, weight, bias, low, high)


def _build(folded: _Folded, kernel: str) -> FusedCondensedConv2d:
    """The inference layer computing ``folded`` with ``kernel`` (see ``FusedCondensedConv2d``)."""
    layer = folded.layer
    conv = layer.conv
    groups = layer.groups if kernel in ("grouped", "native") else 1
    if kernel in ("grouped", "native"):
        index: Tensor | None = layer.index
        rows, columns = grouped_connections(layer.index, layer.out_channels, groups, layer.layout)
        weight = folded.weight[rows[:, None], columns]
        bias = folded.bias[rows]
        order = None if torch.equal(rows, torch.arange(len(rows), device=rows.device)) else rows.argsort()
    else:
        used = layer.index.unique() if kernel == "dense_kept" else None
        index = used
        weight = folded.weight if used is None else folded.weight[:, used]
        bias, order = folded.bias, None
    fused = FusedCondensedConv2d(
        layer.in_channels,
        layer.out_channels,
        kernel=kernel,
        groups=groups,
        gathered=None if index is None else index.numel(),
        clamp=_clamp_sides(folded),
        reorder=order is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
        **conv_geometry(conv),
    )
    dtype = conv.weight.dtype
    with torch.no_grad():
        if index is not None:
            fused.index.copy_(index)
        positions = slice(None) if index is None else index
        for bound, values in ((fused.low, folded.low), (fused.high, folded.high)):
            if bound is not None:
                bound.copy_(values[positions].view(bound.shape).to(dtype))
        if order is not None:
            fused.order.copy_(order)
        fused.conv.weight.copy_(weight.to(dtype))
        fused.conv.bias.copy_(bias.to(dtype))
    return fused.eval()


def _kernels(layer: CondensedConv2d) -> tuple[str, ...]:
    """The kernels that can compute ``layer``."""
    conv = layer.conv
    if is_pointwise(conv.kernel_size, conv.stride, conv.padding):
        return KERNELS
    return tuple(k for k in KERNELS if k not in POINTWISE_KERNELS)


def _clamp_sides(folded: _Folded) -> str | None:
    """Which clamp bounds ``folded`` needs: a side that is infinite for every input is left out."""
    if folded.low is None:
        return None
    low, high = bool(torch.isfinite(folded.low).any()), bool(torch.isfinite(folded.high).any())
    return "both" if low and high else "low" if low else "high" if high else None


def _default_kernel(layer: CondensedConv2d, channels_last: bool | None) -> str:
    """Without an example input: the native op for gathered 1x1 convs on pixel planes (where it
    computes only the kept connections, 2-4x the dense product on CondenseNet's and ResNet's
    layers), else the dense kernel; grouped convs pay off on CPU only for spatial kernels."""
    if layer.conv.kernel_size != (1, 1):
        return "grouped"
    if "native" in _kernels(layer) and not channels_last and kernels.load_native():
        return "native"
    return "dense"


def _median_ms(module: nn.Module, x: Tensor, repeats: int) -> float:
    """Median milliseconds of ``module(x)`` after one warm-up call."""
    return _median_ms_each([module], x, repeats)[0]


def _median_ms_each(modules: Sequence[nn.Module], x: Tensor, repeats: int) -> list[float]:
    """Median milliseconds per call of each module on ``x``, timed in interleaved rounds.

    Each round calls every module often enough to fill ``_MIN_SAMPLE_S``, so a 50 us layer is not
    judged from single calls at the timer's resolution, and load changes hit all candidates alike.
    """
    start = time.perf_counter()
    for module in modules:
        module(x)
    calls = max(1, math.ceil(_MIN_SAMPLE_S * len(modules) / max(time.perf_counter() - start, 1e-9)))
    samples: list[list[float]] = [[] for _ in modules]
    for _ in range(repeats):
        for module, times in zip(modules, samples):
            start = time.perf_counter()
            for _ in range(calls):
                module(x)
            times.append((time.perf_counter() - start) / calls)
    return [statistics.median(times) * 1e3 for times in samples]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _strided_copy(x: Tensor) -> Tensor:
    """A copy of ``x`` with its strides, so a layer is timed on the memory layout it really reads
    (a dense block hands its layers channel slices of one wider tensor)."""
    if 0 in x.stride():  # an expanded tensor: its elements share memory, copy it densely
        return x.clone()
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)


def _captured_inputs(model: nn.Module, names: Sequence[str], example: Tensor) -> dict[str, Tensor]:
    captured: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured[name] = _strided_copy(args[0].detach())

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def fold_neighbours(model: nn.Module, fold: bool = True) -> dict[str, _Folded]:
    """Every ``CondensedConv2d`` of ``model`` by name, with the batch norms around it folded in
    (``fold``); the folded norms (and ReLUs) are replaced by ``Folded`` in ``model``, the layers stay.
    Shared by ``optimize_for_inference`` and ``lgconv.export``, which build their own layers from it."""
    modules = dict(model.named_modules())
    chains = (
        _chains(model) if fold else [_Chain(n) for n, m in modules.items() if isinstance(m, CondensedConv2d)]
    )
    folded = {}
    for chain in chains:
        layer = modules[chain.conv]
        pre = modules[chain.pre_norm] if chain.pre_norm else None
        post = modules[chain.post_norm] if chain.post_norm else None
        if pre is not None and any(p != 0 for p in _padding(layer)):
            pre = None
        folded[chain.conv] = _fold(layer, pre, post)
        if pre is not None:
            _set(model, chain.pre_norm, Folded())
            if chain.pre_relu:
                _set(model, chain.pre_relu, Folded())
        if post is not None:
            _set(model, chain.post_norm, Folded(relu=chain.post_relu))
    return folded


def optimize_for_inference(
    model: nn.Module,
    example_input: Tensor | None = None,
    *,
    fold: bool = True,
    kernel: str = "auto",
    channels_last: bool | None = None,
    dense_grouped: bool | None = None,
    repeats: int = 5,
) -> nn.Module:
    """Fold neighbouring batch norms into every ``CondensedConv2d`` and pick its fastest exact kernel.

    The model must be finalized and in eval mode (batch norms use running statistics); it is changed
    in place and returned. With ``example_input`` (use the batch size you will serve) each layer's
    kernel is chosen by timing the candidates on the input that layer sees; ``channels_last=None``
    tunes under both memory formats and keeps the faster whole model. Without it, 1x1 layers use the
    native kernel where it is built (the dense kernel with ``channels_last=True`` or without a
    compiler) and the memory format changes only if ``channels_last=True``.
    ``kernel`` forces one of ``"grouped"``, ``"dense"``, ``"dense_kept"`` everywhere, or ``"matmul"``
    or ``"native"`` (1x1 layers with stride 1 and no padding; the others then get ``"dense"``; the
    native kernel is the fused C++ op, built on first use); ``fold=False``
    leaves the batch norms alone. ``dense_grouped`` turns the model's other grouped convs (up to 8
    groups, e.g. CondenseNet's 3x3) into ``DenseGroupedConv2d``: always (True), never (False), or
    where timing on the example input says it is faster (None; then a 3x3 conv with stride 1 and
    padding 1 may also become ``NativeGroupedConv2d``, the C++ op, and so may a plain 3x3 conv over up
    to 32 inputs, such as a stem). With ``example_input``, 2x2
    average pools (stride 2) may become ``NativeAvgPool2d`` where timing says so (ATen's pool is
    slow on NCHW), and every ``CondensedLinear`` (ConvNeXt / ViT MLPs condensed with ``linear=True``)
    may run the fused C++ op or become a dense ``nn.Linear`` with zeros. Outputs equal the finalized
    model's up to float rounding. ``CondensedConv1d`` / ``CondensedConv3d`` layers have no fused
    kernels: they are left as they are (gather + grouped conv), and a model with only those is
    returned as is.
    """
    if kernel != "auto" and kernel not in KERNELS:
        raise ValueError(f"kernel must be 'auto' or one of {KERNELS}, got {kernel!r}")
    if model.training:
        raise ValueError(
            "optimize_for_inference needs an eval model (batch norms fold their running statistics); "
            "call model.eval() first"
        )
    if any(isinstance(m, LearnedGroupMixin) for m in model.modules()):
        raise ValueError("the model still has learned group layers; run lgconv.finalize(model) first")
    folded = fold_neighbours(model, fold)
    linears = [name for name, m in model.named_modules() if isinstance(m, CondensedLinear)]
    if not folded and not linears and any(isinstance(m, CondensedConvNd) for m in model.modules()):
        return model  # only CondensedConv1d / CondensedConv3d: no fused kernels, they serve as they are
    if not folded and not linears:
        raise ValueError(
            f"{type(model).__name__} has no CondensedConv2d to optimise; finalize a condensed model first"
        )
    for name, item in folded.items():
        choice = _default_kernel(item.layer, channels_last) if kernel == "auto" else kernel
        choice = choice if choice in _kernels(item.layer) else "dense"
        _set(model, name, _build(item, choice))
    inside = tuple(f"{name}." for name in folded)
    grouped = [name for name, m in model.named_modules() if _densifiable(m) and not name.startswith(inside)]
    if dense_grouped:
        for name in grouped:
            _set(model, name, DenseGroupedConv2d.from_grouped(model.get_submodule(name)))
    if example_input is None:
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return model
    originals = {name: model.get_submodule(name) for name in grouped}
    candidates: dict[str, list[nn.Module]] = {}
    if kernel == "auto":
        candidates.update(
            {name: [_build(item, choice) for choice in _kernels(item.layer)] for name, item in folded.items()}
        )
    if dense_grouped is None:
        candidates.update({name: _grouped_candidates(conv) for name, conv in originals.items()})
        if kernels.load_native():
            stems = {n: m for n, m in model.named_modules() if _narrow_window(m) and not n.startswith(inside)}
            candidates.update({n: [conv, NativeGroupedConv2d.from_conv(conv)] for n, conv in stems.items()})
    if kernel == "auto":
        candidates.update({name: _linear_candidates(model.get_submodule(name)) for name in linears})
    if kernels.load_native():
        pools = [n for n, m in model.named_modules() if computes_avg_pool2x2(m) and not n.startswith(inside)]
        candidates.update({name: [model.get_submodule(name), NativeAvgPool2d()] for name in pools})
    formats = [torch.channels_last, torch.contiguous_format]
    if example_input.dim() != 4:  # tokens or sequences: no channels-last layout to try
        formats = [torch.contiguous_format]
    elif channels_last is not None:
        formats = [torch.channels_last if channels_last else torch.contiguous_format]
    best: tuple[float, torch.memory_format, dict[str, nn.Module]] | None = None
    for memory_format in formats:
        choices = _tune(model, candidates, example_input, memory_format, repeats)
        x = example_input.to(memory_format=memory_format)
        with torch.inference_mode():
            ms = _median_ms(model, x, repeats) if len(formats) > 1 else 0.0
        if best is None or ms < best[0]:
            best = (ms, memory_format, choices)
    _, memory_format, choices = best
    for name, module in choices.items():
        _set(model, name, module)
    return model.to(memory_format=memory_format)


def _tune(
    model: nn.Module,
    candidates: dict[str, list[nn.Module]],
    example: Tensor,
    memory_format: torch.memory_format,
    repeats: int,
) -> dict[str, nn.Module]:
    """Install, for every layer, the candidate that runs fastest on its input in ``memory_format``."""
    model.to(memory_format=memory_format)
    inputs = _captured_inputs(model, list(candidates), example.to(memory_format=memory_format))
    choices = {}
    for name, x in inputs.items():
        choices[name] = _fastest([c.to(memory_format=memory_format) for c in candidates[name]], x, repeats)
        _set(model, name, choices[name])
    return choices


def _grouped_candidates(conv: nn.Conv2d) -> list[nn.Module]:
    """The forms a grouped conv can take: itself, dense with zeros, and the native 3x3 op where it applies."""
    forms: list[nn.Module] = [conv, DenseGroupedConv2d.from_grouped(conv)]
    if computes_grouped_conv3x3(conv) and kernels.load_native():
        forms.append(NativeGroupedConv2d.from_conv(conv))
    return forms


def _narrow_window(module: nn.Module) -> bool:
    """A plain ungrouped 3x3 conv (stride 1, padding 1) over few inputs, such as a network's stem,
    for which oneDNN often falls back to its slow generic path on NCHW tensors."""
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.in_channels <= 32
        and computes_grouped_conv3x3(module)
    )


def _linear_candidates(layer: CondensedLinear) -> list[nn.Module]:
    """A condensed linear layer as it is, through the fused C++ op, and as ``nn.Linear`` with zeros."""
    forms: list[nn.Module] = [layer]
    if kernels.load_native():
        forms.append(layer.with_kernel("native"))
    rows, columns = grouped_connections(layer.index, layer.out_features, layer.groups, layer.layout)
    dense = nn.Linear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        device=layer.weight.device,
        dtype=layer.weight.dtype,
    )
    with torch.no_grad():
        dense.weight.zero_()
        dense.weight[rows[:, None], columns] = layer.weight
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    forms.append(dense.eval())
    return forms


def _densifiable(module: nn.Module) -> bool:
    """A plain grouped conv with few groups (a depthwise conv would cost far too much when dense)."""
    return type(module) is nn.Conv2d and 1 < module.groups <= 8


def _padding(layer: CondensedConv2d) -> tuple[int, ...]:
    padding = layer.conv.padding
    return (0,) if padding == "valid" else (1,) if isinstance(padding, str) else tuple(padding)


def _fastest(candidates: Sequence[nn.Module], x: Tensor, repeats: int) -> nn.Module:
    """The candidate that runs ``x`` fastest (all compute the same function)."""
    with torch.inference_mode():
        times = _median_ms_each(candidates, x, repeats)
    return candidates[times.index(min(times))]
