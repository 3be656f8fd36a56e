"""Condensing to a budget: per-layer (groups, condense_factor) chosen to meet a FLOP, parameter or
latency target while dropping as little weight importance as possible.

Cost model: after ``finalize`` a layer with factor C keeps ``in / C`` inputs per group, so it costs
``dense / C`` multiply-adds and ``weight / C`` parameters whatever its groups (``count_flops``
counts the gather as free). Latency comes from a per-layer table, measured on the input each layer
sees with the kernels ``optimize_for_inference`` picks, then checked on the whole optimised model.

Accuracy proxy: the share of a layer's L1 importance (``sum |W[o, j]|`` over a group's outputs,
as the layers' own ``importance()``) that the best assignment for (G, C) drops, i.e. each group
keeping its ``in / C`` most important inputs. A greedy multiple-choice knapsack spends the budget
where the most cost is saved per squared share lost (``Option.penalty``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lgconv import module_tree
from lgconv.finalize import finalize
from lgconv.inference import optimize_for_inference
from lgconv.layers import CondensedConv2d, CondensedLinear, LearnedGroupLinear
from lgconv.layers.condensed_conv import CondensedConvNd, condensed_conv_type
from lgconv.layers.learned_group import LearnedGroupMixin
from lgconv.layers.learned_group_conv import learned_group_conv_type

DEFAULT_FACTORS = (1, 2, 4, 8)
_STOP = (LearnedGroupMixin, CondensedConvNd, CondensedLinear)
FLOP_TOLERANCE = 0.02  # FLOP and parameter targets are met within 2% below the target
LATENCY_TOLERANCE = 0.10  # latency targets within 10%, measured on the whole optimised model
_LATENCY_TRIALS = 4
_MIN_SAMPLE_S = 2e-3
_WARMUP_ROUNDS = 3
_DP_UNITS = 20_000  # cost resolution of the single-target knapsack
METRICS = ("flops", "params", "latency_ms")
TARGET_NAMES = {"flops": "target_flops", "params": "target_params", "latency_ms": "target_latency_ms"}


@dataclass(frozen=True)
class Option:
    """One way to build a layer: dense (``groups=None``) or learned groups with factor C."""

    groups: int | None
    factor: int
    flops: int
    params: int
    lost: float  # share of the layer's L1 importance this choice drops
    latency_ms: float = 0.0

    def cost(self, metric: str) -> float:
        return float(getattr(self, metric))

    @property
    def penalty(self) -> float:
        """What the search minimises: the squared share lost (a second-order loss model, as in
        Optimal Brain Damage; squaring spreads a budget instead of emptying the biggest layers)."""
        return self.lost**2


@dataclass
class Candidate:
    """A layer whose groups and factor the budget chooses (``options[0]`` is the least condensed)."""

    name: str
    module: nn.Module
    layout: str
    dense_flops: int
    options: list[Option] = field(default_factory=list)
    pinned: str | None = None  # the override pattern that pinned it


@dataclass(frozen=True)
class Totals:
    """What a whole model costs after finalize: fixed part plus the chosen option of every candidate."""

    flops: float
    params: float
    latency_ms: float = 0.0

    def get(self, metric: str) -> float:
        return float(getattr(self, metric))


def check_target(value: float | None, argument: str, *, fraction: bool) -> None:
    """``ValueError`` unless ``value`` is None or a positive number (a fraction must be at most 1)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        what = "a fraction in (0, 1] or an absolute count > 1" if fraction else "a positive number"
        raise ValueError(f"{argument} must be {what}, got {value!r}")


def absolute_target(value: float, dense: float) -> float:
    """A fraction in (0, 1] of the dense cost, or an absolute count above 1."""
    return value * dense if value <= 1 else float(value)


def check_allowed(values: Sequence[int] | None, argument: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, int) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
    ):
        raise ValueError(f"{argument} must be a list of positive integers, e.g. (1, 2, 4, 8); got {values!r}")
    if not values:
        raise ValueError(f"{argument} is empty; give at least one value, e.g. (1, 2, 4, 8)")
    return tuple(sorted(set(values)))


