"""Opt-in Linear condensing on models whose MLPs work on channels-last tokens: ConvNeXt, ViT, Mixer.

``condensify(linear=True, include=...)`` turns the MLP ``fc1``/``fc2`` layers into learned group
linear layers; after a few training steps with the scheduler, ``finalize`` makes them
``CondensedLinear`` layers that reproduce the masked model's output and cost 1/C of the FLOPs.
"""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest
import torch
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from zoo_lifecycle import EXPECTED_STAGES, GROUPS, assert_finalized_as_planned, build, run_lifecycle

import lgconv

MLP = ["*mlp.fc1", "*mlp.fc2"]


def tiny_mixer() -> nn.Module:
    """An MLP-Mixer of two blocks on 4x4 = 16 tokens: token and channel MLPs are both Linear."""
    return MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64)


def tiny_vit() -> nn.Module:
    """A two-block ViT on 32x32 images (16 patches plus the class token)."""
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)


MODELS = {
    "timm:test_convnext": (lambda: build("timm", "test_convnext", {}), 64, MLP),
    "timm:test_vit": (lambda: build("timm", "test_vit", {}), 160, MLP),
    "vit_tiny": (tiny_vit, 32, MLP),
    "mixer_tokens_and_channels": (tiny_mixer, 32, ["*mlp_tokens.fc*", "*mlp_channels.fc*"]),
}
SLOW_MODELS = {
    # convnext_atto defaults to conv_mlp=True (1x1 convs): ask for its Linear MLP.
    "timm:convnext_atto": (lambda: build("timm", "convnext_atto", {"conv_mlp": False}), 64, MLP),
    "timm:vit_tiny_patch16_224": (lambda: build("timm", "vit_tiny_patch16_224", {"img_size": 64}), 64, MLP),
    # 16 tokens: with 4 (img_size=64) the token fc1 keeps one input per group, an einsum that
    # torch's FLOP counter lowers to an uncounted multiply.
    "timm:mixer_s32_224": (lambda: build("timm", "mixer_s32_224", {"img_size": 128}), 128, ["*mlp_*.fc*"]),
}


def check_linear_model(factory: Any, size: int, include: list[str]) -> None:
    model = factory()
    x = torch.randn(2, 3, size, size)
    result = run_lifecycle(model, x, linear=True, include=include)

    eligible = result["eligible"]
    assert len(eligible) >= 2
    assert all(any(fnmatch.fnmatchcase(name, p) for p in include) for name in eligible)
    assert result["condensed"] == len(eligible)
    assert result["missing_grads"] == []
    assert result["stages"] == [[s] for s in EXPECTED_STAGES]
    assert_finalized_as_planned(result, x, lgconv.CondensedLinear)


@pytest.mark.parametrize("name", list(MODELS))
def test_linear_mlps_condense_exactly(name: str) -> None:
    check_linear_model(*MODELS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_MODELS))
def test_linear_mlps_condense_exactly_slow(name: str) -> None:
    check_linear_model(*SLOW_MODELS[name])


def test_linear_layers_stay_dense_without_opt_in() -> None:
    """Without ``linear=True`` a ViT keeps its Linear layers and condensify says why."""
    model = tiny_vit()
    decisions = lgconv.plan(model, GROUPS, include=MLP)
    assert decisions.eligible == []
    assert {d.reason for d in decisions.skipped if d.name.endswith("mlp.fc1")} == {
        "Linear layers are condensed only with linear=True"
    }


def test_include_patterns_keep_attention_and_head_dense() -> None:
    """Only the MLP layers matched by ``include`` learn groups; qkv, proj and the head stay Linear."""
    model = lgconv.condensify(tiny_vit(), GROUPS, linear=True, include=MLP)
    learned = {n for n, m in model.named_modules() if isinstance(m, lgconv.LearnedGroupLinear)}
    assert learned == {f"blocks.{i}.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")}
    assert type(model.blocks[0].attn.qkv) is nn.Linear and type(model.head) is nn.Linear


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_condensed_mixer_round_trips_through_save_and_load(layout: str, tmp_path: Any) -> None:
    """A finalized Mixer with CondensedLinear layers saves and loads to identical outputs."""
    x = torch.randn(2, 3, 64, 64)
    model = build("timm", "mixer_s32_224", {"img_size": 64, "num_classes": 10})
    result = run_lifecycle(model, x, linear=True, include=["*mlp_channels.fc*"], layout=layout)
    path = tmp_path / "mixer.lgconv"
    lgconv.save(result["model"], path, arch_kwargs={"img_size": 64})
    loaded = lgconv.load(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result["finalized"], rtol=0, atol=0)
