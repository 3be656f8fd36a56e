"""Shared test helpers: hypothesis strategies for learned group layers and tiny models.

Other test modules import from here (``from tests.helpers import ...`` or ``from helpers import ...``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

import lgconv
from lgconv.layers.learned_group import LearnedGroupMixin

LAYOUTS = ("contiguous", "interleaved")


@dataclass(frozen=True)
class GroupConfig:
    """Channel counts, groups and factor that a learned group layer accepts."""

    in_channels: int
    out_channels: int
    groups: int
    condense_factor: int
    layout: str


@st.composite
def group_configs(
    draw: st.DrawFn, max_groups: int = 6, max_factor: int = 6, max_mult: int = 4
) -> GroupConfig:
    """Valid (in, out, G, C, layout): out divisible by G, in divisible by C (G and C independent)."""
    groups = draw(st.integers(1, max_groups))
    factor = draw(st.integers(1, max_factor))
    out_channels = groups * draw(st.integers(1, max_mult))
    in_channels = factor * draw(st.integers(1, max_mult))
    return GroupConfig(in_channels, out_channels, groups, factor, draw(st.sampled_from(LAYOUTS)))


def condense_to(layer: LearnedGroupMixin, stage: int) -> LearnedGroupMixin:
    """Call ``condense()`` until ``layer`` reaches ``stage`` (clipped to its last stage)."""
    while int(layer.stage) < min(stage, layer.max_stage):
        layer.condense()
    return layer


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and float buffer random values (non-trivial BN stats, random weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_floating_point():
                continue
            noise = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
            if tensor.dim() >= 2:
                tensor.copy_((noise - 0.5) * 2 / tensor[0].numel() ** 0.5)
            else:
                tensor.copy_(noise * 0.5 + 0.5)
    return model


def condense_all(model: nn.Module, stage: int | None = None) -> nn.Module:
    """Condense every learned group layer of ``model`` to ``stage`` (default: fully)."""
    for module in model.modules():
        if isinstance(module, LearnedGroupMixin):
            condense_to(module, module.max_stage if stage is None else stage)
    return model


def assert_finalize_exact(
    model: nn.Module, x: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5
) -> nn.Module:
    """Finalize a deep copy of ``model`` (eval) and check it reproduces the masked outputs; return it."""
    model.eval()
    with torch.no_grad():
        expected = model(x)
        final = lgconv.finalize(copy.deepcopy(model), allow_partial=True).eval()
        actual = final(x)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    assert not any(isinstance(m, LearnedGroupMixin) for m in final.modules())
    return final


class TinyConvNet(nn.Module):
    """A small image classifier built around 1x1 convs (the layers condensify turns into LGCs)."""

    def __init__(self, in_channels: int = 1, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.block = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=4),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block(self.stem(x))).flatten(1))


def tiny_mlp(features: int = 16, hidden: int = 32, classes: int = 4) -> nn.Sequential:
    """Linear layers only: for ``condensify(..., linear=True)``."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes * 2))


class SeparableBlock1d(nn.Module):
    """A QuartzNet/Jasper-style block: (depthwise Conv1d -> pointwise Conv1d -> BN -> ReLU) x
    repeats, with a pointwise + BN residual from the block input."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, repeats: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for repeat in range(repeats):
            layers += [
                nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=False),
                nn.Conv1d(channels, out_channels, 1, bias=False),
                nn.BatchNorm1d(out_channels),
            ]
            if repeat < repeats - 1:
                layers.append(nn.ReLU())
            channels = out_channels
        self.body = nn.Sequential(*layers)
        self.residual = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, 1, bias=False), nn.BatchNorm1d(out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.residual(x))


def speech_net(features: int = 16, width: int = 32, classes: int = 4) -> nn.Sequential:
    """A small separable-Conv1d speech network (QuartzNet-like) on (N, features, time) inputs: a
    strided stem, two separable blocks and a pointwise head giving per-frame class scores."""
    return nn.Sequential(
        nn.Conv1d(features, width, 5, stride=2, padding=2, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        SeparableBlock1d(width, width, 7),
        SeparableBlock1d(width, 2 * width, 9),
        nn.Conv1d(2 * width, 2 * width, 1),
        nn.ReLU(),
        nn.Conv1d(2 * width, classes, 1),
    )
