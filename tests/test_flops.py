"""count_flops: hand-computed counts for single layers, lgconv's rules, and agreement with FlopCounterMode."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import timm
import torch
import torchvision
from helpers import TinyConvNet, condense_all, condense_to
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lgconv
from lgconv.flops import FVCORE, TORCH_COUNTER
from lgconv.layers import CondensedConv2d, CondensedLinear, LearnedGroupConv, LearnedGroupLinear

MATMUL_OPS = {"conv", "linear", "addmm", "matmul", "mm", "bmm", "einsum"}


def quiet_count(model: nn.Module, *args, **kwargs) -> lgconv.FlopReport:
    """count_flops that must not warn at all (the lgconv layers' own ops are never 'unsupported')."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return lgconv.count_flops(model, *args, **kwargs)


def test_conv_counts_out_in_kernel_and_output_pixels() -> None:
    report = quiet_count(nn.Conv2d(8, 16, 3, padding=1), (8, 10, 10), batch_size=2)
    assert report.total == 2 * 16 * 8 * 9 * 10 * 10
    assert report.by_operator() == {"conv": report.total}
    assert report.counter == FVCORE and report.unit == "multiply-adds"


def test_grouped_conv_counts_per_group() -> None:
    report = quiet_count(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4), (8, 10, 10))
    assert report.total == 16 * (8 // 4) * 9 * 5 * 5


def test_linear_counts_in_times_out_per_row() -> None:
    report = quiet_count(nn.Linear(20, 30), (20,), batch_size=3)
    assert report.total == 3 * 20 * 30
    assert report.params == 20 * 30 + 30


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_learned_group_conv_counts_only_kept_connections(stage: int, layout: str) -> None:
    layer = condense_to(LearnedGroupConv(16, 8, 1, learned_groups=4, condense_factor=4, layout=layout), stage)
    report = quiet_count(layer, (16, 6, 6))
    kept = 16 - 4 * stage
    assert report.total == 8 * kept * 36
    assert report.dense_total == 8 * 16 * 36
    assert report.unsupported == {}  # weight * mask is bookkeeping, not an unknown operator
    assert report.params == 8 * kept + 8 and report.dense_params == 8 * 16 + 8


def test_learned_group_conv_with_kernel_and_stride() -> None:
    layer = condense_to(
        LearnedGroupConv(8, 8, 3, learned_groups=2, condense_factor=2, stride=2, padding=1), 1
    )
    report = quiet_count(layer, (8, 8, 8))
    assert report.total == 8 * 4 * 9 * 4 * 4
    assert report.dense_total == 8 * 8 * 9 * 4 * 4


@pytest.mark.parametrize("stage", [0, 1])
def test_learned_group_linear_counts_only_kept_connections(stage: int) -> None:
    layer = condense_to(LearnedGroupLinear(12, 8, learned_groups=2, condense_factor=2), stage)
    report = quiet_count(layer, (12,), batch_size=5)
    assert report.total == 5 * 8 * (12 - 6 * stage)
    assert report.dense_total == 5 * 8 * 12


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_condensed_conv_counts_grouped_conv_and_free_gather(layout: str) -> None:
    learned = condense_to(
        LearnedGroupConv(16, 12, 3, learned_groups=4, condense_factor=2, padding=1, layout=layout), 1
    )
    layer = CondensedConv2d.from_learned(learned)
    report = quiet_count(layer, (16, 5, 5))
    assert report.total == 12 * 8 * 9 * 25  # every output sees kept_inputs=8 channels, 3x3
    assert report.dense_total == 12 * 16 * 9 * 25
    assert report.unsupported == {}
    assert report.params == 12 * 8 * 9 + 12 and report.dense_params == 12 * 16 * 9 + 12


@pytest.mark.parametrize("groups", [1, 4])
def test_condensed_linear_counts_kept_inputs_per_output(groups: int) -> None:
    learned = condense_to(LearnedGroupLinear(16, 8, learned_groups=groups, condense_factor=4), 3)
    report = quiet_count(CondensedLinear.from_learned(learned), (16,), batch_size=2)
    assert report.total == 2 * 8 * 4
    assert report.dense_total == 2 * 8 * 16


def test_masked_and_finalized_models_count_the_same() -> None:
    model = lgconv.condensify(TinyConvNet(in_channels=3), groups=4, linear=False)
    condense_all(model, stage=2)
    masked = quiet_count(model, (3, 8, 8))
    final = quiet_count(lgconv.finalize(copy.deepcopy(model), allow_partial=True), (3, 8, 8))
    assert masked.total == final.total < masked.dense_total == final.dense_total
    assert masked.params == final.params and masked.dense_params == final.dense_params
    assert masked.by_module()["block.2"] == final.by_module()["block.2"]


def test_dense_total_of_a_masked_model_is_the_original_count() -> None:
    original = TinyConvNet(in_channels=3)
    before = quiet_count(original, (3, 8, 8)).total
    model = condense_all(lgconv.condensify(copy.deepcopy(original), groups=4))
    report = quiet_count(model, (3, 8, 8))
    assert report.dense_total == before
    assert report.total < before
    assert report.lgconv_layers == 2


def test_paper_convention_counts_relu_and_pooling_but_not_batch_norm() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    report = lgconv.count_flops(model, (3, 8, 8), convention="paper")
    conv, relu, pool, adaptive, linear = 8 * 3 * 9 * 64, 8 * 64, 4 * 8 * 16, 8 * 16, 8 * 5
    assert report.by_operator() == {
        "conv": conv,
        "relu": relu,
        "avg_pool2d": pool,
        "adaptive_avg_pool2d": adaptive,
        "linear": linear,
    }
    assert report.total == conv + relu + pool + adaptive + linear
    with pytest.warns(UserWarning, match="avg_pool2d"):
        fvcore = lgconv.count_flops(model, (3, 8, 8))
    assert "batch_norm" in fvcore.by_operator() and "relu" not in fvcore.by_operator()


def test_paper_convention_is_the_same_with_the_fallback_counter() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1)).eval()
    traced = torch.jit.trace(model, torch.randn(1, 3, 8, 8))
    fallback = lgconv.count_flops(traced, (3, 8, 8), convention="paper")
    assert fallback.counter == TORCH_COUNTER and fallback.fallback_reason
    assert fallback.by_operator() == lgconv.count_flops(model, (3, 8, 8), convention="paper").by_operator()


