"""optimize_for_inference: folded batch norms, every kernel and memory format equal the masked model."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import GroupConfig, condense_all, condense_to, group_configs, perturb_
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lgconv
from lgconv.inference import _linear_candidates
from lgconv.layers import (
    DenseGroupedConv2d,
    Folded,
    FusedCondensedConv2d,
    LearnedGroupConv,
    NativeGroupedConv2d,
)
from lgconv.layers.fused_condensed_conv import KERNELS, POINTWISE_KERNELS
from lgconv.models import CondenseNet
from lgconv.models.condensenet import condense_network


def _norm(channels: int, generator: torch.Generator, signs: str, dtype: torch.dtype) -> nn.BatchNorm2d:
    """An eval batch norm with random statistics; ``signs`` makes some scales negative or zero."""
    norm = nn.BatchNorm2d(channels, dtype=dtype).eval()
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(channels, generator=generator, dtype=dtype))
        norm.running_var.copy_(torch.rand(channels, generator=generator, dtype=dtype) + 0.5)
        norm.weight.copy_(torch.rand(channels, generator=generator, dtype=dtype) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=generator, dtype=dtype))
        if signs in ("negative", "mixed"):
            norm.weight[::2] *= -1
        if signs == "mixed":
            norm.weight[1::3] = 0
    return norm


class PreAct(nn.Module):
    """BN-ReLU-LGC-BN-ReLU-conv, concatenated to the input as in a dense layer."""

    def __init__(self, lgc: LearnedGroupConv, generator: torch.Generator, signs: str) -> None:
        super().__init__()
        dtype = lgc.weight.dtype
        self.norm1 = _norm(lgc.in_channels, generator, signs, dtype)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = lgc
        self.norm2 = _norm(lgc.out_channels, generator, signs, dtype)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(lgc.out_channels, 3, 3, padding=1, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, new], 1)


def _masked_net(cfg, kernel: int, stage: int, bias: bool, signs: str, seed: int) -> PreAct:
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cfg.in_channels, cfg.out_channels, kernel, padding=kernel // 2, bias=bias)
    conv = conv.double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64))
    lgc = LearnedGroupConv.from_conv(conv, cfg.groups, cfg.condense_factor, cfg.layout)
    condense_to(lgc, stage)
    return PreAct(lgc, generator, signs).eval()


@given(
    cfg=group_configs(),
    kernel=st.sampled_from([1, 3]),
    stage=st.integers(0, 5),
    bias=st.booleans(),
    signs=st.sampled_from(["positive", "negative", "mixed"]),
    fused_kernel=st.sampled_from(KERNELS),
    fold=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_optimised_equals_masked_float64(
    cfg, kernel, stage, bias, signs, fused_kernel, fold, channels_last, seed
):
    masked = _masked_net(cfg, kernel, stage, bias, signs, seed)
    x = torch.randn(2, cfg.in_channels, 5, 5, dtype=torch.float64) * 2
    with torch.no_grad():
        expected = masked(x.clone())
        final = lgconv.finalize(copy.deepcopy(masked), allow_partial=True)
        fast = lgconv.optimize_for_inference(
            final, fold=fold, kernel=fused_kernel, channels_last=channels_last
        )
        actual = fast(x.clone())
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)
    pointwise_only = fused_kernel in POINTWISE_KERNELS and kernel != 1
    assert isinstance(fast.conv1, FusedCondensedConv2d)
    assert fast.conv1.kernel == ("dense" if pointwise_only else fused_kernel)
    folded_pre = fold and kernel == 1  # a padded conv cannot take the shift of its input norm
    assert isinstance(fast.norm1, Folded) == folded_pre
    assert isinstance(fast.relu1, Folded) == folded_pre
    assert isinstance(fast.norm2, Folded) == fold
    assert isinstance(fast.relu2, nn.ReLU)


@pytest.mark.parametrize("fused_kernel", KERNELS)
def test_kernel_structure(fused_kernel):
    """grouped gathers and reorders, dense and matmul do neither, dense_kept gathers only the kept inputs."""
    masked = _masked_net(GroupConfig(16, 8, 4, 4, "interleaved"), 1, 3, False, "positive", 0)
    final = lgconv.finalize(copy.deepcopy(masked))
    layer = lgconv.optimize_for_inference(final, kernel=fused_kernel).conv1
    kept = masked.conv1.group_mask().any(0).sum().item()
    assert layer.clamp == "low"  # every batch norm scale is positive: a one-sided maximum suffices
    if fused_kernel in ("grouped", "native"):
        assert layer.conv.groups == 4 and layer.order is not None
        assert layer.index.numel() == 4 * masked.conv1.kept_inputs.item()
    elif fused_kernel in ("dense", "matmul"):
        assert layer.conv.groups == 1 and layer.index is None and layer.order is None
    else:
        assert layer.conv.groups == 1 and layer.index.numel() == kept and layer.order is None


def _condensenet() -> CondenseNet:
    torch.manual_seed(0)
    model = CondenseNet((2, 2), (4, 8), num_classes=5, groups=2)
    condense_network(model, groups=2, condense_factor=2, classifier_condense_factor=2)
    perturb_(model)
    return condense_all(model).eval()


@pytest.mark.parametrize("channels_last", [None, True])
def test_without_an_example_the_1x1_layers_take_the_native_kernel_on_planes(channels_last):
    """The native op computes only the kept connections; in channels-last the dense kernel stays."""
    if not lgconv.kernels.load_native():
        pytest.skip("the native kernels are not built here")
    final = lgconv.finalize(_condensenet())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = final(x)
        served = lgconv.optimize_for_inference(final, channels_last=channels_last)
        torch.testing.assert_close(served(x), expected, rtol=1e-5, atol=1e-5)
    kinds = {m.kernel for m in served.modules() if isinstance(m, FusedCondensedConv2d)}
    assert kinds == ({"dense"} if channels_last else {"native"})


@pytest.mark.parametrize("channels_last", [None, False, True])
def test_condensenet_autotuned_equals_masked(channels_last):
    masked = _condensenet()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = masked(x)
        fast = lgconv.optimize_for_inference(
            lgconv.finalize(copy.deepcopy(masked)), x, channels_last=channels_last, repeats=1
        )
        actual = fast(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    fused = [m for m in fast.modules() if isinstance(m, FusedCondensedConv2d)]
    assert len(fused) == 4 and all(m.low is not None for m in fused)
    assert sum(isinstance(m, Folded) for m in fast.modules()) == 12  # norm1, relu1, norm2 per layer
    if channels_last:
        assert fused[0].conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_dropout_between_relu_and_conv_is_skipped_over():
    model = CondenseNet((2,), (4,), num_classes=3, groups=2, drop_rate=0.2)
    condense_network(model, groups=2, condense_factor=2, classifier_condense_factor=1)
    masked = condense_all(perturb_(model)).eval()
    fast = lgconv.optimize_for_inference(lgconv.finalize(copy.deepcopy(masked)))
    assert isinstance(fast.features.denseblock1.denselayer1.norm1, Folded)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked(x), atol=1e-5, rtol=1e-5)


def test_timm_batchnorm_act_is_folded():
    """timm's BatchNormAct2d (BN + ReLU in one module) before and after a condensed conv."""
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(
        BatchNormAct2d(8), nn.Conv2d(8, 8, 1, bias=False), BatchNormAct2d(8), nn.Conv2d(8, 4, 3, padding=1)
    )
    masked = condense_all(perturb_(lgconv.condensify(model, 2, 2, layout="interleaved"))).eval()
    fast = lgconv.optimize_for_inference(lgconv.finalize(copy.deepcopy(masked)))
    assert isinstance(fast[0], Folded) and not fast[0].relu
    assert isinstance(fast[2], Folded) and fast[2].relu
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked(x), atol=1e-5, rtol=1e-5)


