"""export_onnx: an ONNX graph of a finalized model, each condensed layer in the form its runtime runs fastest.

ONNX Runtime and OpenVINO run a gather + grouped convolution, a dense convolution with zeros and a
dense convolution over the kept inputs at very different speeds, so every condensed layer is exported
in the form that times fastest *in the target runtime* on the example's shape, batch norms folded.
Output channel orders are folded into the next layer's weights (and the batch norms between) where
the maths allows; elsewhere they become a channel shuffle or the layer takes an order-free form, so
no graph carries a ``Gather`` channel permutation feeding a convolution, which OpenVINO 2026.4
computes wrongly. The written graph is checked in the runtime against the PyTorch model.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from lgconv.channel_streams import Stream, find_streams
from lgconv.gather_folding import fold_gathers_into_producers
from lgconv.inference import (
    _MIN_SAMPLE_S,
    _build,
    _captured_inputs,
    _densifiable,
    _Folded,
    _norm_relu,
    _set,
    fold_neighbours,
)
from lgconv.layers import (
    CondensedConv2d,
    DenseGroupedConv2d,
    Folded,
    FusedCondensedConv2d,
    NativeGroupedConv2d,
)
from lgconv.layers.condensed_conv import CondensedConvNd
from lgconv.layers.conv_geometry import conv_geometry
from lgconv.layers.learned_group import LearnedGroupMixin, grouped_order
from lgconv.model_file import write_atomic

RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino")
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "output"
# Optimised layers export_onnx rebuilds (native has the grouped structure).
_READABLE_KERNELS = ("grouped", "dense", "dense_kept", "matmul", "native")
# Elementwise ONNX ops a channel permutation passes through unchanged on its way to a convolution.
_ELEMENTWISE = {"Relu", "Max", "Min", "Clip", "Mul", "Add", "Sub", "Div", "BatchNormalization", "Identity"}


class ExportMismatchError(RuntimeError):
    """The exported graph, run in its runtime, does not reproduce the PyTorch model's outputs."""


class _Shuffle(torch.autograd.Function):
    """Channel shuffle whose ONNX form is four ops (two reshapes around a transpose, with the input's
    shape), not the dozen shape computations a traced ``reshape`` with a dynamic batch becomes."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, groups: int, per_group: int) -> Tensor:
        shuffled = input.reshape(input.shape[0], groups, per_group, -1).transpose(1, 2)
        return shuffled.reshape(input.shape)

    @staticmethod
    def symbolic(g: Any, input: Any, groups: int, per_group: int) -> Any:
        split = g.op("Constant", value_t=torch.tensor([0, groups, per_group, -1]))
        shuffled = g.op("Transpose", g.op("Reshape", input, split), perm_i=[0, 2, 1, 3])
        return g.op("Reshape", shuffled, g.op("Shape", input))


class ChannelShuffle(nn.Module):
    """``(N, G*K, ...) -> (N, K*G, ...)``, any spatial dims: channel ``g*K + k`` moves to ``k*G + g``
    (reshapes and a transpose, which runtimes compute as such, instead of a ``Gather`` permutation)."""

    def __init__(self, groups: int, channels: int) -> None:
        super().__init__()
        self.groups, self.channels = groups, channels

    def forward(self, input: Tensor) -> Tensor:
        return _Shuffle.apply(input, self.groups, self.channels // self.groups)


@dataclass(frozen=True)
class LayerChoice:
    """One exported layer: the representation chosen and every candidate's time in the runtime (ms)."""

    name: str
    representation: str
    candidates_ms: dict[str, float]

    @property
    def ms(self) -> float:
        return self.candidates_ms[self.representation]


