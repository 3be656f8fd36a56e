"""finalize: whole models equal their masked form, unfinished layers, wrappers and repeated calls."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyConvNet, assert_finalize_exact, condense_all, perturb_, tiny_mlp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lgconv
from lgconv import CondensedConv2d, CondensedLinear, LearnedGroupConv


@given(
    groups=st.sampled_from([1, 2, 4, 8]),
    factor=st.sampled_from([1, 2, 4, 8]),
    layout=st.sampled_from(["contiguous", "interleaved"]),
    stage=st.integers(0, 7),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 999),
)
def test_a_whole_network_finalizes_exactly(groups, factor, layout, stage, channels_last, dtype, seed):
    torch.manual_seed(seed)
    model = perturb_(TinyConvNet(in_channels=3, width=16, classes=16), seed).to(dtype)
    lgconv.condensify(model, groups=groups, condense_factor=factor, layout=layout, linear=True)
    condense_all(model, stage)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    final = assert_finalize_exact(model, x, atol=tolerance, rtol=tolerance)
    assert sum(isinstance(m, CondensedConv2d) for m in final.modules()) == 2
    assert isinstance(final.head, CondensedLinear)


def test_unfinished_layers_are_refused_unless_allow_partial():
    model = lgconv.condensify(TinyConvNet(width=8), groups=2, condense_factor=4)
    condense_all(model, 1)
    with pytest.raises(
        ValueError,
        match=r"2 layer\(s\) have not finished condensing, e.g. 'block.2' at stage 1 of 3 "
        r"\(6 of 8 inputs kept per group\); run the CondensationScheduler past condense_end, "
        r"or pass allow_partial=True",
    ):
        lgconv.finalize(model)
    assert isinstance(model.block[2], LearnedGroupConv)  # nothing was replaced
    final = assert_finalize_exact(model, torch.randn(2, 1, 8, 8))
    assert final.block[2].kept_inputs == 6


def test_finalize_works_in_place_and_keeps_mode_and_frozen_parameters():
    model = condense_all(lgconv.condensify(TinyConvNet(width=8), groups=2)).train()
    model.block[2].weight.requires_grad_(False)
    result = lgconv.finalize(model)
    assert result is model and model.training
    assert isinstance(model.block[2], CondensedConv2d) and model.block[2].training
    assert not model.block[2].conv.weight.requires_grad and model.block[8].conv.weight.requires_grad


def test_finalized_state_dict_loads_into_another_finalized_copy():
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = lgconv.condensify(TinyConvNet(width=8), groups=2, layout="interleaved")
        condense_all(model)
        return lgconv.finalize(model).eval()

    source, target = build(0), build(1)
    assert not torch.equal(source.block[2].index, target.block[2].index)
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(target(x), source(x))


def test_wrapped_models_name_the_module_to_finalize():
    model = condense_all(lgconv.condensify(tiny_mlp(), groups=2, linear=True))
    with pytest.raises(TypeError, match=r"finalize the wrapped model, not the DataParallel: .*model.module"):
        lgconv.finalize(nn.DataParallel(model))


def test_nothing_to_finalize_and_finalizing_twice_are_clear_errors():
    with pytest.raises(ValueError, match="TinyConvNet has no learned group layers to finalize"):
        lgconv.finalize(TinyConvNet())
    model = lgconv.finalize(condense_all(lgconv.condensify(TinyConvNet(width=8))))
    with pytest.raises(ValueError, match="already finalized"):
        lgconv.finalize(model)


def test_a_hand_edited_mask_is_reported_at_finalize():
    model = lgconv.condensify(TinyConvNet(width=8), groups=2, condense_factor=1)
    with torch.no_grad():
        model.block[2].mask[0, 0] = False
    with pytest.raises(RuntimeError, match="edited by hand and cannot be finalized"):
        lgconv.finalize(model)
