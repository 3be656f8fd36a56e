"""The model forms the speed benchmarks compare, built from one dense network.

dense (unmodified) -> masked (condensified, every layer condensed to the end) -> naive (what the
CondenseNet reference code's conversion builds: gather, grouped conv, channel shuffle, the batch
norm and ReLU before it still over all inputs, dense blocks that concatenate after every layer)
/ finalized (``lgconv.finalize``) / optimised (``lgconv.optimize_for_inference`` on it).
uncondensed: the same condensified network left at stage 0 (masks all ones) and finalized with
``allow_partial=True``, the baseline that goes through the same pipeline without condensing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import lgconv
from lgconv import module_tree
from lgconv.layers import CondensedConv2d
from lgconv.layers.learned_group import LearnedGroupMixin
from lgconv.models.condensenet import DenseBlock


class ReferenceCondensedConv(nn.Module):
    """The reference code's converted layer: ``index_select`` -> grouped conv -> channel shuffle."""

    def __init__(self, layer: CondensedConv2d) -> None:
        super().__init__()
        if layer.layout != "interleaved":
            raise ValueError("the reference form needs the interleaved layout (the reference's o % G groups)")
        self.register_buffer("index", layer.index.clone())
        self.conv = copy.deepcopy(layer.conv)
        self.groups = layer.groups

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(torch.index_select(x, 1, self.index))
        batch, channels, height, width = x.shape
        x = x.view(batch, self.groups, channels // self.groups, height, width).transpose(1, 2)
        return x.contiguous().view(batch, channels, height, width)


def concatenating(model: nn.Module) -> nn.Module:
    """``model`` with its CondenseNet dense blocks concatenating after every layer, as the reference does."""
    for module in model.modules():
        if isinstance(module, DenseBlock):
            module.preallocate = False
    return model


def naive(finalized: nn.Module) -> nn.Module:
    """A copy of ``finalized`` built as the reference code's conversion: its converted layers, torch.cat."""
    model = concatenating(copy.deepcopy(finalized))
    layers = [m for m in model.modules() if isinstance(m, CondensedConv2d)]
    return module_tree.replace(model, {id(m): ReferenceCondensedConv(m) for m in layers})


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine values, so folding them is tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(channels, generator=generator) * 0.2)
    return model


def condense_fully(model: nn.Module) -> nn.Module:
    """Run every learned group layer through all its condensing steps (as training would)."""
    for module in model.modules():
        if isinstance(module, LearnedGroupMixin):
            while not module.fully_condensed:
                module.condense()
    return model


@dataclass
class Forms:
    """One network in every form the latency benchmark times, plus its input size."""

    name: str
    input_size: tuple[int, int, int]
    dense: nn.Module
    masked: nn.Module
    naive: nn.Module
    finalized: nn.Module
    uncondensed: nn.Module


def _preset(name: str, seed: int) -> tuple[nn.Module, nn.Module, tuple[int, int, int]]:
    from lgconv import models

    builder = getattr(models, name)
    torch.manual_seed(seed)
    dense = builder(condense_factor=1, classifier_condense_factor=1)
    torch.manual_seed(seed)
    masked = builder()
    masked.load_state_dict(dense.state_dict(), strict=False)
    return dense, masked, tuple(masked.default_input_size)


def _timm(name: str, seed: int) -> tuple[nn.Module, nn.Module, tuple[int, int, int]]:
    import timm

    torch.manual_seed(seed)
    dense = timm.create_model(name, pretrained=False)
    masked = lgconv.condensify(copy.deepcopy(dense), groups=4, condense_factor=4, layout="interleaved")
    return dense, masked, (3, 224, 224)


BUILDERS: dict[str, Callable[[int], tuple[nn.Module, nn.Module, tuple[int, int, int]]]] = {
    "condensenet50": lambda seed: _preset("condensenet50", seed),
    "condensenet86": lambda seed: _preset("condensenet86", seed),
    "condensenet74_imagenet": lambda seed: _preset("condensenet74_imagenet", seed),
    "resnet50": lambda seed: _timm("resnet50", seed),
    "densenet121": lambda seed: _timm("densenet121", seed),
}


def forms(name: str, seed: int = 0) -> Forms:
    """Build ``name`` dense, masked (condensed to the end), naive-converted, finalized and
    uncondensed (stage 0, finalized), in eval mode."""
    dense, masked, input_size = BUILDERS[name](seed)
    randomize_norms(dense, seed)
    masked.load_state_dict(dense.state_dict(), strict=False)
    uncondensed = lgconv.finalize(copy.deepcopy(masked), allow_partial=True)
    condense_fully(masked)
    finalized = lgconv.finalize(copy.deepcopy(masked))
    return Forms(
        name,
        input_size,
        dense.eval(),
        masked.eval(),
        naive(finalized).eval(),
        finalized.eval(),
        uncondensed.eval(),
    )