@dataclass(frozen=True)
class ExportReport:
    """What ``export_onnx`` wrote: per layer the representation and its time alone, the whole-graph
    trials in ms (``"per layer"``: each layer's fastest form; ``"dense"``, ``"dense_kept"``,
    ``"grouped"``: every condensed layer in that form where it has it), the trial kept, and the
    largest relative difference from the PyTorch model in the runtime. ``folded_gathers``: layers
    whose input gather went into the conv producing their input; ``folded_orders``: layers whose
    output order went into the next layer's weights."""

    path: Path
    runtime: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerChoice, ...]
    trials_ms: dict[str, float]
    chosen: str
    max_error: float
    folded_orders: tuple[str, ...] = field(default=())
    folded_gathers: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        lines = [f"{self.path}: ONNX for {self.runtime}, timed on input {shape}"]
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines.append(f"  {'layer':<{width}}  {'representation':<16} {'ms':>8}  candidates (ms)")
        for layer in self.layers:
            others = ", ".join(f"{k} {v:.3f}" for k, v in layer.candidates_ms.items())
            lines.append(f"  {layer.name:<{width}}  {layer.representation:<16} {layer.ms:8.3f}  {others}")
        trials = ", ".join(f"{k} {v:.2f} ms" for k, v in self.trials_ms.items())
        lines.append(f"whole graph: {trials}; kept {self.chosen!r}")
        if self.folded_gathers:
            lines.append(f"input gathers folded into the producing conv: {len(self.folded_gathers)}")
        if self.folded_orders:
            lines.append(f"output orders folded into the next layer: {len(self.folded_orders)}")
        lines.append(f"max relative error vs PyTorch in {self.runtime}: {self.max_error:.1e}")
        return "\n".join(lines)


def require_runtime(runtime: str) -> Any:
    """The runtime's Python module, or one clear error naming the package and the extra that brings it."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    try:
        return importlib.import_module(runtime)
    except ImportError:
        raise ImportError(
            f"runtime {runtime!r} needs the {runtime} package, which is not installed; "
            f'pip install "lgconv[deploy]" (or pip install {runtime})'
        ) from None


def compile_onnx(
    path: str | os.PathLike[str],
    runtime: str = "onnxruntime",
    *,
    threads: int | None = None,
    passive: bool | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """The ONNX graph at ``path`` compiled by ``runtime`` for the CPU in float32, as a function from
    the input array to the first output. ``threads`` defaults to torch's thread count. ``passive``
    (default: ``OMP_WAIT_POLICY=PASSIVE``, a shared machine) makes ONNX Runtime's idle threads sleep
    instead of spinning and leaves OpenVINO's threads unpinned."""
    module = require_runtime(runtime)
    threads = threads or torch.get_num_threads()
    shared = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" if passive is None else passive
    if runtime == "onnxruntime":
        options = module.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if shared:  # idle threads sleep, as OpenMP's do
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = module.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32",  # CPUs with bf16 units would otherwise run in bf16
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": not shared,  # a thread pinned to a core another process holds waits
    }
    request = module.Core().compile_model(str(path), "CPU", config).create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer([x])
        return request.get_output_tensor(0).data.copy()

    return run


def to_onnx(
    module: nn.Module, example: Tensor, path: str | os.PathLike[str], dynamic_batch: bool = True
) -> None:
    """``torch.onnx.export`` (TorchScript exporter, opset 17) with input ``input``, output ``output``
    and, by default, a dynamic batch axis."""
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
        )