class ImportanceProfile:
    """A layer's L1 importance per group, sorted once per group count, so every (G, C) is a lookup."""

    def __init__(self, module: nn.Module, layout: str) -> None:
        weight = module.weight.detach()
        out_features, in_features = weight.shape[:2]
        dtype = torch.promote_types(weight.dtype, torch.float32)
        self.magnitude = weight.abs().reshape(out_features, in_features, -1).sum(-1, dtype=dtype)
        self.layout = layout
        self._sorted: dict[int, Tensor] = {}

    def lost(self, groups: int, factor: int) -> float:
        """Share of the importance dropped when every group keeps its in/C most important inputs."""
        if groups not in self._sorted:
            out_features, in_features = self.magnitude.shape
            if self.layout == "contiguous":
                by_group = self.magnitude.reshape(groups, out_features // groups, in_features).sum(1)
            else:
                by_group = self.magnitude.reshape(out_features // groups, groups, in_features).sum(0)
            ranked = by_group.double().sort(dim=1, descending=True).values
            self._sorted[groups] = ranked.cumsum(1).sum(0)
        kept_sum = self._sorted[groups]
        total = float(kept_sum[-1])
        if not math.isfinite(total) or total <= 0:
            return 1.0 - 1.0 / factor  # no usable weights: every choice drops its share of inputs
        kept = float(kept_sum[kept_sum.numel() // factor - 1])
        return max(0.0, 1.0 - kept / total)


def importance_lost(module: nn.Module, groups: int, factor: int, layout: str) -> float:
    """Share of the layer's L1 importance dropped when every group keeps its in/C best inputs."""
    return ImportanceProfile(module, layout).lost(groups, factor)


def layer_params(module: nn.Module, factor: int) -> int:
    bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    return module.weight.numel() // factor + bias


def options_for(
    module: nn.Module,
    layout: str,
    dense_flops: int,
    factors: Sequence[int],
    groups: Sequence[int] | None,
    round_to: int,
) -> list[Option]:
    """Dense plus every allowed (G, C) whose channel counts divide (and are multiples of round_to)."""
    out_features, in_features = module.weight.shape[:2]
    profile = ImportanceProfile(module, layout)
    options = [Option(None, 1, dense_flops, layer_params(module, 1), 0.0)]
    for factor in factors:
        if factor == 1 or in_features % factor or (in_features // factor) % round_to:
            continue
        for group in (factor,) if groups is None else groups:
            if out_features % group or (out_features // group) % round_to:
                continue
            options.append(
                Option(
                    group,
                    factor,
                    dense_flops * (in_features // factor) // in_features,
                    layer_params(module, factor),
                    profile.lost(group, factor),
                )
            )
    return options


def pinned_option(
    module: nn.Module,
    name: str,
    pattern: str,
    choice: tuple[int, int] | None,
    layout: str,
    dense_flops: int,
    *,
    proxy: bool = True,
) -> Option:
    """The single option an override pins, or ``ValueError`` when its (G, C) cannot fit the layer.

    ``proxy=False`` skips measuring the importance lost (a uniform plan without a budget)."""
    if choice is None:
        return Option(None, 1, dense_flops, layer_params(module, 1), 0.0)
    if (
        not isinstance(choice, tuple)
        or len(choice) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in choice)
    ):
        raise ValueError(f"overrides[{pattern!r}] must be (groups, condense_factor) or None, got {choice!r}")
    group, factor = choice
    out_features, in_features = module.weight.shape[:2]
    if out_features % group or in_features % factor:
        raise ValueError(
            f"overrides[{pattern!r}] = {choice} does not fit {name} ({in_features}->{out_features}): "
            f"groups must divide {out_features} and condense_factor must divide {in_features}"
        )
    return Option(
        group,
        factor,
        dense_flops * (in_features // factor) // in_features,
        layer_params(module, factor),
        importance_lost(module, group, factor, layout) if proxy else 0.0,
    )


def totals(fixed: Totals, candidates: Sequence[Candidate], choice: Sequence[int]) -> Totals:
    return Totals(
        *(fixed.get(m) + sum(c.options[i].cost(m) for c, i in zip(candidates, choice)) for m in METRICS)
    )


def _score(saved: dict[str, float], extra_loss: float) -> float:
    return sum(saved.values()) / max(extra_loss, 1e-12)


def search(candidates: Sequence[Candidate], fixed: Totals, targets: Mapping[str, float]) -> list[int]:
    """Option index per candidate meeting every target with the least total penalty, or ``[]``.

    One target: an exact multiple-choice knapsack over costs in small units (rounded up, so the
    target holds), then the slack the rounding left is filled. Several: a greedy (see _greedy).
    """
    if len(targets) != 1:
        return _greedy(candidates, fixed, targets)
    ((metric, target),) = targets.items()
    room = target - fixed.get(metric)
    if room < sum(min(o.cost(metric) for o in c.options) for c in candidates):
        return []
    unit = max(room, 1e-12) / _DP_UNITS
    best = torch.full((_DP_UNITS + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for candidate in candidates:
        stacked = torch.full((len(candidate.options), _DP_UNITS + 1), math.inf, dtype=torch.float64)
        for j, option in enumerate(candidate.options):
            width = min(math.ceil(option.cost(metric) / unit - 1e-9), _DP_UNITS + 1)
            if width <= _DP_UNITS:
                stacked[j, width:] = best[: _DP_UNITS + 1 - width] + option.penalty
        best, pick = stacked.min(0)
        picks.append(pick)
    end = int(best.argmin())
    if not math.isfinite(float(best[end])):
        return []
    choice = []
    for candidate, pick in zip(reversed(candidates), reversed(picks)):
        j = int(pick[end])
        choice.append(j)
        end -= min(math.ceil(candidate.options[j].cost(metric) / unit - 1e-9), end)
    choice.reverse()
    current = {metric: totals(fixed, candidates, choice).get(metric)}
    return _fill(candidates, choice, current, targets)


def _greedy(candidates: Sequence[Candidate], fixed: Totals, targets: Mapping[str, float]) -> list[int]:
    """Option index per candidate meeting every target, greedy by cost saved per penalty added.

    Start from the least condensed options; repeatedly take the switch that saves the most unmet
    cost (relative to its target) per penalty added, until every target is met; then fill the
    slack the last big step left. Returns ``[]`` when no choice meets the targets.
    """
    choice = [0] * len(candidates)
    now = totals(fixed, candidates, choice)
    current = {m: now.get(m) for m in targets}
    while any(current[m] > targets[m] for m in targets):
        best: tuple[float, int, int] | None = None
        for i, candidate in enumerate(candidates):
            here = candidate.options[choice[i]]
            for j, option in enumerate(candidate.options):
                saved = {
                    m: min(here.cost(m) - option.cost(m), current[m] - targets[m]) / targets[m]
                    for m in targets
                    if current[m] > targets[m]
                }
                if j == choice[i] or sum(saved.values()) <= 0:
                    continue
                score = _score(saved, option.penalty - here.penalty)
                if best is None or score > best[0]:
                    best = (score, i, j)
        if best is None:
            return []
        _, i, j = best
        for m in targets:
            current[m] += candidates[i].options[j].cost(m) - candidates[i].options[choice[i]].cost(m)
        choice[i] = j
    return _fill(candidates, choice, current, targets)


def _fill(
    candidates: Sequence[Candidate],
    choice: list[int],
    current: dict[str, float],
    targets: Mapping[str, float],
) -> list[int]:
    """Hand back, while every target still holds, the switches that remove the most penalty."""
    while True:
        best = None
        for i, candidate in enumerate(candidates):
            here = candidate.options[choice[i]]
            for j, option in enumerate(candidate.options):
                gain = here.penalty - option.penalty
                if gain <= 0:
                    continue
                if any(current[m] + option.cost(m) - here.cost(m) > targets[m] for m in targets):
                    continue
                if best is None or gain > best[0]:
                    best = (gain, i, j)
        if best is None:
            return choice
        _, i, j = best
        for m in targets:
            current[m] += candidates[i].options[j].cost(m) - candidates[i].options[choice[i]].cost(m)
        choice[i] = j


def cheapest(fixed: Totals, candidates: Sequence[Candidate], metric: str) -> float:
    """The smallest total ``metric`` any choice reaches (every candidate at its cheapest option)."""
    return fixed.get(metric) + sum(min(o.cost(metric) for o in c.options) for c in candidates)


# Latency: a per-layer table measured with the optimised kernels, then whole-model trials.


def build_layer(module: nn.Module, option: Option, layout: str) -> nn.Module:
    """The training form of ``module`` for ``option``, sharing its parameters.

    Dense leaves a plain layer alone; a learned group layer being re-planned becomes one with
    G = C = 1 (never condensed), so a preset's saved structure still lists it.
    """
    groups, factor = (1, 1) if option.groups is None else (option.groups, option.factor)
    if option.groups is None and not isinstance(module, LearnedGroupMixin):
        return module
    if isinstance(module, LearnedGroupMixin) and (module.learned_groups, module.condense_factor) == (
        groups,
        factor,
    ):
        return module
    if isinstance(module, nn.Linear):
        return LearnedGroupLinear.from_linear(module, groups, factor, layout)
    return learned_group_conv_type(module).from_conv(module, groups, factor, layout)


def _inference_form(module: nn.Module, option: Option, layout: str) -> nn.Module:
    """The layer as it serves: condensed on its current weights and finalized (dense: as it is)."""
    layer = build_layer(copy.deepcopy(module), option, layout).eval()
    if not isinstance(layer, LearnedGroupMixin):
        return layer
    while not layer.fully_condensed:
        layer.condense()
    if isinstance(layer, LearnedGroupLinear):
        return CondensedLinear.from_learned(layer)
    return condensed_conv_type(layer).from_learned(layer)


def _median_ms_each(calls: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median milliseconds per call of each function, timed in interleaved rounds."""
    for _ in range(_WARMUP_ROUNDS):  # first calls of a fresh model build kernels and caches
        for call in calls:
            call()
    start = time.perf_counter()
    for call in calls:
        call()
    per_round = max(time.perf_counter() - start, 1e-9)
    count = max(1, math.ceil(_MIN_SAMPLE_S * len(calls) / per_round))
    samples: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, times in zip(calls, samples):
            start = time.perf_counter()
            for _ in range(count):
                call()
            times.append((time.perf_counter() - start) / count)
    return [statistics.median(times) * 1e3 for times in samples]


def _layer_inputs(model: nn.Module, names: Sequence[str], example: Tensor) -> dict[str, Tensor]:
    modules = dict(model.named_modules())
    captured: dict[str, Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured.setdefault(name, args[0].detach().clone())

        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _optimised(layer: nn.Module, x: Tensor) -> nn.Module:
    if not isinstance(layer, CondensedConv2d):
        return layer
    return optimize_for_inference(nn.Sequential(layer).eval(), x)


def measure_layers(
    model: nn.Module, candidates: Sequence[Candidate], example: Tensor, repeats: int = 5
) -> None:
    """Fill every option's ``latency_ms``: its optimised inference form timed on the layer's input.

    The options of one layer are timed in interleaved rounds, each on the input's own memory
    format and on channels-last (the whole-model pass picks one format; the faster counts).
    """
    inputs = _layer_inputs(model, [c.name for c in candidates], example)
    for candidate in candidates:
        x = inputs.get(candidate.name)
        if x is None:  # never called on this input: it costs nothing
            continue
        formats = [x]
        if x.dim() == 4:
            formats.append(x.contiguous(memory_format=torch.channels_last))
        calls = []
        with torch.inference_mode():
            for option in candidate.options:
                layer = _optimised(_inference_form(candidate.module, option, candidate.layout), x)
                calls.extend((lambda layer=layer, x=xf: layer(x)) for xf in formats)
            with torch.no_grad():
                times = _median_ms_each(calls, repeats)
        per_option = [min(times[k : k + len(formats)]) for k in range(0, len(times), len(formats))]
        candidate.options = [
            Option(o.groups, o.factor, o.flops, o.params, o.lost, ms)
            for o, ms in zip(candidate.options, per_option)
        ]


def apply(model: nn.Module, candidates: Sequence[Candidate], choice: Sequence[int]) -> nn.Module:
    """Build every candidate of ``model`` (found by name) as its chosen option; returns the new root."""
    modules = dict(module_tree.walk(model, stop=lambda m: isinstance(m, _STOP)))
    replacements = {}
    for candidate, index in zip(candidates, choice):
        module = modules[candidate.name]
        new = build_layer(module, candidate.options[index], candidate.layout)
        if new is not module:
            replacements[id(module)] = new
    return module_tree.replace(model, replacements)


def measure_model(
    model: nn.Module, candidates: Sequence[Candidate], choice: Sequence[int], example: Tensor
) -> float:
    """Milliseconds of a copy of the model built as ``choice``, condensed on today's weights,
    finalized and optimised on ``example`` (what serving it after training would cost)."""
    trial = apply(copy.deepcopy(model), candidates, choice).eval()
    for module in trial.modules():
        if isinstance(module, LearnedGroupMixin):
            while not module.fully_condensed:
                module.condense()
    if any(isinstance(m, LearnedGroupMixin) for m in trial.modules()):
        trial = finalize(trial)
    if any(isinstance(m, CondensedConv2d) for m in trial.modules()):
        trial = optimize_for_inference(trial, example)
    with torch.inference_mode():
        return _median_ms_each([lambda: trial(example)], 7)[0]


def latency_search(
    model: nn.Module,
    candidates: Sequence[Candidate],
    fixed: Totals,
    targets: Mapping[str, float],
    example: Tensor,
) -> tuple[list[int], float, float]:
    """Search on the per-layer table, then correct it by whole-model trials.

    Returns the choice, its measured milliseconds and those of the model with every candidate dense.

    The table misses what layers share (memory format, cache, folded batch norms), so each trial
    rescales the latency the table must reach by measured / predicted and searches again; the
    trial closest to the target wins.
    """
    measure_layers(model, candidates, example)
    base = measure_model(model, candidates, [0] * len(candidates), example)
    fixed = Totals(fixed.flops, fixed.params, base - sum(c.options[0].latency_ms for c in candidates))
    wanted = targets["latency_ms"]
    smallest = cheapest(fixed, candidates, "latency_ms")
    if smallest > wanted:
        raise ValueError(
            f"target_latency_ms={wanted:g} is unreachable: the fastest choice is predicted at "
            f"{smallest:.3g} ms (dense model {base:.3g} ms, of which {fixed.latency_ms:.3g} ms in layers "
            "the budget cannot change); allow larger factors or give a larger target"
        )
    goal = dict(targets)
    tried: list[tuple[float, list[int]]] = []
    for _ in range(_LATENCY_TRIALS):
        choice = search(candidates, fixed, goal)
        if not choice:
            break
        measured = base if not any(choice) else measure_model(model, candidates, choice, example)
        tried.append((measured, choice))
        if (1 - LATENCY_TOLERANCE) * wanted <= measured <= wanted:
            break
        predicted = totals(fixed, candidates, choice).latency_ms
        goal["latency_ms"] = max(wanted * predicted / measured, smallest)
    if not tried:
        raise ValueError(f"target_latency_ms={wanted:g} cannot be met together with the other targets")

    def rank(trial: tuple[float, list[int]]) -> tuple[bool, bool, float]:
        """Met within the tolerance first, then not over the target, then the closest."""
        ms = trial[0]
        return abs(ms - wanted) > LATENCY_TOLERANCE * wanted, ms > wanted, abs(ms - wanted)

    measured, choice = min(tried, key=rank)
    if measured > (1 + LATENCY_TOLERANCE) * wanted:
        raise ValueError(
            f"target_latency_ms={wanted:g} was not met: the closest of {len(tried)} measured trials took "
            f"{measured:.3g} ms (dense model {base:.3g} ms; the per-layer table promised more than the whole "
            "model gives); give a larger target or allow larger factors"
        )
    return choice, measured, base