def test_unknown_operators_are_summarised_in_one_warning() -> None:
    model = timm.create_model("test_resnet", num_classes=4)
    with pytest.warns(UserWarning) as caught:
        report = lgconv.count_flops(model, (3, 32, 32))
    assert len(caught) == 1
    assert "aten::add" in str(caught[0].message)
    assert report.unsupported["aten::add_"] > 1
    assert report.unsupported_summary() in report.table()


def torch_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm.create_model("resnet18", num_classes=10),
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    ],
    ids=["timm-resnet18", "torchvision-mobilenet_v3_small"],
)
def test_finalized_models_agree_with_torch_flop_counter(build) -> None:
    model = condense_all(lgconv.condensify(build(), groups=4, linear=True)).eval()
    model = lgconv.finalize(model)
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lgconv.count_flops(model, inputs=x)
    matmuls = sum(v for op, v in report.by_operator().items() if op in MATMUL_OPS)
    assert matmuls == torch_counter_macs(model, x)
    assert report.total < report.dense_total


def test_torchscript_falls_back_to_torch_counter_and_says_so() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2)).eval()
    scripted = torch.jit.trace(model, torch.randn(1, 3, 4, 4))
    report = lgconv.count_flops(scripted, (3, 4, 4))
    assert report.counter == TORCH_COUNTER
    assert report.total == 4 * 3 * 16 + 64 * 2
    assert TORCH_COUNTER in report.table()


