"""CondensationScheduler: turns training progress into condensing stages and the group-lasso term.

Progress is ``step / total_steps``. A layer with condensation factor C drops inputs C - 1 times,
evenly spread over ``[0, condense_end]`` (the paper: the first half of training). All pruning
happens in :meth:`CondensationScheduler.step`, never in ``forward``, and only reads state held by
the scheduler and the layers' buffers, so two models, EMA copies, DDP and compiled models coexist.
"""

from __future__ import annotations

import numbers
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lgconv.layers.learned_group import LearnedGroupMixin


def learned_group_layers(model: nn.Module) -> list[tuple[str, LearnedGroupMixin]]:
    """All learned group layers below ``model`` (through DDP and torch.compile wrappers too)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LearnedGroupMixin)]


def copy_masks(source: nn.Module, target: nn.Module) -> None:
    """Copy masks and stages from ``source`` to ``target`` (an EMA or averaged copy of it).

    Layers are matched in module order, so a DDP- or compile-wrapped source matches its plain copy.
    Masks are copied, never averaged: an averaged mask would no longer be 0/1.
    """
    _copy_layer_masks(learned_group_layers(source), learned_group_layers(target))


def _copy_layer_masks(
    sources: list[tuple[str, LearnedGroupMixin]], targets: list[tuple[str, LearnedGroupMixin]]
) -> None:
    if len(sources) != len(targets):
        raise ValueError(
            f"copy_masks: source has {len(sources)} learned group layers, target {len(targets)}; "
            "the target must be a copy of the source model"
        )
    with torch.no_grad():
        for (name, src), (_, dst) in zip(sources, targets):
            if src.mask.shape != dst.mask.shape:
                raise ValueError(
                    f"copy_masks: layer {name!r} has mask {tuple(src.mask.shape)} in "
                    f"the source but {tuple(dst.mask.shape)} in the target"
                )
            for buffer in ("mask", "stage", "kept_inputs"):
                getattr(dst, buffer).copy_(getattr(src, buffer))


class CondensationScheduler:
    """Condense the learned group layers of ``model`` as training progresses; call ``step()`` once
    per optimizer step.

    Args:
        model: a condensified model, optionally wrapped in DDP or ``torch.compile``.
        total_steps: optimizer steps in the whole training run.
        lasso: weight of the group-lasso term returned by :meth:`lasso_loss` (0 disables it).
        condense_end: progress in (0, 1] at which the last drop happens (paper: 0.5).
        process_group: under ``torch.distributed``, masks are broadcast from its first rank after
            every drop so all ranks hold the same ones (default: the world group).
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        *,
        lasso: float = 0.0,
        condense_end: float = 0.5,
        process_group: Any = None,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not 0.0 < float(condense_end) <= 1.0:
            raise ValueError(f"condense_end must be in (0, 1], got {condense_end!r}")
        if float(lasso) < 0.0:
            raise ValueError(f"lasso must be >= 0, got {lasso!r}")
        self.layers = learned_group_layers(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no learned group layers; "
                "call lgconv.condensify(model, ...) before creating the scheduler"
            )
        self.total_steps = int(total_steps)
        self.lasso = float(lasso)
        self.condense_end = float(condense_end)
        self.process_group = process_group
        self.step_count = 0
        self._factors = sorted({layer.condense_factor for _, layer in self.layers})
        self._applied: dict[int, int] = {}

    @property
    def progress(self) -> float:
        """Training progress in [0, 1]."""
        return min(self.step_count / self.total_steps, 1.0)

    @property
    def _end(self) -> Fraction:
        """``condense_end`` as a fraction, so stage boundaries are exact (0.1 * 12 is not 1.2 in floats)."""
        return Fraction(self.condense_end).limit_denominator(1_000_000)

    @property
    def condensing(self) -> bool:
        """True until the last condensing stage is due; the lasso term is active meanwhile."""
        return Fraction(self.step_count, self.total_steps) < self._end

    def target_stage(self, condense_factor: int) -> int:
        """Stages due now for a layer with this factor: stage k once progress >= k / (C-1) * condense_end."""
        drops = condense_factor - 1
        end = self._end
        due = (self.step_count * drops * end.denominator) // (end.numerator * self.total_steps)
        return min(due, drops)

    def step(self) -> bool:
        """Advance one optimizer step and perform every condensing stage now due, missed ones too.

        Returns True when a layer dropped inputs in this step (the moment to re-estimate batch
        norm, see :func:`lgconv.recalibrate_batch_norm`).
        """
        self.step_count += 1
        return self._apply_due_stages()

    def _apply_due_stages(self) -> bool:
        targets = {factor: self.target_stage(factor) for factor in self._factors}
        if targets == self._applied:
            return False
        changed = []
        for _, layer in self.layers:
            target = targets[layer.condense_factor]
            if target == self._applied.get(layer.condense_factor):
                continue
            while int(layer.stage) < target:
                layer.condense()
                changed.append(layer)
        self._applied = targets
        if changed:
            self._broadcast(changed)
        return bool(changed)

    def _broadcast(self, layers: list[LearnedGroupMixin]) -> None:
        """Make every rank hold rank 0's masks, whatever numerical noise its weights carry."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size(self.process_group) == 1:
            return
        source = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        for layer in layers:
            mask = layer.mask.to(torch.uint8)
            dist.broadcast(mask, source, group=self.process_group)
            layer.mask.copy_(mask.bool())
            for buffer in (layer.stage, layer.kept_inputs):
                dist.broadcast(buffer, source, group=self.process_group)

    def lasso_loss(self) -> Tensor:
        """``lasso`` times the group lasso of all layers while condensing; a zero tensor afterwards."""
        weight = self.layers[0][1].weight
        if self.lasso == 0.0 or not self.condensing:
            return weight.new_zeros(())
        total = sum(layer.group_lasso() for _, layer in self.layers)
        return total * self.lasso

    def copy_masks_to(self, target: nn.Module) -> None:
        """Copy the current masks into ``target`` (an EMA copy); see :func:`copy_masks`."""
        _copy_layer_masks(self.layers, learned_group_layers(target))

    def state_dict(self) -> dict[str, Any]:
        """Progress and settings; the masks themselves are in the model's state dict."""
        return {
            "step_count": self.step_count,
            "total_steps": self.total_steps,
            "lasso": self.lasso,
            "condense_end": self.condense_end,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict` (load the model's state dict too)."""
        missing = {"step_count", "total_steps", "lasso", "condense_end"} - set(state)
        if missing:
            raise KeyError(
                f"scheduler state is missing {sorted(missing)}; was it saved by "
                "CondensationScheduler.state_dict()?"
            )
        self.step_count = int(state["step_count"])
        self.total_steps = int(state["total_steps"])
        self.lasso = float(state["lasso"])
        self.condense_end = float(state["condense_end"])
        self._applied = {}
        self._apply_due_stages()
