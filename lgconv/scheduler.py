"""CondensationScheduler: turns training progress into condensing stages and the group-lasso term.

Progress is ``step / total_steps``. A layer with condensation factor C drops inputs C - 1 times,
evenly spread over ``[0, condense_end]`` (the paper: the first half of training), or, with
``schedule="gradual"``, a few at a time along a cubic curve ending at the same structure. All
pruning happens in :meth:`CondensationScheduler.step`, never in ``forward``, and only reads state
held by the scheduler and the layers' buffers, so two models, EMA copies, DDP and compiled models
coexist. With ``importance="activation"`` a forward pre-hook keeps a running mean square of every
input channel (training mode only) that scales the weight importance.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lgconv.layers.learned_group import LearnedGroupMixin

IMPORTANCES = ("weight", "activation")
SCHEDULES = ("stepwise", "gradual")
STATISTICS_MOMENTUM = 0.1  # weight of the newest batch in the running input mean square
_SETTINGS = ("step_count", "total_steps", "lasso", "condense_end")


@torch.no_grad()
def _record_input_power(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: fold the batch's mean square per input channel into ``input_power``.

    The first batch sets it; later ones weigh ``max(1 / batches, STATISTICS_MOMENTUM)``, a running
    mean that settles into an exponential average. Nothing is recorded in eval mode.
    """
    if not module.training or not args or not isinstance(args[0], Tensor):
        return
    x = args[0].detach()
    weight = module.weight  # type: ignore[union-attr]
    if isinstance(module, nn.Linear):
        channel = x.dim() - 1
    else:  # (N, C, *spatial) or unbatched (C, *spatial)
        channel = x.dim() - (weight.dim() - 2) - 1
    dims = [d for d in range(x.dim()) if d != channel]
    power = x.float().pow(2).mean(dim=dims) if dims else x.float().pow(2)
    power_buffer, batches = module.input_power, module.input_batches
    batches.add_(1)  # type: ignore[operator]
    # As tensors, so a GPU step does not wait on a host read.
    rate = batches.reciprocal().clamp_min(STATISTICS_MOMENTUM).to(power_buffer)  # type: ignore[union-attr]
    power_buffer.lerp_(power.to(power_buffer), rate)  # type: ignore[operator, union-attr]


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
        condense_start: progress in [0, condense_end) before which nothing is dropped (paper: 0);
            the drops are spread over ``[condense_start, condense_end]``.
        importance: ``"weight"`` ranks a group's inputs by the L1 norm of their weights (the
            paper); ``"activation"`` multiplies it by each input's RMS over the training batches
            seen while condensing (|W| * ||x||, as Wanda scores weights), so inputs that are near
            zero go first. The statistics live in non-persistent layer buffers ``input_power`` /
            ``input_batches`` and in this scheduler's state dict.
        schedule: ``"stepwise"`` drops ``in / C`` inputs per group C - 1 times, evenly spaced (the
            paper); ``"gradual"`` drops a few whenever due so that the dropped share follows
            ``1 - (1 - t)^3`` of the way from ``condense_start`` to ``condense_end`` (Zhu & Gupta,
            2017), ending at the same structure.
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        *,
        lasso: float = 0.0,
        condense_end: float = 0.5,
        process_group: Any = None,
        condense_start: float = 0.0,
        importance: str = "weight",
        schedule: str = "stepwise",
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if not 0.0 < float(condense_end) <= 1.0:
            raise ValueError(f"condense_end must be in (0, 1], got {condense_end!r}")
        if float(lasso) < 0.0:
            raise ValueError(f"lasso must be >= 0, got {lasso!r}")
        if not 0.0 <= float(condense_start) < float(condense_end):
            raise ValueError(
                f"condense_start must be in [0, condense_end={condense_end!r}), got {condense_start!r}"
            )
        if importance not in IMPORTANCES:
            raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.layers = learned_group_layers(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no learned group layers; "
                "call lgconv.condensify(model, ...) before creating the scheduler"
            )
        self.total_steps = int(total_steps)
        self.lasso = float(lasso)
        self.condense_end = float(condense_end)
        self.condense_start = float(condense_start)
        self.importance = importance
        self.schedule = schedule
        self.process_group = process_group
        self.step_count = 0
        self._shapes = sorted({_shape(layer) for _, layer in self.layers})
        self._applied: dict[tuple[int, int], int] = {}
        self._hooks: list[Any] = []
        self._update_statistics_hooks()

    @property
    def progress(self) -> float:
        """Training progress in [0, 1]."""
        return min(self.step_count / self.total_steps, 1.0)

    @staticmethod
    def _fraction(value: float) -> Fraction:
        """A setting as a fraction, so boundaries are exact (0.1 * 12 is not 1.2 in floats)."""
        return Fraction(value).limit_denominator(1_000_000)

    @property
    def _end(self) -> Fraction:
        return self._fraction(self.condense_end)

    @property
    def _start(self) -> Fraction:
        return self._fraction(self.condense_start)

    @property
    def condensing(self) -> bool:
        """True until the last condensing stage is due; the lasso term is active meanwhile."""
        return Fraction(self.step_count, self.total_steps) < self._end

    def _through(self) -> Fraction:
        """How far through ``[condense_start, condense_end]`` training is, in [0, 1]."""
        start, end = self._start, self._end
        done = (Fraction(self.step_count, self.total_steps) - start) / (end - start)
        return min(max(done, Fraction(0)), Fraction(1))

    def target_stage(self, condense_factor: int) -> int:
        """Stepwise stages due now for a layer with this factor: stage k once progress >=
        condense_start + k / (C-1) * (condense_end - condense_start)."""
        drops = condense_factor - 1
        return min(math.floor(self._through() * drops), drops)

    def target_dropped(self, condense_factor: int, in_features: int) -> int:
        """Inputs per group a layer of this factor and width should have dropped by now."""
        chunk = in_features // condense_factor
        if self.schedule == "stepwise":
            return self.target_stage(condense_factor) * chunk
        return math.floor((in_features - chunk) * (1 - (1 - self._through()) ** 3))

    def step(self) -> bool:
        """Advance one optimizer step and perform every condensing stage now due, missed ones too.

        Returns True when a layer dropped inputs in this step (the moment to re-estimate batch
        norm, see :func:`lgconv.recalibrate_batch_norm`).
        """
        self.step_count += 1
        return self._apply_due_stages()

    def _apply_due_stages(self) -> bool:
        targets = {shape: self.target_dropped(*shape) for shape in self._shapes}
        if targets == self._applied:
            return False
        changed = []
        for _, layer in self.layers:
            factor, in_features = _shape(layer)
            target = targets[(factor, in_features)]
            if target == self._applied.get((factor, in_features)):
                continue
            chunk = in_features // factor
            scale = self._input_scale(layer)
            while (dropped := in_features - int(layer.kept_inputs)) < target:
                layer.condense(min(chunk, target - dropped), input_scale=scale)
                if not changed or changed[-1] is not layer:
                    changed.append(layer)
        self._applied = targets
        if changed:
            self._broadcast(changed)
        self._update_statistics_hooks()
        return bool(changed)

    def _input_scale(self, layer: LearnedGroupMixin) -> Tensor | None:
        """Each input's RMS for ``importance="activation"`` (None before any training batch)."""
        if self.importance != "activation" or int(getattr(layer, "input_batches", 0)) == 0:
            return None
        return layer.input_power.sqrt()  # type: ignore[attr-defined]

    def _ensure_statistics_buffers(self) -> None:
        """Give every layer the non-persistent ``input_power`` / ``input_batches`` buffers."""
        for _, layer in self.layers:
            if hasattr(layer, "input_power"):
                continue
            device = layer.weight.device
            register = layer.register_buffer  # type: ignore[attr-defined]
            register("input_power", torch.zeros(layer.weight.shape[1], device=device), persistent=False)
            register("input_batches", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    def _update_statistics_hooks(self) -> None:
        """Record input statistics exactly while ``importance="activation"`` and condensing."""
        wanted = self.importance == "activation" and self.condensing
        if wanted and not self._hooks:
            self._ensure_statistics_buffers()
            for _, layer in self.layers:
                hook = layer.register_forward_pre_hook(_record_input_power)  # type: ignore[attr-defined]
                self._hooks.append(hook)
        elif not wanted and self._hooks:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []

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
        """Progress, settings and (``importance="activation"``) the input statistics, layer by layer
        in module order; the masks themselves are in the model's state dict."""
        state: dict[str, Any] = {
            "step_count": self.step_count,
            "total_steps": self.total_steps,
            "lasso": self.lasso,
            "condense_end": self.condense_end,
            "condense_start": self.condense_start,
            "importance": self.importance,
            "schedule": self.schedule,
        }
        if self.importance == "activation":
            self._ensure_statistics_buffers()
            state["input_power"] = [layer.input_power.clone() for _, layer in self.layers]  # type: ignore[attr-defined]
            state["input_batches"] = [int(layer.input_batches) for _, layer in self.layers]  # type: ignore[attr-defined]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress saved by :meth:`state_dict` (load the model's state dict too).

        Settings missing from an older checkpoint keep this scheduler's values."""
        missing = set(_SETTINGS) - set(state)
        if missing:
            raise KeyError(
                f"scheduler state is missing {sorted(missing)}; was it saved by "
                "CondensationScheduler.state_dict()?"
            )
        powers = state.get("input_power")
        if powers is not None and len(powers) != len(self.layers):
            raise ValueError(
                f"scheduler state holds input statistics of {len(powers)} layers, "
                f"the model has {len(self.layers)} learned group layers; was it saved for this model?"
            )
        self.step_count = int(state["step_count"])
        self.total_steps = int(state["total_steps"])
        self.lasso = float(state["lasso"])
        self.condense_end = float(state["condense_end"])
        self.condense_start = float(state.get("condense_start", self.condense_start))
        self.importance = str(state.get("importance", self.importance))
        self.schedule = str(state.get("schedule", self.schedule))
        if powers is not None:
            self._ensure_statistics_buffers()
            with torch.no_grad():
                for (_, layer), power, batches in zip(self.layers, powers, state["input_batches"]):
                    layer.input_power.copy_(power)  # type: ignore[attr-defined]
                    layer.input_batches.fill_(int(batches))  # type: ignore[attr-defined]
        self._applied = {}
        self._apply_due_stages()


def _shape(layer: LearnedGroupMixin) -> tuple[int, int]:
    """What a layer's schedule depends on: its condense factor and its number of inputs."""
    return layer.condense_factor, int(layer.weight.shape[1])
