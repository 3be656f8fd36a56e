"""condensify / plan: which layers are replaced, why the others are skipped, and bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TinyConvNet, tiny_mlp
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d
from torch import nn
from torch.nn.utils import parametrizations
from torchvision.models.swin_transformer import ShiftedWindowAttention

import lgconv
from lgconv import LearnedGroupConv, LearnedGroupLinear


def decisions(model: nn.Module, **kwargs) -> dict[str, tuple[bool, str]]:
    return {d.name: (d.condense, d.reason) for d in lgconv.plan(model, **kwargs).decisions}


def test_only_plain_1x1_ungrouped_divisible_convs_are_eligible():
    model = nn.Sequential(
        nn.Conv2d(8, 8, 1),
        StdConv2d(8, 8, 1),
        ScaledStdConv2d(8, 8, 1),
        Conv2dSame(8, 8, 1),
        nn.Conv2d(8, 8, 1, groups=2),
        nn.Conv2d(8, 8, 1, groups=8),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 6, 1),
        nn.Conv2d(6, 8, 1),
        nn.ConvTranspose2d(8, 8, 1),
        nn.Linear(8, 8),
    )
    result = decisions(model)
    assert result["0"] == (True, "eligible")
    assert result["1"] == (False, "StdConv2d is a Conv2d subclass with its own forward")
    assert result["2"] == (False, "ScaledStdConv2d is a Conv2d subclass with its own forward")
    assert result["3"] == (False, "Conv2dSame is a Conv2d subclass with its own forward")
    assert result["4"] == (False, "grouped convolution (groups=2) is already sparse")
    assert result["5"] == (False, "depthwise convolution (groups=8) is already sparse")
    assert result["6"] == (False, "kernel 3x3: only 1x1 convolutions are condensed")
    assert result["7"] == (False, "out channels 6 not divisible by groups 4")
    assert result["8"] == (False, "in channels 6 not divisible by condense_factor 4")
    assert result["9"][0] is False
    assert result["9"][1].startswith("ConvTranspose2d: only Conv1d, Conv2d, Conv3d")
    assert result["10"] == (False, "Linear layers are condensed only with linear=True")
    lgconv.condensify(model)
    assert isinstance(model[0], LearnedGroupConv)
    assert [type(m) for m in model[1:]] == [
        StdConv2d, ScaledStdConv2d, Conv2dSame, nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Conv2d,
        nn.ConvTranspose2d, nn.Linear,
    ]  # fmt: skip


def test_pointwise_conv1d_and_conv3d_learn_groups_and_their_kxk_ones_are_skipped_with_a_reason():
    model = nn.Sequential(
        nn.Conv1d(8, 8, 1),
        nn.Conv1d(8, 8, 3, padding=1),
        nn.Conv1d(8, 8, 1, groups=8),
        nn.Conv3d(8, 8, 1, stride=2),
        nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)),
    )
    result = decisions(model)
    assert result["0"] == (True, "eligible")
    assert result["1"] == (False, "kernel 3: only kernel-1 convolutions are condensed")
    assert result["2"] == (False, "depthwise convolution (groups=8) is already sparse")
    assert result["3"] == (True, "eligible")
    assert result["4"] == (False, "kernel 1x3x3: only 1x1x1 convolutions are condensed")
    lgconv.condensify(model)
    assert [type(m).__name__ for m in model] == [
        "LearnedGroupConv1d", "Conv1d", "Conv1d", "LearnedGroupConv3d", "Conv3d",
    ]  # fmt: skip


def test_a_plain_subclass_without_its_own_forward_is_skipped_too():
    class Tagged(nn.Conv2d):
        pass

    assert decisions(nn.Sequential(nn.Conv2d(4, 4, 1), Tagged(4, 4, 1)))["1"] == (
        False,
        "Tagged is a Conv2d subclass (only plain layers are replaced)",
    )


def test_hooks_and_parametrizations_are_skipped_because_replacing_would_drop_them():
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
    model[0].register_forward_hook(lambda *args: None)
    model[1].register_forward_pre_hook(lambda *args: None)
    parametrizations.weight_norm(model[2])
    result = decisions(model)
    assert result["0"] == result["1"] == (False, "has hooks registered that replacing the module would drop")
    assert result["2"][0] is False and "parametrizations" in result["2"][1]
    assert result["3"] == (True, "eligible")


class RawWeightUser(nn.Module):
    """Passes its child's weight to a functional op: a mask applied in the child's forward is bypassed."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.conv(x).mean((2, 3)) if self.conv.weight.dtype == x.dtype else x
        return self.fc(nn.functional.linear(x, self.proj.weight))


def test_a_layer_whose_parent_reads_its_weight_directly_is_skipped():
    result = decisions(RawWeightUser(), linear=True)
    assert result["proj"] == (
        False,
        "RawWeightUser.forward reads self.proj.weight directly, bypassing the layer's forward",
    )
    assert result["fc"] == result["conv"] == (True, "eligible")  # .weight.dtype is harmless
    attention = ShiftedWindowAttention(8, window_size=[2, 2], shift_size=[0, 0], num_heads=2)
    assert decisions(attention, linear=True)["qkv"][1].startswith("ShiftedWindowAttention.forward reads")


