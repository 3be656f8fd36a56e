"""The condensify pass: decide per layer whether it can learn groups (with a reason), then swap.

``plan`` is the dry run: it returns the table of decisions and leaves the model alone.
``condensify`` applies the same plan in place and returns the model.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from lgconv import module_tree
from lgconv.layers import CondensedConv2d, CondensedLinear, LearnedGroupConv, LearnedGroupLinear
from lgconv.layers.learned_group import Layout, LearnedGroupMixin, check_group_args

_LGCONV_LAYERS = (LearnedGroupMixin, CondensedConv2d, CondensedLinear)
Patterns = str | Sequence[str] | None


@dataclass(frozen=True)
class LayerDecision:
    """One row of the plan: a convolution or linear layer and what condensify does with it."""

    name: str
    kind: str
    shape: str
    condense: bool
    reason: str


@dataclass(frozen=True)
class CondensePlan:
    """The decisions of a condensify pass, printable as a table."""

    decisions: tuple[LayerDecision, ...]
    groups: int
    condense_factor: int
    layout: str

    @property
    def eligible(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.condense]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.decisions if not d.condense]

    def table(self) -> str:
        """A fixed-width table: module, type, shape, decision, reason."""
        header = ("module", "type", "shape", "decision", "reason")
        rows = [header] + [
            (d.name or "(root)", d.kind, d.shape, "condense" if d.condense else "skip", d.reason)
            for d in self.decisions
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        summary = (
            f"{len(self.eligible)} of {len(self.decisions)} layers condensed "
            f"(groups={self.groups}, condense_factor={self.condense_factor}, layout={self.layout})"
        )
        return "\n".join([*lines, summary])

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
    conv = module.conv if isinstance(module, CondensedConv2d) else module
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
) -> str | None:
    """Why ``module`` cannot learn groups, or None when it can."""
    if isinstance(module, LearnedGroupMixin):
        return f"already a {type(module).__name__}"
    if isinstance(module, (CondensedConv2d, CondensedLinear)):
        return "already finalized"
    if parametrize.is_parametrized(module):
        return "has parametrizations (weight_norm, spectral_norm, ...) that condensing would drop"
    is_linear = isinstance(module, nn.Linear)
    base = nn.Linear if is_linear else nn.Conv2d
    if not isinstance(module, base):
        return f"{type(module).__name__}: only Conv2d (and Linear with linear=True) can learn groups"
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
        if tuple(module.kernel_size) != (1, 1):
            kernel = "x".join(str(k) for k in module.kernel_size)
            return f"kernel {kernel}: only 1x1 convolutions are condensed"
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype} is not floating point"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "has hooks registered that replacing the module would drop"
    out_features, in_features = module.weight.shape[:2]
    if out_features % groups:
        return f"out channels {out_features} not divisible by groups {groups}"
    if in_features % factor:
        return f"in channels {in_features} not divisible by condense_factor {factor}"
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


def plan(
    model: nn.Module,
    groups: int = 4,
    condense_factor: int | None = None,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    layout: Layout = "contiguous",
    linear: bool = False,
) -> CondensePlan:
    """Dry run of :func:`condensify`: the decision and reason for every conv and linear layer.

    ``condense_factor`` defaults to ``groups`` (the paper's G = C). ``include`` / ``exclude`` are
    glob patterns on qualified module names (``"layer4.*"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"condensify needs an nn.Module, got {type(model).__name__}")
    factor = groups if condense_factor is None else condense_factor
    check_group_args(groups, factor, layout)
    include_patterns = _as_patterns(include, "include")
    exclude_patterns = _as_patterns(exclude, "exclude")
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():  # every name, even of a module named twice
            parents.setdefault(id(child), []).append((parent, child_name))
    sources: dict[type, str] = {}
    decisions = []
    for name, module in module_tree.walk(model, stop=lambda m: isinstance(m, _LGCONV_LAYERS)):
        if not _is_layer(module):
            continue
        reason = _skip_reason(name, module, groups, factor, include_patterns, exclude_patterns, linear)
        if reason is None:
            reason = _bypass_reason(module, parents.get(id(module), []), sources)
        decisions.append(
            LayerDecision(name, type(module).__name__, _shape(module), reason is None, reason or "eligible")
        )
    return CondensePlan(tuple(decisions), groups, factor, layout)


def condensify(
    model: nn.Module,
    groups: int = 4,
    condense_factor: int | None = None,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    layout: Layout = "contiguous",
    linear: bool = False,
) -> nn.Module:
    """Replace every eligible 1x1 ``Conv2d`` (and ``Linear`` if ``linear``) by its learned group form.

    Works in place and returns the model (a new module only when ``model`` itself was replaced).
    Layers already condensified are left alone, so calling it twice is safe. Raises ``ValueError``
    when the model ends up with no learned group layer at all.
    """
    decisions = plan(
        model,
        groups,
        condense_factor,
        include=include,
        exclude=exclude,
        layout=layout,
        linear=linear,
    )
    modules = dict(module_tree.walk(model, stop=lambda m: isinstance(m, _LGCONV_LAYERS)))
    replacements: dict[int, nn.Module] = {}
    for decision in decisions.eligible:
        module = modules[decision.name]
        if isinstance(module, nn.Linear):
            new = LearnedGroupLinear.from_linear(module, groups, decisions.condense_factor, layout)
        else:
            new = LearnedGroupConv.from_conv(module, groups, decisions.condense_factor, layout)
        replacements[id(module)] = new
    model = module_tree.replace(model, replacements)
    if not any(isinstance(m, LearnedGroupMixin) for m in model.modules()):
        reasons = Counter(d.reason.split(":")[0] for d in decisions.skipped)
        summary = "; ".join(f"{count}x {reason}" for reason, count in reasons.most_common(3))
        raise ValueError(
            f"condensify found no eligible layer in {type(model).__name__} "
            f"({len(decisions.decisions)} conv/linear layers skipped{': ' + summary if summary else ''}); "
            "print(lgconv.plan(model, ...)) shows each reason"
        )
    return model
