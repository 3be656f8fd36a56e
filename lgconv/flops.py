"""FLOP counting with fvcore, where lgconv's layers count what they really cost (multiply-adds).

One trace answers every question (total, by module, by operator, dense versus effective). A masked
learned group layer counts only its kept connections, a finalized layer's gather is free, and its
grouped convolution counts per group. The dense count is kept beside the effective one: it is what
the same network costs with every lgconv layer replaced by the dense layer it came from.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

import lgconv.kernels  # noqa: F401 - registers lgconv's native ops, counted below
from lgconv.layers.learned_group import LearnedGroupMixin

Convention = Literal["fvcore", "paper"]
CONVENTIONS: tuple[str, ...] = ("fvcore", "paper")
FVCORE = "fvcore"
TORCH_COUNTER = "torch.utils.flop_counter"

# Operators that are free in every convention: the gather of a finalized layer.
_FREE_OPS = ("aten::index_select",)
# Short operator names of FlopCounterMode, renamed to fvcore's where they differ.
_TORCH_OP_NAMES = {
    "convolution": "conv",
    "_convolution": "conv",
    "relu_": "relu",
    "_adaptive_avg_pool2d": "adaptive_avg_pool2d",
    "mean": "adaptive_avg_pool2d",
}


def _shape(value: Any) -> list[int]:
    """Complete shape of a traced jit value (fvcore traces with concrete shapes)."""
    return list(value.type().sizes())


def _constant_ints(value: Any) -> list[int]:
    """The integers of a traced constant int or int list (a ``prim::ListConstruct`` of constants)."""
    constant = value.toIValue()
    if constant is None and value.node().kind() == "prim::ListConstruct":
        constant = [item.toIValue() for item in value.node().inputs()]
    return [int(c) for c in constant] if isinstance(constant, (list, tuple)) else [int(constant)]


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


def _free_handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """Counted as zero, and not reported as unknown either."""
    return Counter()


def _relu_handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """Paper convention: one op per ReLU output element (in place or not)."""
    return Counter({"relu": _numel(_shape(outputs[0]))})


def _avg_pool_handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """Paper convention: k*k ops per average-pooled output element."""
    kernel = _constant_ints(inputs[1])
    area = _numel(kernel * 2 if len(kernel) == 1 else kernel)
    return Counter({"avg_pool2d": _numel(_shape(outputs[0])) * area})


def _adaptive_pool_handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """Paper convention: every input element is added once into its output (input elements per output)."""
    return Counter({"adaptive_avg_pool2d": _numel(_shape(inputs[0]))})


def _einsum_handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """Exact multiply-adds of a one- or two-operand einsum: the product of all index sizes.

    fvcore's own rule reads numpy's rounded printout, which is off by a few for large counts.
    """
    equation = inputs[0].toIValue().replace(" ", "").split("->")[0]
    shapes = [_shape(v) for v in inputs[1].node().inputs()]
    sizes: dict[str, int] = {}
    for term, shape in zip(equation.split(","), shapes):
        if "..." in term:
            head, tail = term.split("...")
            broadcast = len(shape) - len(head) - len(tail)
            letters = [*head, *(f"...{i}" for i in range(-broadcast, 0)), *tail]
        else:
            letters = list(term)
        for letter, size in zip(letters, shape):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    if len(shapes) > 2:
        from fvcore.nn.jit_handles import einsum_flop_jit

        return Counter({"einsum": int(einsum_flop_jit(inputs, outputs))})
    return Counter({"einsum": _numel(sizes.values())})


def _condensed_pointwise_handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """lgconv's fused condensed 1x1 conv: each output element costs its group's kept inputs."""
    return Counter({"conv": _numel(_shape(outputs[0])) * _shape(inputs[2])[1]})


def _avg_pool2x2_handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """Paper convention: 4 ops per output element of lgconv's native 2x2 average pooling."""
    return Counter({"avg_pool2d": _numel(_shape(outputs[0])) * 4})