def test_wrong_input_size_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"failed on an input of shape 1x5x8x8"):
        lgconv.count_flops(nn.Conv2d(3, 4, 1), (5, 8, 8))


def test_bad_arguments_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="convention"):
        lgconv.count_flops(nn.Conv2d(3, 4, 1), (3, 8, 8), convention="macs")
    with pytest.raises(ValueError, match="input size"):
        lgconv.count_flops(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="positive"):
        lgconv.count_flops(nn.Conv2d(3, 4, 1), (3, 0, 8))


def test_input_size_defaults_to_what_the_model_declares() -> None:
    model = timm.create_model("test_resnet", num_classes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lgconv.count_flops(model)
    assert report.input_shapes == ((1, *model.pretrained_cfg["input_size"]),)


def test_report_views_are_consistent_and_json_ready() -> None:
    model = lgconv.condensify(TinyConvNet(in_channels=3), groups=2)
    condense_all(model)
    model.train()
    report = quiet_count(model, (3, 8, 8))
    assert model.training and all(m.training for m in model.modules())  # training mode restored
    assert sum(report.by_operator().values()) == report.total == report.by_module()[""]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["total"] == report.total and data["unit"] == "multiply-adds"
    table = report.table(depth=1)
    assert "block.2" not in table and "block" in table and "dense" in table
    assert "conv" in report.table(by="operator")
    with pytest.raises(ValueError, match="no module named"):
        report.by_operator("nope")


class DictOutput(nn.Module):
    """A model jit tracing rejects (a non-tensor output), so count_flops must fall back."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.net(x), "version": 3}


def test_fallback_counter_applies_the_lgconv_rules_too() -> None:
    net = condense_all(lgconv.condensify(TinyConvNet(in_channels=3), groups=4), stage=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fallback = lgconv.count_flops(DictOutput(net), (3, 8, 8))
        traced = lgconv.count_flops(net, (3, 8, 8))
    assert fallback.counter == TORCH_COUNTER and "tracer" in fallback.fallback_reason
    assert fallback.by_operator()["conv"] == traced.by_operator()["conv"]
    assert fallback.by_module()["net.block.2"] == traced.by_module()["block.2"]
    assert fallback.dense_total - fallback.total == traced.dense_total - traced.total > 0


class TokenInput(nn.Module):
    """A parameter fed to a submodule (like ViT class tokens), behind an output jit cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 4))
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.linear(self.token) + self.linear(x), "version": 3}


def test_fallback_counts_parameters_fed_to_submodules_and_restores_requires_grad() -> None:
    model = TokenInput()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lgconv.count_flops(model, (4,), batch_size=3)
    assert report.counter == TORCH_COUNTER
    assert report.total == 1 * 4 * 2 + 3 * 4 * 2
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_learned_and_condensed_layers_count_kept_connections(dims: int) -> None:
    conv = (nn.Conv1d, nn.Conv3d)[dims // 3]
    model = nn.Sequential(conv(8, 16, 1), nn.ReLU(), conv(16, 8, 1, stride=2))
    x = torch.randn(1, 8, *([6] * dims))
    dense = lgconv.count_flops(model, inputs=x).total
    masked = condense_all(lgconv.condensify(model, groups=4))
    report = lgconv.count_flops(masked, inputs=x)
    assert report.dense_total == dense and report.total == dense // 4
    assert lgconv.count_flops(lgconv.finalize(masked), inputs=x).total == dense // 4


def test_inputs_may_be_a_list_of_images_as_detectors_take() -> None:
    class ListInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([self.conv(image[None]).flatten() for image in images])

    report = lgconv.count_flops(ListInput(), inputs=[[torch.randn(3, 4, 4), torch.randn(3, 2, 2)]])
    assert report.total == 3 * 4 * (16 + 4)
    assert report.input_shapes == ((3, 4, 4), (3, 2, 2))
