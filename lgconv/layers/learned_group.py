"""Condensing state shared by the learned group layers: mask, stage, importance and group lasso.

A learned group layer keeps a dense weight of shape ``(out, in, *kernel)`` and a boolean mask of
shape ``(out, in, 1, ...)``. Output channels are split into ``learned_groups`` groups; all outputs of
one group share the same kept inputs, so the trained layer becomes a grouped layer after a gather.
"""

# No ``from __future__ import annotations`` here: TorchScript reads the class annotations of
# LearnedGroupMixin and cannot resolve them as strings, so scripting a masked model would fail.
from typing import Literal

import torch
from torch import Tensor

Layout = Literal["contiguous", "interleaved"]
LAYOUTS: tuple[str, ...] = ("contiguous", "interleaved")

_LASSO_EPS = 1e-12


def check_group_args(learned_groups: int, condense_factor: int, layout: str) -> None:
    """Raise ``ValueError`` naming the argument when groups, factor or layout are malformed."""
    for name, value in (("groups", learned_groups), ("condense_factor", condense_factor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_condensing_args(
    in_features: int, out_features: int, learned_groups: int, condense_factor: int, layout: str
) -> None:
    """Raise ``ValueError`` naming the argument when a layer cannot be condensed as asked."""
    check_group_args(learned_groups, condense_factor, layout)
    if out_features % learned_groups:
        raise ValueError(
            f"out channels {out_features} are not divisible by groups {learned_groups}; "
            "choose groups that divide the output channels"
        )
    if in_features % condense_factor:
        raise ValueError(
            f"in channels {in_features} are not divisible by condense_factor {condense_factor}; "
            "choose a factor that divides the input channels"
        )


def output_groups(out_features: int, learned_groups: int, layout: str) -> Tensor:
    """The group of every output channel: ``o // (out / G)`` (contiguous) or ``o % G`` (interleaved)."""
    channels = torch.arange(out_features)
    if layout == "contiguous":
        return channels // (out_features // learned_groups)
    return channels % learned_groups


def grouped_order(out_features: int, learned_groups: int, layout: str) -> Tensor:
    """Original output channels listed group by group: the output order of the grouped layer."""
    return output_groups(out_features, learned_groups, layout).argsort(stable=True)


def grouped_connections(
    index: Tensor, out_features: int, learned_groups: int, layout: str
) -> tuple[Tensor, Tensor]:
    """Where each row of a grouped layer (rows listed group by group, gathering ``index``) sits in
    the masked layer: its output channel (``rows``) and the inputs it reads (``columns``, one row of
    them per grouped row), so ``dense[rows[:, None], columns]`` holds the grouped weight."""
    rows = grouped_order(out_features, learned_groups, layout).to(index.device)
    row_group = torch.arange(out_features, device=index.device) // (out_features // learned_groups)
    return rows, index.view(learned_groups, -1)[row_group]


class LearnedGroupMixin:
    """Adds learned-group condensing to a layer that has ``weight`` of shape (out, in, *kernel).

    State lives in buffers so that checkpoints, EMA copies and DDP see it: ``mask`` (bool),
    ``stage`` (condensing steps done) and ``kept_inputs`` (inputs each group still keeps).
    """

    weight: Tensor
    mask: Tensor
    stage: Tensor
    kept_inputs: Tensor
    learned_groups: int
    condense_factor: int
    layout: str

    def _init_condensing(self, learned_groups: int, condense_factor: int, layout: str) -> None:
        out_features, in_features = self.weight.shape[:2]
        check_condensing_args(in_features, out_features, learned_groups, condense_factor, layout)
        self.learned_groups = learned_groups
        self.condense_factor = condense_factor
        self.layout = layout
        device = self.weight.device
        mask_shape = (out_features, in_features) + (1,) * (self.weight.dim() - 2)
        register = self.register_buffer  # type: ignore[attr-defined]
        register("mask", torch.ones(mask_shape, dtype=torch.bool, device=device))
        register("stage", torch.zeros((), dtype=torch.long, device=device))
        register("kept_inputs", torch.tensor(in_features, dtype=torch.long, device=device))

    @property
    def max_stage(self) -> int:
        """Number of condensing steps until every group keeps ``in / condense_factor`` inputs."""
        return self.condense_factor - 1

    @property
    def fully_condensed(self) -> bool:
        return int(self.stage) >= self.max_stage

    @property
    def density(self) -> float:
        """Fraction of input-output connections still kept."""
        return int(self.kept_inputs) / self.weight.shape[1]

    @property
    def kept_connections(self) -> int:
        """Kept (output, input) pairs; multiply by the kernel area for weights."""
        return int(self.kept_inputs) * self.weight.shape[0]

    def masked_weight(self) -> Tensor:
        """The weight with dropped connections at zero (the bool mask cast first: float*bool is slow)."""
        return self.weight * self.mask.to(self.weight.dtype)

    def _by_group(self, per_output: Tensor) -> Tensor:
        """(out, ...) -> (groups, out / groups, ...) following this layer's layout."""
        groups = self.learned_groups
        per_group = per_output.shape[0] // groups
        rest = per_output.shape[1:]
        if self.layout == "contiguous":
            return per_output.reshape(groups, per_group, *rest)
        return per_output.reshape(per_group, groups, *rest).transpose(0, 1)

    def _set_group_mask(self, keep: Tensor) -> None:
        """Write a (groups, in) mask to every output of each group (one broadcast copy, no repeat)."""
        groups = self.learned_groups
        rest = self.mask.shape[1:]
        ones = (1,) * (len(rest) - 1)
        if self.layout == "contiguous":
            self.mask.view(groups, -1, *rest).copy_(keep.view(groups, 1, keep.shape[1], *ones))
        else:
            self.mask.view(-1, groups, *rest).copy_(keep.view(1, groups, keep.shape[1], *ones))

    def group_mask(self) -> Tensor:
        """Kept inputs of every group as a (groups, in) bool tensor."""
        out_features, in_features = self.weight.shape[:2]
        return self._by_group(self.mask.reshape(out_features, in_features))[:, 0]

    def importance(self, input_scale: Tensor | None = None) -> Tensor:
        """Importance of input j for group g: sum over the group's outputs of |masked W[o, j]|.

        ``input_scale`` (in,), when given, multiplies input j's importance by the typical size of
        that input (e.g. its RMS over training batches), so an input that is near zero ranks low
        whatever its weights (the data-aware score of Wanda, |W| * ||x||).
        """
        out_features, in_features = self.weight.shape[:2]
        weight = self.weight.detach()
        dtype = torch.promote_types(weight.dtype, torch.float32)
        # All outputs of a group share its mask: sum |W| over the group first, then mask (groups, in)
        # instead of (out, in); one pass over the weight, no copies (a ResNet-50 step stays < 50 ms).
        magnitude = self._by_group(weight.abs().reshape(out_features, -1)).sum(1, dtype=dtype)
        magnitude = magnitude.reshape(self.learned_groups, in_features, -1).sum(-1)
        if input_scale is not None:
            if input_scale.shape != (in_features,):
                raise ValueError(
                    f"input_scale must have shape ({in_features},) (one value per input), "
                    f"got {tuple(input_scale.shape)}"
                )
            magnitude = magnitude * input_scale.detach().to(magnitude)
        return magnitude * self.group_mask()

    @torch.no_grad()
    def condense(self, inputs: int | None = None, input_scale: Tensor | None = None) -> None:
        """Drop ``inputs`` (default ``in / condense_factor``) of the still-kept inputs of every group,
        least important first (see :meth:`importance` for ``input_scale``).

        ``stage`` counts the multiples of ``in / condense_factor`` dropped so far, so smaller drops
        (a gradual schedule) reach ``max_stage`` exactly when ``in / condense_factor`` inputs remain.
        Ties are broken towards the lower channel index so every process drops the same inputs.
        Inputs already dropped are never candidates, even when the weights hold NaN or inf.
        """
        if self.fully_condensed:
            raise RuntimeError(
                f"{type(self).__name__} is already fully condensed "
                f"(stage {int(self.stage)} of {self.max_stage}); nothing left to drop"
            )
        in_features = self.weight.shape[1]
        chunk = in_features // self.condense_factor
        kept = int(self.kept_inputs)
        drop = chunk if inputs is None else inputs
        if isinstance(drop, bool) or not isinstance(drop, int) or not 1 <= drop <= kept - chunk:
            raise ValueError(
                f"inputs must be an integer in [1, {kept - chunk}] (the kept {kept} down to the final "
                f"{chunk} per group), got {inputs!r}"
            )
        keep = self.group_mask()
        by_importance = self.importance(input_scale).argsort(dim=1, stable=True)
        kept_first = (~keep).gather(1, by_importance).to(torch.uint8).argsort(dim=1, stable=True)
        dropped = by_importance.gather(1, kept_first[:, :drop])
        keep = keep.clone().scatter_(1, dropped, False)
        self._set_group_mask(keep)
        self.kept_inputs.sub_(drop)
        self.stage.fill_((in_features - kept + drop) // chunk)

    def group_lasso(self) -> Tensor:
        """Sum over groups and kept inputs of the L2 norm of the group's weights on that input."""
        out_features, in_features = self.weight.shape[:2]
        squares = self.masked_weight().pow(2).reshape(out_features, in_features, -1).sum(-1)
        norms = self._by_group(squares).sum(1).clamp_min(_LASSO_EPS).sqrt()
        return (norms * self.group_mask()).sum()

    def gather_index(self) -> Tensor:
        """Kept input channels of each group in ascending order, groups concatenated."""
        keep = self.group_mask()
        counts = keep.sum(1)
        if not bool((counts == counts[0]).all()):
            raise RuntimeError(
                f"{type(self).__name__} has groups keeping different numbers of inputs "
                f"({counts.tolist()}); its mask was edited by hand and cannot be finalized"
            )
        return keep.nonzero()[:, 1]

    def condensing_repr(self) -> str:
        return (
            f"learned_groups={self.learned_groups}, condense_factor={self.condense_factor}, "
            f"layout={self.layout}, stage={int(self.stage)}/{self.max_stage}"
        )