def _grouped_conv3x3_handle(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """lgconv's native grouped 3x3 conv: each output element costs 9 taps of its group's inputs."""
    return Counter({"conv": _numel(_shape(outputs[0])) * _shape(inputs[1])[1] * 9})


def _fvcore_handles(convention: str) -> dict[str, Any]:
    """Operator handles added to fvcore's defaults for ``convention`` (None means free, no warning)."""
    handles: dict[str, Any] = dict.fromkeys(_FREE_OPS)
    handles["aten::einsum"] = _einsum_handle
    handles["lgconv::condensed_pointwise"] = _condensed_pointwise_handle
    handles["lgconv::grouped_conv3x3"] = _grouped_conv3x3_handle
    if convention == "paper":
        handles.update(
            {
                "aten::batch_norm": _free_handle,  # None would not remove fvcore's own handle
                "aten::relu": _relu_handle,
                "aten::relu_": _relu_handle,
                "aten::avg_pool2d": _avg_pool_handle,
                "lgconv::avg_pool2x2": _avg_pool2x2_handle,
                "aten::adaptive_avg_pool2d": _adaptive_pool_handle,
            }
        )
    return handles


def _torch_custom_mapping(convention: str) -> dict[Any, Any]:
    """FlopCounterMode functions (on shapes, in its 2-per-multiply-add unit): lgconv's ops, and the
    paper convention's extra operators."""

    def condensed_pointwise(
        x_shape: Sequence[int],
        index_shape: Sequence[int],
        weight_shape: Sequence[int],
        *args: Any,
        out_shape: Sequence[int],
        **kwargs: Any,
    ) -> int:
        return 2 * _numel(out_shape) * int(weight_shape[1])

    def grouped_conv3x3(
        x_shape: Sequence[int],
        weight_shape: Sequence[int],
        *args: Any,
        out_shape: Sequence[int],
        **kwargs: Any,
    ) -> int:
        return 2 * _numel(out_shape) * int(weight_shape[1]) * 9

    native = {
        torch.ops.lgconv.condensed_pointwise: condensed_pointwise,
        torch.ops.lgconv.grouped_conv3x3: grouped_conv3x3,
    }
    if convention != "paper":
        return native
    aten = torch.ops.aten

    def relu(*args: Any, out_shape: Sequence[int], **kwargs: Any) -> int:
        return 2 * _numel(out_shape)

    def avg_pool(
        x_shape: Sequence[int], kernel: Sequence[int], *args: Any, out_shape: Sequence[int], **_: Any
    ) -> int:
        kernel = list(kernel) * (2 if len(kernel) == 1 else 1)
        return 2 * _numel(out_shape) * _numel(kernel)

    def native_avg_pool(x_shape: Sequence[int], *args: Any, out_shape: Sequence[int], **kwargs: Any) -> int:
        return 2 * _numel(out_shape) * 4

    def whole_input(x_shape: Sequence[int], *args: Any, out_shape: Sequence[int], **kwargs: Any) -> int:
        return 2 * _numel(x_shape)

    return {
        **native,
        aten.relu: relu,
        aten.relu_: relu,
        aten.avg_pool2d: avg_pool,
        torch.ops.lgconv.avg_pool2x2: native_avg_pool,
        aten._adaptive_avg_pool2d: whole_input,
        aten.mean: whole_input,  # adaptive average pooling to 1x1 dispatches as a mean
    }


def _lgconv_density(module: nn.Module) -> tuple[str, int, int] | None:
    """``(kind, kept inputs, inputs)`` of an lgconv layer, None for any other module.

    Masked layers are recognised by the mixin; finalized ones (any layer with an ``index`` gather
    buffer and integer ``kept_inputs``) by duck typing, so new inference layers count without edits.
    """
    if isinstance(module, LearnedGroupMixin):
        return "masked", int(module.kept_inputs), int(module.weight.shape[1])
    index = getattr(module, "index", None)
    kept = getattr(module, "kept_inputs", None)
    inputs = getattr(module, "in_channels", getattr(module, "in_features", None))
    if isinstance(index, Tensor) and isinstance(kept, int) and isinstance(inputs, int) and kept > 0:
        return "finalized", kept, inputs
    return None


def _lgconv_layers(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    layers = {}
    for name, module in model.named_modules():
        density = _lgconv_density(module)
        if density is not None:
            layers[name] = density
    return layers


def _scaled(counts: Counter[str], numerator: int, denominator: int) -> Counter[str]:
    return Counter({op: value * numerator // denominator for op, value in counts.items()})


def _rescale(
    counts: dict[str, Counter[str]], layer: str, numerator: int, denominator: int
) -> dict[str, Counter[str]]:
    """Scale ``layer`` and its submodules by numerator/denominator and pass the change to its ancestors."""
    if layer not in counts:
        return counts
    delta = _scaled(counts[layer], numerator, denominator)
    delta.subtract(counts[layer])
    result = {}
    for name, ops in counts.items():
        if name == layer or name.startswith(layer + "."):
            result[name] = _scaled(ops, numerator, denominator)
        elif name == "" or layer.startswith(name + "."):
            updated = Counter(ops)
            updated.update(delta)
            result[name] = updated
        else:
            result[name] = ops
    return result


def _effective_and_dense(
    counts: dict[str, Counter[str]], layers: Mapping[str, tuple[str, int, int]]
) -> tuple[dict[str, Counter[str]], dict[str, Counter[str]]]:
    """From counts of the traced ops (masked layers dense, finalized ones compact) derive both views."""
    effective, dense = counts, counts
    for name, (kind, kept, inputs) in layers.items():
        if kind == "masked":
            effective = _rescale(effective, name, kept, inputs)
        else:
            dense = _rescale(dense, name, inputs, kept)
    return effective, dense


def _parameter_counts(model: nn.Module, layers: Mapping[str, tuple[str, int, int]]) -> tuple[int, int]:
    """(effective, dense) parameter counts: pruned weights of masked layers are not effective."""
    stored = sum(p.numel() for p in model.parameters())
    effective, dense = stored, stored
    modules = dict(model.named_modules())
    for name, (kind, kept, inputs) in layers.items():
        weight = getattr(modules[name], "weight", None)
        if weight is None:
            weight = modules[name].conv.weight
        if kind == "masked":
            effective -= weight.numel() - weight.numel() // inputs * kept
        else:
            dense += weight.numel() // kept * inputs - weight.numel()
    return effective, dense


def _count_with_fvcore(
    model: nn.Module, inputs: tuple[Tensor, ...], convention: str, layers: Mapping[str, tuple[str, int, int]]
) -> tuple[dict[str, Counter[str]], Counter[str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**_fvcore_handles(convention))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = {name: Counter(ops) for name, ops in analysis.by_module_and_operator().items()}
    unsupported = Counter(analysis.unsupported_ops(""))
    for name in layers:
        if name in counts:
            # Inside lgconv layers the rule above is the cost: the weight * mask product, the
            # reshapes and the bias add (which fvcore never counts for conv or linear) are not.
            unsupported.subtract(analysis.unsupported_ops(name))
    return counts, +unsupported


def _count_with_torch(
    model: nn.Module, inputs: tuple[Tensor, ...], convention: str
) -> tuple[dict[str, Counter[str]], Counter[str]]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_torch_custom_mapping(convention))
    with counter:
        model(*inputs)
    counts: dict[str, Counter[str]] = {"": Counter()}
    for scope, ops in counter.get_flop_counts().items():
        name = "" if scope == "Global" or "." not in scope else scope.split(".", 1)[1]
        short = Counter()
        for op, value in ops.items():
            op_name = str(getattr(op, "_opname", op)).split(".")[-1]
            short[_TORCH_OP_NAMES.get(op_name, op_name)] += value // 2
        counts[name] = short
    return counts, Counter()


def _first_line(error: BaseException) -> str:
    """An error message on one line, shortened: for reports and one-line CLI errors."""
    text = " ".join(str(error).split())
    return (text[:197] + "...") if len(text) > 200 else text or type(error).__name__


def _human(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3f}{suffix}"
    return str(int(value))


@dataclass(frozen=True)
class FlopReport:
    """FLOPs (multiply-adds) of one model on one input, effective and dense, by module and operator.

    ``effective`` counts what the model costs as it is: masked lgconv layers only their kept
    connections. ``dense`` counts every lgconv layer as the dense layer it replaces. Both map a
    module's qualified name (``""`` for the whole model) to its multiply-adds per operator,
    submodules included.
    """

    effective: Mapping[str, Counter[str]]
    dense: Mapping[str, Counter[str]]
    params: int
    dense_params: int
    convention: str
    counter: str
    input_shapes: tuple[tuple[int, ...], ...]
    unsupported: Counter[str] = field(default_factory=Counter)
    lgconv_layers: int = 0
    fallback_reason: str = ""

    unit = "multiply-adds"

    @property
    def total(self) -> int:
        """Effective multiply-adds of the whole model."""
        return sum(self.effective.get("", Counter()).values())

    @property
    def dense_total(self) -> int:
        """Multiply-adds with every lgconv layer counted as the dense layer it replaces."""
        return sum(self.dense.get("", Counter()).values())

    @property
    def reduction(self) -> float:
        """dense / effective multiply-adds (1.0 for a model without lgconv layers)."""
        return self.dense_total / self.total if self.total else 1.0

    def by_module(self, *, dense: bool = False) -> Counter[str]:
        """Multiply-adds of every module (submodules included), keyed by qualified name."""
        counts = self.dense if dense else self.effective
        return Counter({name: sum(ops.values()) for name, ops in counts.items()})

    def by_operator(self, module: str = "", *, dense: bool = False) -> Counter[str]:
        """Multiply-adds of ``module`` (default the whole model) per operator."""
        counts = self.dense if dense else self.effective
        if module not in counts:
            raise ValueError(f"no module named {module!r} was counted; see report.by_module() for the names")
        return Counter(counts[module])

    def unsupported_summary(self) -> str:
        """One line naming the operators the counter did not know (counted as zero), or ''."""
        if not self.unsupported:
            return ""
        ops = ", ".join(f"{op} x{n}" for op, n in self.unsupported.most_common())
        return f"not counted (no FLOP rule, counted as 0): {ops}"

    def _rows(self, by: str, depth: int) -> list[tuple[str, int, int]]:
        if by == "operator":
            effective, dense = self.by_operator(), self.by_operator(dense=True)
            return [(op, effective[op], dense[op]) for op, _ in dense.most_common()]
        if by != "module":
            raise ValueError(f"by must be 'module' or 'operator', got {by!r}")
        effective, dense = self.by_module(), self.by_module(dense=True)
        names = [n for n in self.dense if n == "" or n.count(".") < depth]
        return [(name or "(model)", effective.get(name, 0), dense.get(name, 0)) for name in names]

    def table(self, depth: int = 2, *, by: str = "module") -> str:
        """Fixed-width table of multiply-adds by module (down to ``depth`` levels) or by operator."""
        header = (by, "multiply-adds", "dense") if self.lgconv_layers else (by, "multiply-adds")
        rows = [header]
        for name, effective, dense in self._rows(by, depth):
            indent = "  " * name.count(".") if by == "module" else ""
            cells = (indent + name, _human(effective), _human(dense))
            rows.append(cells if self.lgconv_layers else cells[:2])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            )
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join([*lines, *self.summary_lines()])

    def summary_lines(self) -> list[str]:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        lines = [
            f"input {shapes}; FLOPs counted as multiply-adds by {self.counter} "
            f"({self.convention} convention)",
            f"effective: {_human(self.total)} multiply-adds, {_human(self.params)} parameters",
        ]
        if self.lgconv_layers:
            dense = f"{_human(self.dense_total)} multiply-adds, {_human(self.dense_params)} parameters"
            lines.append(
                f"dense:     {dense} ({self.reduction:.2f}x the effective multiply-adds; "
                f"{self.lgconv_layers} lgconv layers counted as the dense layers they replace)"
            )
        if self.unsupported:
            lines.append(self.unsupported_summary())
        if self.fallback_reason:
            lines.append(
                f"fvcore could not trace the model ({self.fallback_reason}), so {self.counter} counted it"
            )
        return lines

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready view: totals, per-module and per-operator multiply-adds."""
        return {
            "unit": self.unit,
            "counter": self.counter,
            "convention": self.convention,
            "input_shapes": [list(s) for s in self.input_shapes],
            "total": self.total,
            "dense_total": self.dense_total,
            "params": self.params,
            "dense_params": self.dense_params,
            "lgconv_layers": self.lgconv_layers,
            "by_operator": dict(self.by_operator()),
            "dense_by_operator": dict(self.by_operator(dense=True)),
            "by_module": dict(self.by_module()),
            "dense_by_module": dict(self.by_module(dense=True)),
            "unsupported": dict(self.unsupported),
            "fallback_reason": self.fallback_reason,
        }


def _tensor_shapes(value: Any) -> tuple[tuple[int, ...], ...]:
    """Shapes of every tensor in the inputs, nested lists / tuples / dicts too (a detector's images)."""
    if isinstance(value, Tensor):
        return (tuple(value.shape),)
    items = (
        value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else ()
    )
    return tuple(shape for item in items for shape in _tensor_shapes(item))


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """The input size (C, H, W) a model declares: lgconv presets' ``default_input_size`` or timm's cfg."""
    size = getattr(model, "default_input_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return tuple(int(s) for s in size) if size is not None else None


def _example_inputs(
    model: nn.Module,
    input_size: Sequence[int] | None,
    inputs: Tensor | Sequence[Tensor] | None,
    batch_size: int,
) -> tuple[Tensor, ...]:
    if inputs is not None:
        return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    size = tuple(input_size) if input_size is not None else default_input_size(model)
    if size is None:
        raise ValueError(
            f"count_flops does not know the input size of {type(model).__name__}; "
            "pass input_size=(C, H, W) or inputs=example_tensor"
        )
    if not all(isinstance(s, int) and s > 0 for s in size) or batch_size < 1:
        raise ValueError(
            f"input size must be positive integers (C, H, W) and batch >= 1, got {size}, {batch_size}"
        )
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    return (torch.randn(batch_size, *size, device=device, dtype=dtype),)


def count_flops(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    inputs: Tensor | Sequence[Tensor] | None = None,
    batch_size: int = 1,
    convention: Convention = "fvcore",
) -> FlopReport:
    """Count the multiply-adds of ``model`` on a random input of ``input_size`` (C, H, W) or ``inputs``.

    Counted with fvcore (jit trace) plus lgconv's rules; when the trace fails, with
    ``torch.utils.flop_counter`` instead (``report.counter`` says which). ``convention="paper"``
    counts like the CondenseNet paper: conv and linear multiply-adds, one op per ReLU output, k*k per
    average-pooled output, batch norm free. The model runs once, in eval mode, without gradients.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    example = _example_inputs(model, input_size, inputs, batch_size)
    layers = _lgconv_layers(model)
    was_training = [(m, m.training) for m in model.modules()]
    for module, _ in was_training:
        module.training = False  # not .eval(): exported programs refuse it, and no hook should run
    # FlopCounterMode's module tracker wants a gradient function for every input that requires
    # grad; a parameter fed to a submodule (ViT tokens) has none under no_grad, unless frozen.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        with torch.no_grad():
            try:
                counts, unsupported = _count_with_fvcore(model, example, convention, layers)
                counter, fallback_reason = FVCORE, ""
            except Exception as fvcore_error:  # any trace failure: count with the other counter
                try:
                    counts, unsupported = _count_with_torch(model, example, convention)
                except Exception as error:
                    shapes = ", ".join("x".join(map(str, s)) for s in _tensor_shapes(example))
                    reason = (
                        str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    )
                    raise ValueError(
                        f"{type(model).__name__} failed on an input of shape {shapes} ({reason}); "
                        "pass an input size the model accepts (CLI: --input-size C H W)"
                    ) from fvcore_error
                counter, fallback_reason = TORCH_COUNTER, _first_line(fvcore_error)
    finally:
        for module, training in was_training:
            module.training = training
        for parameter in trainable:
            parameter.requires_grad_(True)
    effective, dense = _effective_and_dense(counts, layers)
    params, dense_params = _parameter_counts(model, layers)
    report = FlopReport(
        effective=effective,
        dense=dense,
        params=params,
        dense_params=dense_params,
        convention=convention,
        counter=counter,
        input_shapes=_tensor_shapes(example),
        unsupported=unsupported,
        lgconv_layers=len(layers),
        fallback_reason=fallback_reason,
    )
    if unsupported:
        warnings.warn(report.unsupported_summary(), stacklevel=2)
    return report
