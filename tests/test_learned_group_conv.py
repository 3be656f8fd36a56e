"""LearnedGroupConv: wrapping a conv, condensing (counts, ties, importance, lasso) and finalize == masked."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LAYOUTS, assert_finalize_exact, condense_to, group_configs
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lgconv import (
    CondensedConv1d,
    CondensedConv2d,
    CondensedConv3d,
    LearnedGroupConv,
    LearnedGroupConv1d,
    LearnedGroupConv3d,
    finalize,
)
from lgconv.layers.learned_group import output_groups
from lgconv.layers.learned_group_conv import LearnedGroupConvNd, learned_group_conv_type


def make_conv(cfg, kernel=1, dtype=torch.float32, seed=0, **kwargs) -> LearnedGroupConv:
    torch.manual_seed(seed)
    layer = LearnedGroupConv(
        cfg.in_channels,
        cfg.out_channels,
        kernel,
        learned_groups=cfg.groups,
        condense_factor=cfg.condense_factor,
        layout=cfg.layout,
        dtype=dtype,
        **kwargs,
    )
    return layer


def naive_importance(layer: LearnedGroupConv) -> torch.Tensor:
    """importance[g, j] = sum over outputs o of group g and kernel taps of |W[o, j] * mask[o, j]|."""
    out_c, in_c = layer.weight.shape[:2]
    groups = output_groups(out_c, layer.learned_groups, layer.layout)
    weight = (layer.weight * layer.mask).detach().double()
    result = torch.zeros(layer.learned_groups, in_c, dtype=torch.float64)
    for g in range(layer.learned_groups):
        for o in range(out_c):
            if groups[o] == g:
                for j in range(in_c):
                    result[g, j] += weight[o, j].abs().sum()
    return result


def naive_group_lasso(layer: LearnedGroupConv) -> torch.Tensor:
    """Sum over groups g and kept inputs j of sqrt(sum over o in g and taps of W[o, j]^2)."""
    out_c, in_c = layer.weight.shape[:2]
    groups = output_groups(out_c, layer.learned_groups, layer.layout)
    weight = layer.weight.detach().double()
    total = torch.zeros((), dtype=torch.float64)
    for g in range(layer.learned_groups):
        members = [o for o in range(out_c) if groups[o] == g]
        for j in range(in_c):
            if layer.mask[members[0], j].item():
                total += weight[members, j].pow(2).sum().sqrt()
    return total


@given(
    cfg=group_configs(),
    kernel=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1]),
    dilation=st.sampled_from([1, 2]),
    bias=st.booleans(),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    size=st.integers(3, 7),
    batch=st.integers(1, 3),
    stage=st.integers(0, 5),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_finalize_equals_masked_float32(
    cfg, kernel, stride, padding, dilation, bias, padding_mode, size, batch, stage, channels_last, seed
):
    layer = make_conv(
        cfg,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
        padding_mode=padding_mode,
        seed=seed,
    )
    for _ in range(min(stage, layer.max_stage)):
        with torch.no_grad():  # weights move between stages, as in training
            layer.weight.add_(torch.randn_like(layer.weight) * 0.05)
        layer.condense()
    x = torch.randn(batch, cfg.in_channels, size + dilation * (kernel - 1), size + dilation * (kernel - 1))
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    final = assert_finalize_exact(layer, x)
    assert isinstance(final, CondensedConv2d)
    kept = cfg.in_channels - min(stage, layer.max_stage) * (cfg.in_channels // cfg.condense_factor)
    assert final.conv.weight.shape == (cfg.out_channels, kept, kernel, kernel)
    assert final.conv.groups == cfg.groups


@given(cfg=group_configs(), stage=st.integers(0, 5), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_finalize_equals_masked_float64(cfg, stage, bias, seed):
    layer = condense_to(make_conv(cfg, 3, dtype=torch.float64, padding=1, bias=bias, seed=seed), stage)
    x = torch.randn(2, cfg.in_channels, 5, 5, dtype=torch.float64)
    final = assert_finalize_exact(layer, x, atol=1e-12, rtol=1e-12)
    assert final.conv.weight.dtype == torch.float64


@given(cfg=group_configs(), zero_inputs=st.integers(0, 24), seed=st.integers(0, 2**16))
def test_condense_drops_in_over_c_per_group_and_never_a_dropped_input(cfg, zero_inputs, seed):
    layer = make_conv(cfg, seed=seed)
    with torch.no_grad():  # many exact ties at zero importance
        layer.weight[:, : min(zero_inputs, cfg.in_channels)] = 0
    drop = cfg.in_channels // cfg.condense_factor
    previous = layer.group_mask().clone()
    for stage in range(1, layer.max_stage + 1):
        layer.condense()
        current = layer.group_mask()
        assert not (current & ~previous).any(), "a dropped input came back"
        assert ((previous.sum(1) - current.sum(1)) == drop).all()
        assert int(layer.stage) == stage
        assert int(layer.kept_inputs) == cfg.in_channels - stage * drop
        previous = current.clone()
    assert (previous.sum(1) == cfg.in_channels // cfg.condense_factor).all()
    assert layer.fully_condensed
    # every output of a group carries its group's mask
    groups = output_groups(cfg.out_channels, cfg.groups, cfg.layout)
    assert torch.equal(layer.mask[:, :, 0, 0], previous[groups])


@given(cfg=group_configs(), stage=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_condense_drops_the_least_important_kept_inputs(cfg, stage, seed):
    layer = condense_to(make_conv(cfg, 3, seed=seed), stage)
    if layer.fully_condensed:
        return
    importance = naive_importance(layer)
    before = layer.group_mask().clone()
    layer.condense()
    dropped = before & ~layer.group_mask()
    drop = cfg.in_channels // cfg.condense_factor
    for g in range(cfg.groups):
        kept = [j for j in range(cfg.in_channels) if before[g, j]]
        expected = sorted(kept, key=lambda j: (importance[g, j].item(), j))[:drop]
        assert dropped[g].nonzero()[:, 0].tolist() == sorted(expected)


@given(cfg=group_configs(), kernel=st.sampled_from([1, 3]), stage=st.integers(0, 4), seed=st.integers(0, 99))
def test_importance_and_group_lasso_match_naive_formulas(cfg, kernel, stage, seed):
    layer = condense_to(make_conv(cfg, kernel, seed=seed), stage)
    torch.testing.assert_close(layer.importance().double(), naive_importance(layer), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.group_lasso().double(), naive_group_lasso(layer), rtol=1e-5, atol=1e-6)


def test_condense_with_nan_or_inf_weights_still_drops_only_kept_inputs():
    for value in (float("nan"), float("inf")):
        layer = LearnedGroupConv(8, 4, learned_groups=2, condense_factor=4)
        layer.condense()
        before = layer.group_mask().clone()
        with torch.no_grad():
            layer.weight.fill_(value)
        layer.condense()
        after = layer.group_mask()
        assert not (after & ~before).any()
        assert (after.sum(1) == 4).all() and int(layer.kept_inputs) == 4


def test_group_lasso_gradient_flows_and_is_finite_on_dropped_inputs():
    layer = LearnedGroupConv(8, 8, learned_groups=2, condense_factor=2)
    with torch.no_grad():
        layer.weight[:, 0] = 0  # a kept input with an all-zero column: clamped, no NaN
    layer.condense()
    layer.group_lasso().backward()
    grad = layer.weight.grad
    assert torch.isfinite(grad).all()
    assert grad[~layer.mask.expand_as(grad)].abs().sum() == 0
    assert grad[layer.mask.expand_as(grad)].abs().sum() > 0


@given(
    in_c=st.integers(1, 12),
    out_c=st.integers(1, 12),
    kernel=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    bias=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
)
def test_fresh_from_conv_equals_the_conv_it_wraps(in_c, out_c, kernel, stride, bias, layout):
    conv = nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=kernel // 2, bias=bias)
    layer = LearnedGroupConv.from_conv(conv, learned_groups=1, condense_factor=1, layout=layout)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert (layer.stride, layer.padding, layer.dilation) == (conv.stride, conv.padding, conv.dilation)
    x = torch.randn(2, in_c, 6, 6)
    assert torch.equal(layer(x), conv(x))
    assert layer.mask.all() and int(layer.stage) == 0 and layer.density == 1.0


def test_from_conv_keeps_dtype_device_mode_and_shares_gradients():
    conv = nn.Conv2d(8, 12, 1, dtype=torch.float64).eval()
    layer = LearnedGroupConv.from_conv(conv, 4, 2, "interleaved")
    assert layer.weight.dtype == torch.float64 and not layer.training
    assert layer.mask.device == conv.weight.device and layer.mask.dtype == torch.bool
    assert (layer.learned_groups, layer.condense_factor, layer.layout) == (4, 2, "interleaved")
    layer(torch.randn(1, 8, 2, 2, dtype=torch.float64)).sum().backward()
    assert conv.weight.grad is not None
    assert "learned_groups=4" in repr(layer) and "stage=0/1" in repr(layer)


def test_condense_factor_defaults_to_groups_and_counts_follow_the_mask():
    layer = LearnedGroupConv(16, 8, learned_groups=4)
    assert layer.condense_factor == 4 and layer.max_stage == 3
    condense_to(layer, 2)
    assert layer.density == 0.5
    assert layer.kept_connections == 8 * 8
    assert int(layer.mask.sum()) == layer.kept_connections


def test_forward_is_pure_in_train_and_eval():
    layer = LearnedGroupConv(8, 8, learned_groups=2)
    state = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 8, 3, 3)
    for mode in (True, False):
        layer.train(mode)
        for _ in range(3):
            layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_masked_weights_get_no_gradient_and_do_not_change_the_output():
    layer = condense_to(LearnedGroupConv(8, 4, learned_groups=2, condense_factor=2), 1)
    x = torch.randn(2, 8, 3, 3)
    layer(x).sum().backward()
    dropped = ~layer.mask.expand_as(layer.weight)
    assert layer.weight.grad[dropped].abs().sum() == 0
    before = layer(x)
    with torch.no_grad():
        layer.weight[dropped] = 123.0
    assert torch.equal(layer(x), before)


def test_layer_state_round_trips_through_state_dict():
    source = condense_to(LearnedGroupConv(12, 6, learned_groups=3, condense_factor=3), 1)
    target = LearnedGroupConv(12, 6, learned_groups=3, condense_factor=3)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.mask, source.mask)
    assert int(target.stage) == 1 and int(target.kept_inputs) == 8
    assert torch.equal(target.gather_index(), source.gather_index())


def test_finalize_of_the_root_layer_returns_the_condensed_layer():
    layer = condense_to(LearnedGroupConv(8, 8, learned_groups=2), 1)
    assert isinstance(finalize(layer), CondensedConv2d)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"in_channels": 8, "out_channels": 6, "learned_groups": 4},
            "out channels 6 are not divisible by groups 4",
        ),
        (
            {"in_channels": 6, "out_channels": 8, "learned_groups": 4},
            "in channels 6 are not divisible by condense_factor 4",
        ),
        ({"in_channels": 8, "out_channels": 8, "learned_groups": 0}, "groups must be a positive integer"),
        (
            {"in_channels": 8, "out_channels": 8, "learned_groups": 2, "condense_factor": 2.0},
            "condense_factor must be a positive integer",
        ),
        ({"in_channels": 8, "out_channels": 8, "layout": "x"}, "layout must be one of"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnedGroupConv(**kwargs)


def test_from_conv_rejects_grouped_conv_and_over_condensing_is_an_error():
    with pytest.raises(ValueError, match="grouped convolution"):
        LearnedGroupConv.from_conv(nn.Conv2d(8, 8, 1, groups=2))
    with pytest.raises(TypeError, match="from_conv needs an nn.Conv2d, got Linear"):
        LearnedGroupConv.from_conv(nn.Linear(8, 8))
    layer = condense_to(LearnedGroupConv(8, 8, learned_groups=2, condense_factor=2), 1)
    with pytest.raises(RuntimeError, match="already fully condensed"):
        layer.condense()


def test_hand_edited_mask_is_refused_by_gather_index():
    layer = LearnedGroupConv(8, 8, learned_groups=2)
    with torch.no_grad():
        layer.mask[0, 0] = False
        layer.mask[1, 0] = False
    with pytest.raises(RuntimeError, match="edited by hand"):
        layer.gather_index()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_masked_model_can_be_scripted_traced_and_exported():
    model = nn.Sequential(condense_to(LearnedGroupConv(8, 8, learned_groups=2), 1), nn.ReLU())
    x = torch.randn(1, 8, 3, 3)
    expected = model(x)
    assert torch.equal(torch.jit.script(model)(x), expected)
    assert torch.equal(torch.jit.trace(model, x)(x), expected)
    assert torch.equal(torch.export.export(model, (x,)).module()(x), expected)


NDIM = {
    1: (LearnedGroupConv1d, CondensedConv1d, nn.Conv1d),
    3: (LearnedGroupConv3d, CondensedConv3d, nn.Conv3d),
}


@given(
    cfg=group_configs(max_groups=4, max_factor=4, max_mult=3),
    dims=st.sampled_from([1, 3]),
    kernel=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1]),
    bias=st.booleans(),
    size=st.integers(1, 5),
    batch=st.integers(1, 3),
    stage=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_conv1d_and_conv3d_finalize_equals_masked(
    cfg, dims, kernel, stride, padding, bias, size, batch, stage, seed
):
    """Pointwise and (with ``kxk=True``) kxk layers in 1D and 3D, at any stage, equal after finalize."""
    learned, condensed, _ = NDIM[dims]
    torch.manual_seed(seed)
    layer = learned(
        cfg.in_channels,
        cfg.out_channels,
        kernel,
        learned_groups=cfg.groups,
        condense_factor=cfg.condense_factor,
        layout=cfg.layout,
        stride=stride,
        padding=padding,
        bias=bias,
    )
    assert layer.mask.shape == (cfg.out_channels, cfg.in_channels) + (1,) * dims
    for _ in range(min(stage, layer.max_stage)):
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight) * 0.05)
        layer.condense()
    x = torch.randn(batch, cfg.in_channels, *([size + kernel - 1] * dims))
    final = assert_finalize_exact(layer, x)
    assert type(final) is condensed
    kept = cfg.in_channels - min(stage, layer.max_stage) * (cfg.in_channels // cfg.condense_factor)
    assert final.conv.weight.shape == (cfg.out_channels, kept) + (kernel,) * dims
    assert final.conv.groups == cfg.groups
    assert condensed.from_config(final.config()).conv.weight.shape == final.conv.weight.shape


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_from_conv_compute_the_wrapped_conv_and_share_parameters(dims):
    learned, _, conv_type = NDIM[dims]
    conv = conv_type(8, 12, 1, stride=2)
    layer = learned.from_conv(conv, learned_groups=4)
    x = torch.randn(2, 8, *([5] * dims))
    assert torch.equal(layer(x), conv(x))
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert isinstance(layer, LearnedGroupConvNd) and isinstance(layer, conv_type)
    assert learned_group_conv_type(conv) is learned
    copy_ = learned.from_config(layer.config())
    copy_.load_state_dict(condense_to(layer, 1).state_dict())
    assert torch.equal(copy_(x), layer(x))


def test_from_conv_refuses_a_conv_of_another_dimension():
    with pytest.raises(TypeError, match=r"LearnedGroupConv1d.from_conv needs an nn.Conv1d, got Conv2d"):
        LearnedGroupConv1d.from_conv(nn.Conv2d(4, 4, 1))
    with pytest.raises(TypeError, match="no learned group form for ConvTranspose1d"):
        learned_group_conv_type(nn.ConvTranspose1d(4, 4, 1))


# --- condense(inputs=..., input_scale=...): the gradual and data-aware options of the scheduler ----
@given(cfg=group_configs(), stage=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_importance_with_an_input_scale_is_the_weight_importance_times_the_scale(cfg, stage, seed):
    layer = condense_to(make_conv(cfg, 3, seed=seed), stage)
    scale = torch.rand(cfg.in_channels, generator=torch.Generator().manual_seed(seed))
    expected = naive_importance(layer) * scale.double()
    torch.testing.assert_close(layer.importance(scale).double(), expected, rtol=1e-5, atol=1e-6)
    if layer.fully_condensed:
        return
    before = layer.group_mask().clone()
    layer.condense(input_scale=scale)
    dropped = before & ~layer.group_mask()
    drop = cfg.in_channels // cfg.condense_factor
    for g in range(cfg.groups):
        kept = [j for j in range(cfg.in_channels) if before[g, j]]
        chosen = sorted(kept, key=lambda j: (expected[g, j].item(), j))[:drop]
        assert dropped[g].nonzero()[:, 0].tolist() == sorted(chosen)


@given(cfg=group_configs(), seed=st.integers(0, 2**16), data=st.data())
def test_condense_by_any_number_of_inputs_counts_stages_in_whole_chunks_and_finalizes_exactly(
    cfg, seed, data
):
    layer = make_conv(cfg, seed=seed)
    chunk = cfg.in_channels // cfg.condense_factor
    while not layer.fully_condensed:
        kept = int(layer.kept_inputs)
        drop = data.draw(st.integers(1, kept - chunk))
        before = layer.group_mask().clone()
        layer.condense(drop)
        assert (before.sum(1) - layer.group_mask().sum(1) == drop).all()
        assert not (layer.group_mask() & ~before).any()
        assert int(layer.kept_inputs) == kept - drop
        assert int(layer.stage) == (cfg.in_channels - kept + drop) // chunk
        assert_finalize_exact(layer, torch.randn(2, cfg.in_channels, 3, 3))
        layer.train()
    assert int(layer.stage) == layer.max_stage and int(layer.kept_inputs) == chunk


def test_condense_refuses_a_count_past_the_final_structure_and_a_misshapen_scale():
    layer = LearnedGroupConv(8, 8, learned_groups=2, condense_factor=4)
    with pytest.raises(ValueError, match=r"inputs must be an integer in \[1, 6\].*got 7"):
        layer.condense(7)
    with pytest.raises(ValueError, match=r"inputs must be an integer in \[1, 6\].*got 0"):
        layer.condense(0)
    with pytest.raises(ValueError, match=r"input_scale must have shape \(8,\).*got \(4,\)"):
        layer.condense(input_scale=torch.ones(4))
    assert int(layer.kept_inputs) == 8 and int(layer.stage) == 0