def permutation_gathers(graph: Any) -> list[str]:
    """Names of the ``Gather(axis=1)`` nodes of an ONNX graph whose constant indices permute all the
    channels and whose result reaches a plain (one-group) ``Conv`` through elementwise ops only:
    the pattern OpenVINO 2026.4 computes wrongly. ``graph`` is an ``onnx.ModelProto``."""
    from onnx import numpy_helper

    constants = {init.name: numpy_helper.to_array(init) for init in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    consumers: dict[str, list[Any]] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def reaches_plain_conv(value: str) -> bool:
        for user in consumers.get(value, []):
            if user.op_type == "Conv":
                if all(a.i == 1 for a in user.attribute if a.name == "group"):
                    return True
            elif user.op_type in _ELEMENTWISE and reaches_plain_conv(user.output[0]):
                return True
        return False

    found = []
    for node in graph.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or axis != 1 or node.input[1] not in constants:
            continue
        indices = constants[node.input[1]].reshape(-1)
        is_permutation = len(indices) > 1 and np.array_equal(np.sort(indices), np.arange(len(indices)))
        if is_permutation and reaches_plain_conv(node.output[0]):
            found.append(node.name or node.output[0])
    return found


class _Tracer(fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if isinstance(module, (FusedCondensedConv2d, Folded, nn.BatchNorm2d)):
            return True
        return super().is_leaf_module(module, qualified_name)


def _passes_channels(module: nn.Module) -> bool:
    """Applies the same function to each channel in place, or a per-channel one (an eval batch norm)."""
    if isinstance(module, (Folded, nn.ReLU, nn.Identity)) or (
        isinstance(module, nn.Dropout) and not module.training
    ):
        return True
    return isinstance(module, nn.BatchNorm2d) and _norm_relu(module) is not None


def _order_absorbers(model: nn.Module, names: list[str]) -> dict[str, tuple[list[str], str]]:
    """For each layer in ``names`` whose output reaches exactly one convolution able to take its
    inputs in any order (through per-channel modules only, batch norms used once): (those modules,
    the conv)."""
    modules = dict(model.named_modules())
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model keeps its orders as shuffles or dense layers
        return {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    found = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in names or calls[node.target] != 1:
            continue
        path: list[str] = []
        current = node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if user.op != "call_module" or user.args[:1] != (current,):
                break
            module = modules[user.target]
            shared = calls[user.target] != 1  # its weights serve other inputs too: leave them alone
            plain_conv = type(module) in (nn.Conv2d, DenseGroupedConv2d) and module.groups == 1
            if (isinstance(module, FusedCondensedConv2d) or plain_conv) and not shared:
                found[node.target] = (path, user.target)
                break
            if not _passes_channels(module) or (shared and isinstance(module, nn.BatchNorm2d)):
                break
            path.append(user.target)
            current = user
    return found


def _shuffle_order(channels: int, groups: int) -> Tensor:
    """The output order (``index_select`` after the grouped conv) that ``ChannelShuffle(groups)`` applies."""
    j = torch.arange(channels)
    return (j % groups) * (channels // groups) + j // groups


def _folded_from_fused(fused: FusedCondensedConv2d) -> _Folded:
    """An optimised layer back as a condensed layer with its folded dense weight, so every
    representation can be rebuilt from it (a layer already dense keeps its kept inputs as one group)."""
    if fused.kernel not in _READABLE_KERNELS:
        raise ValueError(
            f"export_onnx rebuilds layers with kernels {', '.join(_READABLE_KERNELS)}, not {fused.kernel!r}; "
            "export the finalized model (before optimize_for_inference) instead"
        )
    conv = fused.conv
    in_channels, out_channels = fused.in_channels, fused.out_channels
    index = fused.index if fused.index is not None else torch.arange(in_channels, device=conv.weight.device)
    groups = conv.groups if fused.kernel in ("grouped", "native") else 1  # native: the grouped structure
    order = fused.order if fused.order is not None else torch.arange(out_channels, device=index.device)
    layout = "contiguous" if fused.order is None else "interleaved"
    layer = CondensedConv2d(
        in_channels,
        out_channels,
        groups=groups,
        kept_inputs=index.numel() // groups,
        layout=layout,
        device=index.device,
        dtype=conv.weight.dtype,
        **conv_geometry(conv),
    )
    if fused.order is not None and not torch.equal(
        grouped_order(out_channels, groups, layout).argsort().to(order.device), order
    ):
        raise ValueError(f"cannot re-export a fused layer with output order {order.tolist()}")
    layer.index.copy_(index)
    kept = index.numel() // groups
    columns = index.view(groups, kept)[order // (out_channels // groups)]
    weight = conv.weight.detach().double()[order]
    dense = weight.new_zeros((out_channels, in_channels, *conv.kernel_size))
    dense[torch.arange(out_channels, device=index.device)[:, None], columns] = weight
    bounds = []
    for values, fill in ((fused.low, -torch.inf), (fused.high, torch.inf)):
        full = torch.full((in_channels,), fill, dtype=torch.float64, device=index.device)
        if values is not None:
            full[index] = values.detach().double().view(-1)
        bounds.append(full if fused.low is not None or fused.high is not None else None)
    return _Folded(layer, dense, conv.bias.detach().double()[order], bounds[0], bounds[1])


def _candidates(
    item: _Folded, absorbable: bool, streamable: bool = False
) -> tuple[dict[str, nn.Module], Tensor | None]:
    """Every exportable form of one folded condensed layer, and the output order left to fold into
    the next layer (``absorbable``) or into its channel stream (``streamable``), which the
    ``grouped`` candidate then leaves out; a stream's layer keeps ``grouped+shuffle`` as fallback."""
    layer = item.layer
    forms: dict[str, nn.Module] = {"dense": _build(item, "dense")}
    kept = _build(item, "dense_kept")
    if kept.index is not None and kept.index.numel() < layer.in_channels:
        forms["dense_kept"] = kept
    leftover = None
    if layer.groups > 1:
        grouped = _build(item, "grouped")
        if grouped.index is not None and torch.equal(grouped.index.cpu(), torch.arange(layer.in_channels)):
            grouped.index = None  # its gather was folded into the producer: the input comes in order
        order = grouped.order
        if order is None:
            forms["grouped"] = grouped
        else:
            grouped.order = None
            if absorbable or streamable:
                forms["grouped"], leftover = grouped, order
            if not absorbable and torch.equal(order.cpu(), _shuffle_order(layer.out_channels, layer.groups)):
                shuffle = ChannelShuffle(layer.groups, layer.out_channels)
                forms["grouped+shuffle"] = nn.Sequential(copy.deepcopy(grouped), shuffle).eval()
    return forms, leftover


def _shuffled(layer: CondensedConvNd) -> nn.Module:
    """A 1D / 3D condensed layer whose output order is a channel shuffle (the interleaved layout),
    exported as gather + grouped conv + shuffle instead of a ``Gather`` permutation; others as they are."""
    order = layer.restore
    if order is None or not torch.equal(order.cpu(), _shuffle_order(layer.out_channels, layer.groups)):
        return layer
    grouped = copy.deepcopy(layer)
    grouped.restore = None
    return nn.Sequential(grouped, ChannelShuffle(layer.groups, layer.out_channels)).eval()


def _absorb(model: nn.Module, order: Tensor, path: list[str], consumer: str) -> None:
    """Fold an output permutation ``y = z[:, order]`` into the per-channel modules on ``path`` and the
    ``consumer`` convolution, so they read ``z`` as it comes."""
    _permute_norms(model, path, order.argsort())
    _permute_reader(model, consumer, order)


def _permute_norms(model: nn.Module, names: list[str] | tuple[str, ...], inverse: Tensor) -> None:
    """Reorder the channels of the batch norms among ``names`` (others pass channels unchanged)."""
    with torch.no_grad():
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, nn.BatchNorm2d):
                for tensor in (module.running_mean, module.running_var, module.weight, module.bias):
                    if tensor is not None:
                        tensor.copy_(tensor[inverse])


def _permute_reader(model: nn.Module, name: str, order: Tensor) -> None:
    """Make the layer ``name`` (conv, condensed layer or linear) read ``z`` where it read ``z[:, order]``."""
    inverse = order.argsort()
    target = model.get_submodule(name)
    if isinstance(target, nn.Sequential):
        target = target[0]
    with torch.no_grad():
        if isinstance(target, FusedCondensedConv2d) and target.index is not None:
            target.index.copy_(order[target.index])
            return
        conv = target.conv if isinstance(target, FusedCondensedConv2d) else target
        conv.weight.copy_(conv.weight[:, inverse])
        if isinstance(target, FusedCondensedConv2d):
            for bound in (target.low, target.high):
                if bound is not None:
                    bound.copy_(bound[:, inverse])


def _permute_stream(model: nn.Module, stream: Stream) -> None:
    """Let ``stream`` carry its condensed writers' grouped order: plain writers' rows, its batch
    norms and its readers' inputs permuted alike (the condensed writers are built without order)."""
    inverse = stream.order.argsort()
    with torch.no_grad():
        for name in stream.plain:
            conv = model.get_submodule(name)
            conv.weight.copy_(conv.weight[inverse])
            if conv.bias is not None:
                conv.bias.copy_(conv.bias[inverse])
    _permute_norms(model, stream.norms, inverse)
    for name in stream.readers:
        _permute_reader(model, name, stream.order)


def _shuffled_orders(folded: dict[str, _Folded], absorbed: set[str]) -> dict[str, Tensor]:
    """The output order of every grouped condensed layer whose order is a channel shuffle (the
    interleaved layout) and reaches no single conv: the candidates for a channel stream."""
    orders = {}
    for name, item in folded.items():
        layer = item.layer
        if name in absorbed or layer.groups == 1:
            continue
        order = _build(item, "grouped").order
        if order is not None and torch.equal(order.cpu(), _shuffle_order(layer.out_channels, layer.groups)):
            orders[name] = order
    return orders


def _runtime_ms(
    forms: dict[str, nn.Module], x: Tensor, runtime: str, folder: Path, repeats: int, dynamic: bool = False
) -> dict[str, float]:
    """Ms per call of every form exported alone and run by ``runtime`` on ``x``: the fastest of
    ``repeats`` samples of at least 1 ms (other load only ever adds time, so the minimum is the
    steadiest estimate). Each form's session is timed alone and closed before the next is built,
    with the runtime's threading as served: no other session's threads spin meanwhile."""
    array = x.detach().contiguous().numpy()
    times = {}
    for i, (name, module) in enumerate(forms.items()):
        path = folder / f"trial{i}.onnx"
        to_onnx(module, x, path, dynamic_batch=dynamic)
        run = compile_onnx(path, runtime)
        run(array)  # warm-up
        start = time.perf_counter()
        run(array)
        calls = max(1, math.ceil(_MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-9)))
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                run(array)
            best = min(best, (time.perf_counter() - start) / calls * 1e3)
        times[name] = best
        del run  # closes the session and joins its threads
    return times


def _relative_error(actual: np.ndarray, expected: Tensor) -> float:
    expected = expected.detach().float().numpy()
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(actual.astype(np.float32) - expected).max() / scale)


def _export_form(model: nn.Module) -> tuple[nn.Module, dict[str, _Folded], list[str]]:
    """A copy of ``model`` for export: input gathers folded into their producing convs where the
    maths allows, batch norms folded into every condensed layer, the layers described by their
    folded weights, CondenseNet dense blocks concatenating (as graphs do best); and the layers
    whose gathers were folded."""
    from lgconv.models.condensenet import DenseBlock

    export = copy.deepcopy(model).eval()
    for module in export.modules():
        if isinstance(module, DenseBlock):
            module.preallocate = False
    for name, module in list(export.named_modules()):
        if isinstance(module, NativeGroupedConv2d):  # a plain conv again, so its forms are tried
            _set(export, name, _plain_conv(module))
    gathers = fold_gathers_into_producers(export)
    folded = fold_neighbours(export)
    for name, module in list(export.named_modules()):
        if isinstance(module, CondensedConvNd) and not isinstance(module, CondensedConv2d):
            _set(export, name, _shuffled(module))
    for name, module in export.named_modules():
        if isinstance(module, FusedCondensedConv2d):
            folded[name] = _folded_from_fused(module)
    return export, folded, gathers


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """An ``nn.Conv2d`` with ``conv``'s window, groups, weight and bias."""
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        groups=conv.groups,
        bias=conv.bias is not None,
        **conv_geometry(conv),
    )
    plain.load_state_dict(conv.state_dict())
    return plain.eval()


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: Tensor,
    *,
    runtime: str = "onnxruntime",
    repeats: int = 5,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Write ``model`` as an ONNX graph at ``path`` whose condensed layers each take the representation
    that ``runtime`` (``"onnxruntime"`` or ``"openvino"``) runs fastest on ``example_input``'s shape.

    The model must be finalized (``lgconv.finalize``), optionally optimised; it is not changed. Each
    layer's forms (``grouped``: gather + grouped conv, its output order folded into the next conv or
    as ``grouped+shuffle``; ``dense``: zeros for the dropped connections; ``dense_kept``: dense over
    the kept inputs) are timed alone in the runtime, then the per-layer choice and the graphs with
    every condensed layer in one form are timed whole and the fastest is kept. The graph has a
    dynamic batch axis; its outputs are checked in the runtime against the model's
    (``ExportMismatchError`` past ``tolerance``, relative to the largest output) before the file is
    written atomically. Returns the per-layer report.
    """
    require_runtime(runtime)
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, LearnedGroupMixin) for m in model.modules()):
        raise ValueError("the model still has learned group layers; run lgconv.finalize(model) first")
    if not isinstance(example_input, Tensor) or not example_input.is_floating_point():
        raise TypeError(
            "example_input must be a float tensor of the shape to serve, e.g. torch.randn(1, 3, 224, 224)"
        )
    target = Path(path)
    if not target.parent.is_dir():
        raise ValueError(f"folder {target.parent} does not exist; create it or write elsewhere")
    example = example_input.detach().float().cpu().contiguous()
    reference_model = copy.deepcopy(model).float().cpu().eval()
    try:
        with torch.no_grad():
            reference = reference_model(example)
    except RuntimeError as error:
        shape = "x".join(map(str, example.shape))
        raise ValueError(
            f"an input of shape {shape} does not fit the model: {str(error).splitlines()[0]}"
        ) from None
    if not isinstance(reference, Tensor):
        raise TypeError("export_onnx exports models with one tensor output")
    export, folded, gathers = _export_form(reference_model)
    for name, item in folded.items():
        _set(export, name, _build(item, "dense"))
    absorbers = _order_absorbers(export, list(folded))
    streams = find_streams(export, _shuffled_orders(folded, set(absorbers)), _Tracer())
    streaming = {name for stream in streams for name in stream.condensed}
    forms: dict[str, dict[str, nn.Module]] = {}
    leftovers: dict[str, Tensor] = {}
    for name, item in folded.items():
        forms[name], leftover = _candidates(item, name in absorbers, name in streaming)
        if leftover is not None:
            leftovers[name] = leftover
    grouped = [n for n, m in export.named_modules() if _densifiable(m) and n not in folded]
    for name in grouped:
        conv = export.get_submodule(name)
        forms[name] = {"grouped": conv, "dense": DenseGroupedConv2d.from_grouped(conv).eval()}
    inputs = _captured_inputs(export, list(forms), example)
    with tempfile.TemporaryDirectory(prefix="lgconv-export-") as temporary:
        folder = Path(temporary)
        choices = []
        for name, x in inputs.items():
            times = _runtime_ms(forms[name], x.contiguous(), runtime, folder, repeats)
            choices.append(LayerChoice(name, min(times, key=times.get), times))
        plans = {"per layer": choices, **_uniform_plans(choices, set(folded))}
        plans = {k: v for i, (k, v) in enumerate(plans.items()) if v not in list(plans.values())[:i]}
        assembled = {k: _assemble(export, forms, v, leftovers, absorbers, streams) for k, v in plans.items()}
        graphs = {k: graph for k, (graph, _) in assembled.items()}
        trials = _runtime_ms(graphs, example, runtime, folder, repeats, dynamic=True)
        chosen = min(trials, key=trials.get)
        choices = assembled[chosen][1]
        best = folder / f"trial{list(graphs).index(chosen)}.onnx"
        import onnx

        graph = onnx.load(str(best))
        permutations = permutation_gathers(graph)
        if permutations:
            raise RuntimeError(
                f"lgconv emitted a channel permutation before a convolution ({permutations[0]}); "
                "please report this"
            )
        output = compile_onnx(best, runtime)(example.numpy())
        error = _relative_error(output, reference)
        if not error <= tolerance:
            raise ExportMismatchError(
                f"the exported graph's outputs differ from the PyTorch model's in {runtime}: relative error "
                f"{error:.1e} > {tolerance:.0e}; nothing was written"
            )
        write_atomic(target, best.read_bytes())
    folded_orders = tuple(
        sorted(n for n in leftovers if n in {c.name for c in choices if c.representation == "grouped"})
    )
    return ExportReport(
        target,
        runtime,
        tuple(example.shape),
        tuple(choices),
        trials,
        chosen,
        error,
        folded_orders,
        tuple(gathers),
    )


def _uniform_plans(choices: list[LayerChoice], condensed: set[str]) -> dict[str, list[LayerChoice]]:
    """Whole-graph alternatives to the per-layer choice: every condensed layer in one representation
    where it has it (``grouped`` falling back to ``grouped+shuffle``, then ``dense_kept``, then
    ``dense``), the other layers as chosen; a runtime's fusions can favour one form throughout."""
    preferences = {
        "dense": ("dense",),
        "dense_kept": ("dense_kept", "dense"),
        "grouped": ("grouped", "grouped+shuffle", "dense_kept", "dense"),
    }
    plans = {}
    for plan, order in preferences.items():
        plans[plan] = [
            LayerChoice(c.name, next(r for r in order if r in c.candidates_ms), c.candidates_ms)
            if c.name in condensed
            else c
            for c in choices
        ]
    return plans