def test_a_norm_with_two_readers_is_not_folded():
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.conv = nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.norm(x))
            return self.conv(y) + y

    masked = condense_all(perturb_(lgconv.condensify(Branches(), 2, 2))).eval()
    fast = lgconv.optimize_for_inference(lgconv.finalize(copy.deepcopy(masked)))
    assert isinstance(fast.norm, nn.BatchNorm2d) and isinstance(fast.relu, nn.ReLU)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked(x), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    masked = lgconv.models.condensenet50()
    masked = condense_all(perturb_(masked)).eval()
    fast = lgconv.optimize_for_inference(lgconv.finalize(copy.deepcopy(masked)))
    path = tmp_path / "fast.safetensors"
    lgconv.save(fast, path)
    loaded = lgconv.load(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), atol=0, rtol=0)
        torch.testing.assert_close(loaded(x), masked(x), atol=1e-5, rtol=1e-5)


def test_scripted_and_exported_optimised_model_match_eager():
    fast = lgconv.optimize_for_inference(lgconv.finalize(copy.deepcopy(_condensenet())))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = fast(x)
        torch.testing.assert_close(torch.jit.script(fast)(x), expected)
        torch.testing.assert_close(torch.export.export(fast, (x,)).module()(x), expected)


def test_errors_name_the_fix():
    masked = _condensenet()
    with pytest.raises(ValueError, match="finalize"):
        lgconv.optimize_for_inference(copy.deepcopy(masked))
    final = lgconv.finalize(copy.deepcopy(masked))
    with pytest.raises(ValueError, match="kernel must be"):
        lgconv.optimize_for_inference(copy.deepcopy(final), kernel="sparse")
    with pytest.raises(ValueError, match="eval"):
        lgconv.optimize_for_inference(copy.deepcopy(final).train())
    with pytest.raises(ValueError, match="no CondensedConv2d"):
        lgconv.optimize_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1)).eval())


