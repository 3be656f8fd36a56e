"""LearnedGroupLinear: same condensing rules as the conv, on (..., features) inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_finalize_exact, condense_to, group_configs
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lgconv import CondensedLinear, LearnedGroupLinear
from lgconv.layers.learned_group import output_groups


def make_linear(cfg, dtype=torch.float32, bias=True, seed=0) -> LearnedGroupLinear:
    torch.manual_seed(seed)
    return LearnedGroupLinear(
        cfg.in_channels,
        cfg.out_channels,
        learned_groups=cfg.groups,
        condense_factor=cfg.condense_factor,
        layout=cfg.layout,
        bias=bias,
        dtype=dtype,
    )


@given(
    cfg=group_configs(),
    leading=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    bias=st.booleans(),
    stage=st.integers(0, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_finalize_equals_masked_on_any_leading_dims(cfg, leading, bias, stage, dtype, seed):
    layer = make_linear(cfg, dtype, bias, seed)
    for _ in range(min(stage, layer.max_stage)):
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight) * 0.05)
        layer.condense()
    x = torch.randn(*leading, cfg.in_channels, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    final = assert_finalize_exact(layer, x, atol=tol, rtol=tol)
    assert isinstance(final, CondensedLinear)
    kept = cfg.in_channels - min(stage, layer.max_stage) * (cfg.in_channels // cfg.condense_factor)
    assert final.weight.shape == (cfg.out_channels, kept)
    assert final(x).shape == (*leading, cfg.out_channels)


@given(cfg=group_configs(), zero_inputs=st.integers(0, 24), seed=st.integers(0, 2**16))
def test_condense_counts_ties_and_group_sharing(cfg, zero_inputs, seed):
    layer = make_linear(cfg, seed=seed)
    with torch.no_grad():
        layer.weight[:, : min(zero_inputs, cfg.in_channels)] = 0
    drop = cfg.in_channels // cfg.condense_factor
    previous = layer.group_mask().clone()
    for _ in range(layer.max_stage):
        layer.condense()
        current = layer.group_mask()
        assert not (current & ~previous).any()
        assert ((previous.sum(1) - current.sum(1)) == drop).all()
        previous = current.clone()
    groups = output_groups(cfg.out_channels, cfg.groups, cfg.layout)
    assert torch.equal(layer.mask, previous[groups])
    assert layer.mask.shape == (cfg.out_channels, cfg.in_channels)


@given(cfg=group_configs(), stage=st.integers(0, 4), seed=st.integers(0, 99))
def test_importance_and_lasso_match_naive_formulas(cfg, stage, seed):
    layer = condense_to(make_linear(cfg, seed=seed), stage)
    groups = output_groups(cfg.out_channels, cfg.groups, cfg.layout)
    weight = (layer.weight * layer.mask).detach().double()
    importance = torch.stack([weight[groups == g].abs().sum(0) for g in range(cfg.groups)])
    lasso = sum(
        weight[groups == g, j].pow(2).sum().sqrt()
        for g in range(cfg.groups)
        for j in range(cfg.in_channels)
        if layer.group_mask()[g, j]
    )
    torch.testing.assert_close(layer.importance().double(), importance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        layer.group_lasso().double(), torch.as_tensor(lasso).double(), rtol=1e-5, atol=1e-6
    )


def test_fresh_from_linear_equals_the_linear_it_wraps():
    linear = nn.Linear(12, 6)
    layer = LearnedGroupLinear.from_linear(linear, learned_groups=3, condense_factor=4)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(2, 5, 12)
    assert torch.equal(layer(x), linear(x))


def test_classifier_condensing_keeps_the_half_with_the_largest_l1_norm():
    """The paper's classifier rule: one group, factor 2."""
    linear = nn.Linear(8, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.arange(24.0).view(3, 8) % 8 - 3.5)  # |column| = 3.5, 2.5, ... 3.5
    layer = condense_to(LearnedGroupLinear.from_linear(linear, learned_groups=1, condense_factor=2), 1)
    assert layer.group_mask()[0].nonzero()[:, 0].tolist() == [0, 1, 6, 7]


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="out channels 10 are not divisible by groups 4"):
        LearnedGroupLinear(8, 10, learned_groups=4)
    with pytest.raises(ValueError, match="in channels 10 are not divisible by condense_factor 4"):
        LearnedGroupLinear(10, 8, learned_groups=4)
    with pytest.raises(TypeError, match="from_linear needs an nn.Linear, got Conv2d"):
        LearnedGroupLinear.from_linear(nn.Conv2d(8, 8, 1))