def _assemble(
    export: nn.Module,
    forms: dict[str, dict[str, nn.Module]],
    choices: list[LayerChoice],
    leftovers: dict[str, Tensor],
    absorbers: dict[str, tuple[list[str], str]],
    streams: list[Stream],
) -> tuple[nn.Module, list[LayerChoice]]:
    """A copy of ``export`` with every layer in its chosen form, grouped layers' orders folded forward,
    and the choices as built: a stream runs in its grouped order only when every condensed layer
    writing it is ``grouped``; otherwise those layers restore their order with a shuffle."""
    chosen = {c.name: c.representation for c in choices}
    complete = [all(chosen.get(n) == "grouped" for n in s.condensed) for s in streams]
    active = [s for s, ok in zip(streams, complete) if ok]
    demoted = {
        n for s, ok in zip(streams, complete) if not ok for n in s.condensed if chosen.get(n) == "grouped"
    }
    built = [replace(c, representation="grouped+shuffle") if c.name in demoted else c for c in choices]
    graph = copy.deepcopy(export)
    for choice in built:
        _set(graph, choice.name, copy.deepcopy(forms[choice.name][choice.representation]))
    for choice in built:
        if choice.representation == "grouped" and choice.name in leftovers and choice.name in absorbers:
            path, consumer = absorbers[choice.name]
            _absorb(graph, leftovers[choice.name], path, consumer)
    for stream in active:
        _permute_stream(graph, stream)
    return graph, built