def test_condensed_linear_layers_get_the_fastest_of_three_exact_forms():
    """ConvNeXt / ViT MLPs condensed with linear=True: as they are, the fused op, or dense with zeros."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))
    lgconv.condensify(model, 2, linear=True, layout="interleaved")
    model = perturb_(lgconv.finalize(condense_all(model))).eval()
    layer = model[0]
    forms = _linear_candidates(layer)
    assert [type(f).__name__ for f in forms] == ["CondensedLinear", "CondensedLinear", "Linear"]
    assert forms[1].kernel == "native" and "kernel=native" in repr(forms[1])
    x = torch.randn(2, 5, 12)  # leading dims, as tokens
    with torch.no_grad():
        for form in forms:
            torch.testing.assert_close(form(x), layer(x), rtol=1e-5, atol=1e-5)
        expected = model(x)
        served = lgconv.optimize_for_inference(model, x)
        torch.testing.assert_close(served(x), expected, rtol=1e-5, atol=1e-5)
    assert served is model


@pytest.mark.parametrize("dense_grouped", [True, None])
def test_grouped_convs_densified_equal_masked_and_reload(tmp_path, dense_grouped):
    torch.manual_seed(0)
    masked = condense_all(perturb_(lgconv.models.condensenet50())).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = lgconv.optimize_for_inference(
        lgconv.finalize(copy.deepcopy(masked)),
        x if dense_grouped is None else None,
        kernel="grouped",
        dense_grouped=dense_grouped,
        repeats=1,
    )
    dense = [m for m in fast.modules() if isinstance(m, DenseGroupedConv2d)]
    if dense_grouped:
        assert len(dense) == 24 and all(m.groups == 1 and m.folded_groups == 4 for m in dense)
    assert all(m.conv.groups == 4 for m in fast.modules() if isinstance(m, FusedCondensedConv2d))
    lgconv.save(fast, tmp_path / "m.safetensors")
    loaded = lgconv.load(tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(x), fast(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_matmul_kernel_reads_channel_slices_of_a_wider_tensor(memory_format):
    """A dense block hands layers a channel slice of its preallocated output: strided, not contiguous."""
    masked = _masked_net(GroupConfig(16, 8, 4, 4, "interleaved"), 1, 3, True, "mixed", 0)
    final = lgconv.finalize(copy.deepcopy(masked))
    dense = lgconv.optimize_for_inference(copy.deepcopy(final), fold=False, kernel="dense").conv1
    matmul = lgconv.optimize_for_inference(copy.deepcopy(final), fold=False, kernel="matmul").conv1
    wide = torch.randn(2, 24, 5, 5, dtype=torch.float64).contiguous(memory_format=memory_format)
    x = wide[:, :16]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(matmul(x), dense(x), atol=1e-10, rtol=1e-10)


def test_matmul_kernel_refuses_what_is_not_a_pointwise_conv():
    with pytest.raises(ValueError, match="kernel='dense'"):
        FusedCondensedConv2d(8, 8, 3, kernel="matmul", padding=1)


def test_layers_are_timed_on_inputs_with_their_real_strides():
    """The tuner's copy of a layer input keeps a channel slice's strides (and copes with expanded inputs)."""
    from lgconv.inference import _strided_copy

    wide = torch.randn(2, 24, 5, 5).contiguous(memory_format=torch.channels_last)
    sliced = wide[:, :16]
    copied = _strided_copy(sliced)
    assert copied.stride() == sliced.stride() and copied.data_ptr() != sliced.data_ptr()
    torch.testing.assert_close(copied, sliced)
    expanded = torch.randn(1, 16, 1, 1).expand(2, 16, 5, 5)
    torch.testing.assert_close(_strided_copy(expanded), expanded)


def test_layers_saved_with_the_old_boolean_clamp_still_load():
    """lgconv 0.1.0 wrote clamp=True/False and always both bounds; such a config keeps both."""
    layer = FusedCondensedConv2d(8, 4, clamp="low")
    old = {**layer.config(), "clamp": True}
    rebuilt = FusedCondensedConv2d.from_config(old)
    assert rebuilt.clamp == "both" and rebuilt.low is not None and rebuilt.high is not None
    assert FusedCondensedConv2d.from_config({**old, "clamp": False}).clamp is None


def test_a_narrow_plain_3x3_conv_is_offered_the_native_op(monkeypatch):
    """A stem (a 3x3 conv over 3 inputs, which oneDNN runs on its slow path in NCHW) may become
    ``NativeGroupedConv2d``; a strided or wide plain conv is not offered it."""
    from lgconv import inference, kernels

    if not kernels.load_native():
        pytest.skip("the native kernels are not built here")
    monkeypatch.setattr(inference, "_fastest", lambda candidates, x, repeats: candidates[-1])
    torch.manual_seed(0)
    masked = condense_all(perturb_(lgconv.models.condensenet50())).eval()
    x = torch.randn(1, 3, 32, 32)
    fast = lgconv.optimize_for_inference(lgconv.finalize(copy.deepcopy(masked)), x, repeats=1)
    assert type(fast.features.conv0) is NativeGroupedConv2d
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked(x), atol=1e-5, rtol=1e-5)
    assert not inference._narrow_window(nn.Conv2d(3, 16, 3, padding=1, stride=2))
    assert not inference._narrow_window(nn.Conv2d(64, 64, 3, padding=1))
