"""The condensify pass: decide per layer whether it can learn groups (with a reason), then swap.

``plan`` is the dry run: it returns the table of decisions and leaves the model alone.
``condensify`` applies the same plan in place and returns the model.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from lgconv import budget, module_tree
from lgconv.flops import FlopReport, _human, count_flops
from lgconv.layers import CondensedLinear
from lgconv.layers.condensed_conv import CondensedConvNd
from lgconv.layers.learned_group import Layout, LearnedGroupMixin, check_group_args

_LGCONV_LAYERS = (LearnedGroupMixin, CondensedConvNd, CondensedLinear)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POINTWISE = {1: "kernel-1", 2: "1x1", 3: "1x1x1"}
Patterns = str | Sequence[str] | None
Overrides = Mapping[str, "tuple[int, int] | None"] | None


@dataclass(frozen=True)
class LayerDecision:
    """One row of the plan: a convolution or linear layer and what condensify does with it.

    ``groups`` / ``condense_factor`` are the layer's choice (a layer kept dense by a budget has
    factor 1); ``flops`` / ``params`` / ``latency_ms`` what it costs after finalize, when the plan
    was made with an input (None otherwise); ``importance_lost`` the share of the layer's L1 weight
    importance the choice drops (the budget's accuracy proxy).
    """

    name: str
    kind: str
    shape: str
    condense: bool
    reason: str
    groups: int | None = None
    condense_factor: int | None = None
    flops: int | None = None
    params: int | None = None
    latency_ms: float | None = None
    importance_lost: float | None = None


@dataclass(frozen=True)
class CondensePlan:
    """The decisions of a condensify pass, printable as a table.

    With an input (``input_size`` / ``example_input``) the plan also says what the model costs
    after finalize: ``flops`` and ``params`` (as ``count_flops`` will count them), beside
    ``dense_flops`` / ``dense_params`` before condensing; ``latency_ms`` when a latency target was
    measured. ``targets`` holds the requested budget as absolute values (keys ``flops``,
    ``params``, ``latency_ms``). ``groups`` / ``condense_factor`` are None when chosen per layer.
    """

    decisions: tuple[LayerDecision, ...]
    groups: int | None
    condense_factor: int | None
    layout: str
    flops: int | None = None
    params: int | None = None
    dense_flops: int | None = None
    dense_params: int | None = None
    latency_ms: float | None = None
    dense_latency_ms: float | None = None
    targets: Mapping[str, float] = field(default_factory=dict)

    @property
    def eligible(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.condense]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.decisions if not d.condense]

    def _row(self, d: LayerDecision) -> tuple[str, ...]:
        decision = "condense" if d.condense else "dense" if d.condense_factor == 1 else "skip"
        row = [d.name or "(root)", d.kind, d.shape, decision]
        if self.flops is not None:
            row += [
                "-" if d.groups is None else str(d.groups),
                "-" if d.condense_factor is None else str(d.condense_factor),
                "-" if d.flops is None else _human(d.flops),
                "-" if d.params is None else _human(d.params),
                "-" if d.importance_lost is None else f"{d.importance_lost:.3f}",
            ]
            if self.latency_ms is not None:
                row.append("-" if d.latency_ms is None else f"{d.latency_ms:.3f}")
        return (*row, d.reason)

    def table(self) -> str:
        """A fixed-width table: module, type, shape, decision, (G, C, costs,) reason; then a summary."""
        header = ["module", "type", "shape", "decision"]
        if self.flops is not None:
            header += ["G", "C", "multiply-adds", "params", "lost"] + (
                ["ms"] if self.latency_ms is not None else []
            )
        rows = [(*header, "reason")] + [self._row(d) for d in self.decisions]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        if self.groups is None:
            settings = f"groups and condense_factor per layer, layout={self.layout}"
        else:
            settings = f"groups={self.groups}, condense_factor={self.condense_factor}, layout={self.layout}"
        summary = f"{len(self.eligible)} of {len(self.decisions)} layers condensed ({settings})"
        return "\n".join([*lines, summary, *self.summary_lines()])

    def summary_lines(self) -> list[str]:
        """Requested versus achieved FLOPs, parameters and latency (empty without an input)."""
        if self.flops is None:
            return []
        parts = []
        for metric, label, achieved, dense in (
            ("flops", "multiply-adds", self.flops, self.dense_flops),
            ("params", "parameters", self.params, self.dense_params),
        ):
            text = f"{label} {_human(dense)} -> {_human(achieved)} ({achieved / dense:.3f} of dense)"
            if metric in self.targets:
                wanted = self.targets[metric]
                text += (
                    f", requested {_human(wanted)} ({wanted / dense:.3f}; achieved {achieved / wanted:.3f}x)"
                )
            parts.append(text)
        if self.latency_ms is not None:
            text = f"latency {self.dense_latency_ms:.3f} ms -> {self.latency_ms:.3f} ms measured"
            if "latency_ms" in self.targets:
                wanted = self.targets["latency_ms"]
                text += f", requested {wanted:.3f} ms (achieved {self.latency_ms / wanted:.3f}x)"
            parts.append(text)
        return ["after finalize: " + "; ".join(parts)]

    def __str__(self) -> str:
        return self.table()


def _as_patterns(patterns: Patterns, argument: str) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        return (patterns,)
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{argument} must be a glob string or a list of them, got {patterns!r}")
    return tuple(patterns)


def _shape(module: nn.Module) -> str:
    conv = module.conv if isinstance(module, CondensedConvNd) else module
    if isinstance(conv, _ConvNd):
        kernel = "x".join(str(k) for k in conv.kernel_size)
        return f"{module.in_channels}->{module.out_channels} {kernel}"
    return f"{module.in_features}->{module.out_features}"


def _skip_reason(
    name: str,
    module: nn.Module,
    groups: int,
    factor: int,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    linear: bool,
    kxk: bool = False,
    replan: bool = False,
) -> str | None:
    """Why ``module`` cannot learn groups, or None when it can.

    With ``replan`` a learned group layer that has dropped nothing yet (a preset's) is a candidate
    again, so a budget can choose its groups and factor.
    """
    if isinstance(module, LearnedGroupMixin):
        if not replan:
            return f"already a {type(module).__name__}"
        if int(module.stage) > 0:
            return f"already a {type(module).__name__} that has started condensing"
        if isinstance(module, nn.Linear) and not linear:
            return "Linear layers are condensed only with linear=True"
        return _pattern_reason(name, include, exclude)
    if isinstance(module, (CondensedConvNd, CondensedLinear)):
        return "already finalized"
    if parametrize.is_parametrized(module):
        return "has parametrizations (weight_norm, spectral_norm, ...) that condensing would drop"
    is_linear = isinstance(module, nn.Linear)
    base = nn.Linear if is_linear else next((b for b in _CONVS if isinstance(module, b)), None)
    if base is None:
        return (
            f"{type(module).__name__}: only Conv1d, Conv2d, Conv3d (and Linear with linear=True) "
            "can learn groups"
        )
    if type(module) is not base:
        own_forward = type(module).forward is not base.forward
        what = "with its own forward" if own_forward else "(only plain layers are replaced)"
        return f"{type(module).__name__} is a {base.__name__} subclass {what}"
    if is_linear and not linear:
        return "Linear layers are condensed only with linear=True"
    if not is_linear:
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            return f"{kind} convolution (groups={module.groups}) is already sparse"
        if any(k != 1 for k in module.kernel_size) and not kxk:
            kernel = "x".join(str(k) for k in module.kernel_size)
            return f"kernel {kernel}: only {_POINTWISE[len(module.kernel_size)]} convolutions are condensed"
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype} is not floating point"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "has hooks registered that replacing the module would drop"
    out_features, in_features = module.weight.shape[:2]
    if out_features % groups:
        return f"out channels {out_features} not divisible by groups {groups}"
    if in_features % factor:
        return f"in channels {in_features} not divisible by condense_factor {factor}"
    return _pattern_reason(name, include, exclude)


def _pattern_reason(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> str | None:
    for pattern in exclude:
        if fnmatch.fnmatchcase(name, pattern):
            return f"excluded by pattern {pattern!r}"
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return "not matched by the include patterns"
    return None


def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _bypass_reason(
    module: nn.Module, parents: list[tuple[nn.Module, str]], sources: dict[type, str]
) -> str | None:
    """Why a replacement would be bypassed: a parent's forward uses ``self.<child>.weight`` itself.

    Such parents (torchvision's Swin attention, timm's BEiT / EVA attention) pass the raw weight to
    a functional op, so a mask applied in the child's forward would silently never be applied.
    """
    for parent, child_name in parents:
        cls = type(parent)
        if cls not in sources:
            sources[cls] = _forward_source(cls)
        pattern = rf"self\.{re.escape(child_name)}\.(weight|bias)\b(?!\.(device|dtype)\b)"
        match = re.search(pattern, sources[cls])
        if match:
            return f"{cls.__name__}.forward reads {match.group(0)} directly, bypassing the layer's forward"
    return None


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (_ConvNd, nn.Linear, *_LGCONV_LAYERS))


def _check_overrides(overrides: Overrides) -> dict[str, tuple[int, int] | None]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
        raise TypeError(
            f"overrides must map glob patterns to (groups, condense_factor) or None, got {overrides!r}"
        )
    return dict(overrides)


def _pin(name: str, overrides: Mapping[str, tuple[int, int] | None]) -> str | None:
    """The first override pattern matching ``name``, or None."""
    return next((p for p in overrides if fnmatch.fnmatchcase(name, p)), None)


def _counted(model: nn.Module, input_size: Sequence[int] | None, example: Tensor | None) -> FlopReport:
    """The model's FLOPs per sample; uncounted operators are the same before and after, so no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _count(model, input_size, example)


def _count(model: nn.Module, input_size: Sequence[int] | None, example: Tensor | None) -> FlopReport:
    if example is not None:
        if not isinstance(example, Tensor) or example.dim() < 1 or example.shape[0] < 1:
            raise TypeError(f"example_input must be a batched tensor, got {type(example).__name__}")
        return count_flops(model, inputs=example[:1])
    if isinstance(input_size, int) or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise ValueError(f"input_size must be positive integers such as (3, 224, 224), got {input_size!r}")
    return count_flops(model, tuple(input_size))


def _fixed_cost(module: nn.Module, report: FlopReport, name: str) -> tuple[int, int, int, int]:
    """(dense flops, flops, dense params, params) of a layer the plan does not change."""
    dense_flops = report.by_module(dense=True).get(name, 0)
    params = sum(p.numel() for p in module.parameters())
    if isinstance(module, LearnedGroupMixin):  # costs what it will after its last condensing stage
        inputs = module.weight.shape[1]
        kept = inputs // module.condense_factor
        return (
            dense_flops,
            dense_flops * kept // inputs,
            params,
            budget.layer_params(module, module.condense_factor),
        )
    if isinstance(module, (CondensedConvNd, CondensedLinear)):
        weight = module.weight.numel()
        inputs = getattr(module, "in_channels", getattr(module, "in_features", module.kept_inputs))
        dense_params = params + weight // module.kept_inputs * inputs - weight
        return dense_flops, report.by_module().get(name, 0), dense_params, params
    return dense_flops, dense_flops, params, params


def _unreachable(metric: str, value: float, wanted: float, smallest: float, dense: float, limit: str) -> str:
    unit = "multiply-adds" if metric == "flops" else "parameters"
    return (
        f"{budget.TARGET_NAMES[metric]}={value:g} ({_human(wanted)} {unit}) is unreachable: the smallest "
        f"achievable is {_human(smallest)} ({smallest / dense:.3f} of {_human(dense)}); {limit}"
    )


def plan(
    model: nn.Module,
    groups: int | None = None,
    condense_factor: int | None = None,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    layout: Layout = "contiguous",
    linear: bool = False,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_latency_ms: float | None = None,
    input_size: Sequence[int] | None = None,
    example_input: Tensor | None = None,
    allowed_groups: Sequence[int] | None = None,
    allowed_factors: Sequence[int] | None = None,
    overrides: Overrides = None,
    round_to: int = 1,
    kxk: bool | None = None,
) -> CondensePlan:
    """Dry run of :func:`condensify`: the decision and reason for every conv and linear layer.

    Without a target every eligible layer gets ``groups`` (default 4) and ``condense_factor``
    (default ``groups``, the paper's G = C). ``include`` / ``exclude`` are glob patterns on
    qualified module names (``"layer4.*"``). With ``target_flops`` / ``target_params`` (a fraction
    in (0, 1] of the dense model, or an absolute count) or ``target_latency_ms`` (measured on
    ``example_input``) each layer's (G, C) is chosen from ``allowed_groups`` (default: G = C) and
    ``allowed_factors`` (default 1, 2, 4, 8) where it drops the least weight importance; see the
    guide's "Condensing to a budget". ``overrides`` pins layers by glob, ``round_to`` keeps kept
    inputs and outputs per group multiples of N, ``kxk`` (default: on with a target) lets ungrouped
    kxk convolutions learn groups too. Costs are counted on ``input_size`` or ``example_input``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"condensify needs an nn.Module, got {type(model).__name__}")
    for value, argument in ((target_flops, "target_flops"), (target_params, "target_params")):
        budget.check_target(value, argument, fraction=True)
    budget.check_target(target_latency_ms, "target_latency_ms", fraction=False)
    requested = {
        m: v
        for m, v in zip(budget.METRICS, (target_flops, target_params, target_latency_ms))
        if v is not None
    }
    has_budget = bool(requested)
    if has_budget and (groups is not None or condense_factor is not None):
        raise ValueError(
            "groups / condense_factor set one choice for every layer; with a target use "
            "allowed_groups / allowed_factors (or overrides) instead"
        )
    if not has_budget and (allowed_groups is not None or allowed_factors is not None):
        raise ValueError(
            "allowed_groups / allowed_factors are the choices of a budget; give target_flops, "
            "target_params or target_latency_ms (or set groups / condense_factor)"
        )
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    if target_latency_ms is not None and example_input is None:
        raise ValueError(
            "target_latency_ms is measured on an example input: pass example_input=torch.randn(N, C, H, W) "
            "with the batch size you will serve"
        )
    if has_budget and input_size is None and example_input is None:
        declared = getattr(model, "default_input_size", None) or (
            getattr(model, "pretrained_cfg", None) or {}
        ).get("input_size")
        hint = f" (the model declares {tuple(declared)})" if declared else ""
        raise ValueError(
            f"{budget.TARGET_NAMES[next(iter(requested))]} needs an input to count on: pass "
            f"input_size=(C, H, W){hint} or example_input=tensor"
        )
    group_count = 4 if groups is None else groups
    factor = group_count if condense_factor is None else condense_factor
    check_group_args(group_count, factor, layout)
    factors = budget.check_allowed(allowed_factors, "allowed_factors") or budget.DEFAULT_FACTORS
    group_choices = budget.check_allowed(allowed_groups, "allowed_groups")
    pins = _check_overrides(overrides)
    kxk = has_budget if kxk is None else bool(kxk)
    include_patterns = _as_patterns(include, "include")
    exclude_patterns = _as_patterns(exclude, "exclude")
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():  # every name, even of a module named twice
            parents.setdefault(id(child), []).append((parent, child_name))
    sources: dict[type, str] = {}
    rows: list[tuple[str, nn.Module, str | None]] = []
    check_groups, check_factor = (1, 1) if has_budget else (group_count, factor)
    for name, module in module_tree.walk(model, stop=lambda m: isinstance(m, _LGCONV_LAYERS)):
        if not _is_layer(module):
            continue
        reason = _skip_reason(
            name,
            module,
            check_groups,
            check_factor,
            include_patterns,
            exclude_patterns,
            linear,
            kxk,
            has_budget,
        )
        if reason is None:
            reason = _bypass_reason(module, parents.get(id(module), []), sources)
        rows.append((name, module, reason))
    for pattern in pins:
        if not any(reason is None and fnmatch.fnmatchcase(name, pattern) for name, _, reason in rows):
            blocked = [(n, r) for n, _, r in rows if fnmatch.fnmatchcase(n, pattern)]
            why = f" ({blocked[0][0]} is skipped: {blocked[0][1]})" if blocked else ""
            raise ValueError(f"overrides pattern {pattern!r} matches no layer that can be condensed{why}")
    report = None
    if has_budget or input_size is not None or example_input is not None:
        report = _counted(model, input_size, example_input)
    layer_flops = report.by_module(dense=True) if report is not None else {}
    candidates: list[budget.Candidate] = []
    notes: dict[str, str] = {}
    for name, module, reason in rows:
        if reason is not None:
            continue
        own_layout = module.layout if isinstance(module, LearnedGroupMixin) else layout
        candidate = budget.Candidate(name, module, own_layout, layer_flops.get(name, 0))
        pattern = _pin(name, pins)
        if pattern is not None:
            option = budget.pinned_option(
                module, name, pattern, pins[pattern], own_layout, candidate.dense_flops
            )
            candidate.options, candidate.pinned = [option], pattern
        elif has_budget:
            candidate.options = budget.options_for(
                module, own_layout, candidate.dense_flops, factors, group_choices, round_to
            )
            if len(candidate.options) == 1:
                notes[name] = _no_fit(module, factors, group_choices, round_to)
        else:
            uniform = budget.pinned_option(
                module, name, "", (group_count, factor), own_layout, candidate.dense_flops, proxy=False
            )
            candidate.options = [uniform]
            rounding = _rounding_reason(module, group_count, factor, round_to)
            if rounding:
                candidate.options, notes[name] = (
                    [budget.pinned_option(module, name, "", None, own_layout, candidate.dense_flops)],
                    rounding,
                )
        candidates.append(candidate)
    fixed_rows = (
        {name: _fixed_cost(module, report, name) for name, module, r in rows if r is not None}
        if report
        else {}
    )
    fixed = budget.Totals(0, 0)
    if report is not None:
        fixed = budget.Totals(
            report.dense_total
            - sum(c.dense_flops for c in candidates)
            - sum(d - f for d, f, _, _ in fixed_rows.values()),
            report.dense_params
            - sum(budget.layer_params(c.module, 1) for c in candidates)
            - sum(d - p for _, _, d, p in fixed_rows.values()),
        )
    targets: dict[str, float] = {}
    if report is not None:
        dense_of = {"flops": report.dense_total, "params": report.dense_params}
        for metric, value in requested.items():
            targets[metric] = (
                budget.absolute_target(value, dense_of[metric]) if metric in dense_of else float(value)
            )
    choice = [len(c.options) - 1 if not has_budget else 0 for c in candidates]
    measured = dense_ms = None
    if has_budget:
        _check_reachable(requested, targets, dense_of, fixed, candidates, rows, fixed_rows, factors)
        if "latency_ms" in targets:
            choice, measured, dense_ms = budget.latency_search(
                model, candidates, fixed, targets, example_input
            )
        else:
            choice = budget.search(candidates, fixed, targets)
            if not choice:
                raise ValueError(f"{_target_list(requested)} cannot all be met together; give one of them")
        achieved = budget.totals(fixed, candidates, choice)
        _check_conflicts(requested, targets, achieved, dense_of)
    by_name = {c.name: (c, i) for c, i in zip(candidates, choice)}
    decisions = [
        _decision(name, module, reason, by_name.get(name), notes, fixed_rows, has_budget, report is not None)
        for name, module, reason in rows
    ]
    totals = budget.totals(fixed, candidates, choice) if report is not None else None
    return CondensePlan(
        tuple(decisions),
        None if has_budget else group_count,
        None if has_budget else factor,
        layout,
        flops=None if totals is None else int(totals.flops),
        params=None if totals is None else int(totals.params),
        dense_flops=None if report is None else report.dense_total,
        dense_params=None if report is None else report.dense_params,
        latency_ms=measured,
        dense_latency_ms=dense_ms,
        targets=targets,
    )


def _check_reachable(
    requested: Mapping[str, float],
    targets: Mapping[str, float],
    dense: Mapping[str, float],
    fixed: budget.Totals,
    candidates: Sequence[budget.Candidate],
    rows: Sequence[tuple[str, nn.Module, str | None]],
    fixed_rows: Mapping[str, tuple[int, int, int, int]],
    factors: Sequence[int],
) -> None:
    """``ValueError`` naming the smallest achievable cost, and where the rest is, for a target below it."""
    for metric in ("flops", "params"):
        if metric not in targets:
            continue
        smallest = budget.cheapest(fixed, candidates, metric)
        if smallest <= targets[metric]:
            continue
        column = 1 if metric == "flops" else 3
        stuck = {
            n: (r.split(":")[0].split(" (")[0], fixed_rows[n][column]) for n, _, r in rows if r is not None
        }
        for c in candidates:
            if len(c.options) == 1:
                why = "pinned by overrides" if c.pinned else "with no allowed factor that fits"
                stuck[c.name] = (why, c.options[0].cost(metric))
        stuck[""] = ("other operators", fixed.get(metric) - sum(cost[column] for cost in fixed_rows.values()))
        limit = (
            f"{_limits(stuck, dense[metric])} and the rest at factor {max(factors)} at most; "
            "allow larger factors (allowed_factors), kxk=True or linear=True, or give a larger target"
        )
        raise ValueError(
            _unreachable(metric, requested[metric], targets[metric], smallest, dense[metric], limit)
        )


def _decision(
    name: str,
    module: nn.Module,
    reason: str | None,
    chosen: tuple[budget.Candidate, int] | None,
    notes: Mapping[str, str],
    fixed_rows: Mapping[str, tuple[int, int, int, int]],
    has_budget: bool,
    counted: bool,
) -> LayerDecision:
    """The plan's row for one layer: a candidate with its chosen option, or a layer left as it is."""
    cost: dict[str, Any] = {}
    if chosen is not None:
        candidate, index = chosen
        option = candidate.options[index]
        condense = option.groups is not None
        if candidate.pinned is not None:
            why = f"pinned by overrides[{candidate.pinned!r}]"
        elif name in notes:
            why = notes[name]
        elif has_budget:
            why = "chosen by the budget" if condense else "kept dense: the budget is met without it"
        else:
            why = "eligible"
        cost = dict(groups=option.groups, condense_factor=option.factor)
        if has_budget or candidate.pinned is not None:
            cost["importance_lost"] = option.lost
        if counted:
            cost.update(flops=option.flops, params=option.params)
            if option.latency_ms:
                cost["latency_ms"] = option.latency_ms
    else:
        condense, why = False, reason or "eligible"
        if isinstance(module, LearnedGroupMixin):
            cost = dict(groups=module.learned_groups, condense_factor=module.condense_factor)
        elif isinstance(module, (CondensedConvNd, CondensedLinear)):
            cost = dict(groups=module.groups)
        if counted:
            _, flops, _, params = fixed_rows[name]
            cost.update(flops=flops, params=params)
    return LayerDecision(name, type(module).__name__, _shape(module), condense, why, **cost)


def _target_list(requested: Mapping[str, float]) -> str:
    return " and ".join(f"{budget.TARGET_NAMES[m]}={v:g}" for m, v in requested.items())


def _check_conflicts(
    requested: Mapping[str, float],
    targets: Mapping[str, float],
    achieved: budget.Totals,
    dense: Mapping[str, float],
) -> None:
    """With several targets, each must be met within its tolerance, not overshot because of another."""
    if len(requested) < 2:
        return
    for metric, wanted in targets.items():
        tolerance = budget.LATENCY_TOLERANCE if metric == "latency_ms" else budget.FLOP_TOLERANCE
        got = achieved.get(metric)
        if got < wanted * (1 - tolerance):
            where = f"{got / dense[metric]:.3f} of dense" if metric in dense else f"{got:.3g} ms"
            raise ValueError(
                f"{_target_list(requested)} conflict: meeting the others leaves {metric} at {where}, "
                f"{1 - got / wanted:.0%} under {budget.TARGET_NAMES[metric]}; give one of them"
            )


def _limits(stuck: Mapping[str, tuple[str, float]], dense: float) -> str:
    """Where the cost the budget cannot change is, by reason: '48% is in 16x kernel 3x3 1.85G, ...'."""
    by_reason: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for reason, cost in stuck.values():
        by_reason[reason] += cost
        counts[reason] += 1
    top = ", ".join(f"{counts[k]}x {k} {_human(v)}" for k, v in by_reason.most_common(3) if v)
    share = sum(by_reason.values()) / dense
    return f"{share:.0%} of it is in layers the budget cannot change ({top or 'none'})"


def _rounding_reason(module: nn.Module, groups: int, factor: int, round_to: int) -> str | None:
    out_features, in_features = module.weight.shape[:2]
    if (in_features // factor) % round_to or (out_features // groups) % round_to:
        return (
            f"kept inputs per group {in_features // factor} or outputs per group {out_features // groups} "
            f"not a multiple of round_to {round_to}"
        )
    return None


def _no_fit(module: nn.Module, factors: Sequence[int], groups: Sequence[int] | None, round_to: int) -> str:
    out_features, in_features = module.weight.shape[:2]
    rounding = f" with round_to {round_to}" if round_to > 1 else ""
    group_text = "G = C" if groups is None else f"groups {tuple(groups)}"
    return f"no allowed factor {tuple(factors)} ({group_text}) fits {in_features}->{out_features}{rounding}"


def condensify(
    model: nn.Module,
    groups: int | None = None,
    condense_factor: int | None = None,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    layout: Layout = "contiguous",
    linear: bool = False,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_latency_ms: float | None = None,
    input_size: Sequence[int] | None = None,
    example_input: Tensor | None = None,
    allowed_groups: Sequence[int] | None = None,
    allowed_factors: Sequence[int] | None = None,
    overrides: Overrides = None,
    round_to: int = 1,
    kxk: bool | None = None,
) -> nn.Module:
    """Replace every eligible pointwise ``Conv1d`` / ``Conv2d`` / ``Conv3d`` (kernel 1, 1x1, 1x1x1; and
    ``Linear`` if ``linear``) by its learned group form (``LearnedGroupConv1d`` / ``LearnedGroupConv``
    / ``LearnedGroupConv3d``).

    Works in place and returns the model (a new module only when ``model`` itself was replaced).
    Layers already condensified are left alone, so calling it twice is safe. Raises ``ValueError``
    when the model ends up with no learned group layer at all. The budget arguments are those of
    :func:`plan`: each layer then gets the (groups, condense_factor) the plan chose.
    """
    decisions = plan(
        model,
        groups,
        condense_factor,
        include=include,
        exclude=exclude,
        layout=layout,
        linear=linear,
        target_flops=target_flops,
        target_params=target_params,
        target_latency_ms=target_latency_ms,
        input_size=input_size,
        example_input=example_input,
        allowed_groups=allowed_groups,
        allowed_factors=allowed_factors,
        overrides=overrides,
        round_to=round_to,
        kxk=kxk,
    )
    return apply_plan(model, decisions)


def apply_plan(model: nn.Module, decisions: CondensePlan) -> nn.Module:
    """Condensify ``model`` as a plan made on it (or on a copy of it) says; see :func:`condensify`."""
    modules = dict(module_tree.walk(model, stop=lambda m: isinstance(m, _LGCONV_LAYERS)))
    replacements: dict[int, nn.Module] = {}
    for decision in decisions.decisions:
        module = modules[decision.name]
        # a re-planned learned group layer kept dense becomes G = C = 1 (see budget.build_layer)
        replanned = isinstance(module, LearnedGroupMixin) and decision.condense_factor == 1
        if not (decision.condense or replanned):
            continue
        own_layout = module.layout if isinstance(module, LearnedGroupMixin) else decisions.layout
        option = budget.Option(decision.groups, decision.condense_factor or 1, 0, 0, 0.0)
        new = budget.build_layer(module, option, own_layout)
        if new is not module:
            replacements[id(module)] = new
    model = module_tree.replace(model, replacements)
    kept_dense = any(d.condense_factor == 1 and not d.condense for d in decisions.decisions)
    if not kept_dense and not any(isinstance(m, LearnedGroupMixin) for m in model.modules()):
        reasons = Counter(d.reason.split(":")[0] for d in decisions.skipped)
        summary = "; ".join(f"{count}x {reason}" for reason, count in reasons.most_common(3))
        raise ValueError(
            f"condensify found no eligible layer in {type(model).__name__} "
            f"({len(decisions.decisions)} conv/linear layers skipped{': ' + summary if summary else ''}); "
            "print(lgconv.plan(model, ...)) shows each reason"
        )
    return model
