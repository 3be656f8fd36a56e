"""The finalize pass: every learned group layer becomes its exact inference form (gather + grouped)."""

from __future__ import annotations

from torch import nn

from lgconv import module_tree
from lgconv.layers import CondensedLinear, LearnedGroupLinear
from lgconv.layers.condensed_conv import condensed_conv_type
from lgconv.layers.learned_group import LearnedGroupMixin
from lgconv.layers.learned_group_conv import LearnedGroupConvNd

_WRAPPERS = {
    "DistributedDataParallel": "lgconv.finalize(model.module)",
    "DataParallel": "lgconv.finalize(model.module)",
    "OptimizedModule": "lgconv.finalize(model._orig_mod) and compile the result again",
}


def _condensed(layer: LearnedGroupMixin) -> nn.Module:
    if isinstance(layer, LearnedGroupConvNd):
        return condensed_conv_type(layer).from_learned(layer)
    if isinstance(layer, LearnedGroupLinear):
        return CondensedLinear.from_learned(layer)
    raise TypeError(f"no inference form is known for {type(layer).__name__}")


def finalize(model: nn.Module, *, allow_partial: bool = False) -> nn.Module:
    """Replace each learned group layer by its exact inference layer: ``LearnedGroupConv1d`` /
    ``LearnedGroupConv`` / ``LearnedGroupConv3d`` by ``CondensedConv1d`` / ``CondensedConv2d`` /
    ``CondensedConv3d``, ``LearnedGroupLinear`` by ``CondensedLinear``.

    Works in place and returns the model. A layer that has not finished condensing raises
    ``ValueError`` unless ``allow_partial=True``, which finalizes it with the inputs it still keeps
    (still exact, only less compact).
    """
    wrapper = _WRAPPERS.get(type(model).__name__)
    if wrapper:
        raise TypeError(f"finalize the wrapped model, not the {type(model).__name__}: {wrapper}")
    layers = [
        (name, module)
        for name, module in module_tree.walk(model, stop=lambda m: isinstance(m, LearnedGroupMixin))
        if isinstance(module, LearnedGroupMixin)
    ]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no learned group layers to finalize; "
            "condensify and train it first (or it is already finalized)"
        )
    unfinished = [(name, layer) for name, layer in layers if not layer.fully_condensed]
    if unfinished and not allow_partial:
        name, layer = unfinished[0]
        raise ValueError(
            f"{len(unfinished)} layer(s) have not finished condensing, e.g. {name or '(root)'!r} at "
            f"stage {int(layer.stage)} of {layer.max_stage} ({int(layer.kept_inputs)} of "
            f"{layer.weight.shape[1]} inputs kept per group); run the CondensationScheduler past "
            "condense_end, or pass allow_partial=True to finalize with the inputs kept so far"
        )
    replacements = {id(layer): _condensed(layer) for _, layer in layers}
    return module_tree.replace(model, replacements)