def test_include_and_exclude_globs_on_qualified_names():
    model = TinyConvNet(width=8)
    assert decisions(model, exclude="block.2")["block.2"] == (False, "excluded by pattern 'block.2'")
    assert decisions(model, exclude=["x", "block.*"])["block.8"] == (False, "excluded by pattern 'block.*'")
    only = decisions(model, include=["block.8"])
    assert only["block.2"] == (False, "not matched by the include patterns")
    assert only["block.8"] == (True, "eligible")


def test_linear_layers_with_linear_true():
    model = lgconv.condensify(tiny_mlp(), groups=2, condense_factor=4, linear=True)
    assert all(isinstance(m, LearnedGroupLinear) for m in (model[0], model[2]))
    assert model[0].condense_factor == 4 and model[0].learned_groups == 2


def test_plan_is_a_dry_run_with_a_readable_table():
    model = TinyConvNet(width=8)
    before = copy.deepcopy(model.state_dict())
    table = lgconv.plan(model, groups=4).table()
    assert [type(m) for m in model.modules()] == [type(m) for m in TinyConvNet(width=8).modules()]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    lines = table.splitlines()
    assert lines[0].split() == ["module", "type", "shape", "decision", "reason"]
    assert lines[1].startswith("---")
    row = next(line for line in lines if line.startswith("block.2 "))
    assert (
        row.split()[:4] == ["block.2", "Conv2d", "8->16", "1x1"] and "condense" in row and "eligible" in row
    )
    assert any(line.startswith("stem ") and "skip" in line and "kernel 3x3" in line for line in lines)
    assert lines[-1] == "2 of 5 layers condensed (groups=4, condense_factor=4, layout=contiguous)"
    assert str(lgconv.plan(model)) == table


def test_condensified_model_computes_the_same_and_twice_does_not_double_wrap():
    model = TinyConvNet(width=8).eval()
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    lgconv.condensify(model, groups=2, condense_factor=4, layout="interleaved")
    assert torch.equal(model(x), expected)
    layers = [m for m in model.modules() if isinstance(m, LearnedGroupConv)]
    assert len(layers) == 2 and layers[0].layout == "interleaved"
    modules_before = len(list(model.modules()))
    again = lgconv.condensify(model, groups=4)
    assert again is model and len(list(model.modules())) == modules_before
    assert [m for m in model.modules() if isinstance(m, LearnedGroupConv)] == layers
    assert all(m.learned_groups == 2 for m in layers)  # the second call's settings did not apply
    assert decisions(model)["block.2"] == (False, "already a LearnedGroupConv")


def test_a_finalized_model_is_not_condensified_again():
    model = lgconv.condensify(nn.Sequential(nn.Conv2d(8, 8, 1)), groups=2, condense_factor=1)
    lgconv.finalize(model)
    assert decisions(model)["0"] == (False, "already finalized")
    assert "CondensedConv2d  8->8 1x1" in lgconv.plan(model).table()
    with pytest.raises(ValueError, match="found no eligible layer"):
        lgconv.condensify(model)


def test_a_shared_module_is_replaced_at_every_parent():
    shared = nn.Conv2d(8, 8, 1)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared))
    assert len(lgconv.plan(model).decisions) == 1
    lgconv.condensify(model)
    assert isinstance(model[0][0], LearnedGroupConv) and model[0][0] is model[1][0]
    lgconv.finalize(model, allow_partial=True)
    assert model[0][0] is model[1][0] and isinstance(model[0][0], lgconv.CondensedConv2d)


class SameConvTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(8, 8, 1)
        self.second = self.first

    def forward(self, x):
        return self.second(self.first(x))


def test_a_module_registered_under_two_names_of_one_parent_is_replaced_under_both():
    model = lgconv.condensify(SameConvTwice(), groups=2)
    assert isinstance(model.second, LearnedGroupConv) and model.second is model.first
    lgconv.finalize(model, allow_partial=True)
    assert isinstance(model.second, lgconv.CondensedConv2d) and model.second is model.first


def test_the_root_module_itself_can_be_a_conv():
    conv = nn.Conv2d(8, 8, 1)
    layer = lgconv.condensify(conv, groups=2)
    assert isinstance(layer, LearnedGroupConv) and layer.weight is conv.weight
    assert lgconv.plan(conv).table().splitlines()[2].startswith("(root)")


def test_nothing_eligible_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(
        ValueError, match=r"found no eligible layer in Sequential \(2 conv/linear layers skipped"
    ):
        lgconv.condensify(model)
    with pytest.raises(ValueError, match="found no eligible layer"):
        lgconv.condensify(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"groups": 0}, ValueError, "groups must be a positive integer, got 0"),
        ({"groups": 4, "condense_factor": -1}, ValueError, "condense_factor must be a positive integer"),
        ({"layout": "x"}, ValueError, "layout must be one of"),
        ({"include": 5}, TypeError, "include must be a glob string or a list of them, got 5"),
        ({"exclude": ["a", 1]}, TypeError, "exclude must be a glob string or a list of them"),
    ],
)
def test_bad_arguments_have_clear_messages(kwargs, error, message):
    with pytest.raises(error, match=message):
        lgconv.condensify(TinyConvNet(width=8), **kwargs)


def test_a_non_module_is_refused():
    with pytest.raises(TypeError, match="condensify needs an nn.Module, got list"):
        lgconv.condensify([nn.Conv2d(4, 4, 1)])
