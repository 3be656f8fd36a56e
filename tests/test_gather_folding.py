"""lgconv.gather_folding: a condensed conv's input gather moves into the conv producing its input."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import torch
from helpers import condense_all, perturb_
from torch import nn

import lgconv
from lgconv.gather_folding import fold_gathers_into_producers
from lgconv.layers import CondensedConv2d


class Chain(nn.Module):
    """stem 3x3 conv -> per-channel modules (``between``) -> condensed 1x1 ``head``; ``tap`` also
    reads the stem's output when ``shared``."""

    def __init__(self, between: str = "bn-relu", width: int = 16, shared: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.mid = (
            nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
            if between == "bn-relu"
            else nn.Sequential(nn.ReLU(), nn.BatchNorm2d(width), nn.Identity())
        )
        self.head = nn.Conv2d(width, 2 * width, 1)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.head(self.mid(s))
        return y + s.mean() if self.shared else y


def finalized(between: str = "bn-relu", groups: int = 4, condense_factor: int = 4, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = Chain(between, **kwargs)
    lgconv.condensify(model, groups, condense_factor, include=["head"], layout="interleaved")
    perturb_(condense_all(model)).eval()
    return lgconv.finalize(model).eval()


@pytest.mark.parametrize("between", ["bn-relu", "relu-bn"])
def test_the_producer_computes_the_gathered_channels_and_the_outputs_stay(between) -> None:
    model = finalized(between)
    folded = copy.deepcopy(model)
    assert fold_gathers_into_producers(folded) == ["head"]
    head = folded.head
    assert isinstance(head, CondensedConv2d) and torch.equal(head.index, torch.arange(head.index.numel()))
    assert folded.stem.out_channels == model.head.index.numel()
    # A batch norm right after the producer is folded into it; one further on is indexed alike.
    norm_kinds = [type(m).__name__ for m in folded.mid]
    assert norm_kinds == (
        ["Identity", "ReLU"] if between == "bn-relu" else ["ReLU", "BatchNorm2d", "Identity"]
    )
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_producer_read_elsewhere_too_keeps_its_outputs() -> None:
    model = finalized(shared=True)
    assert fold_gathers_into_producers(model) == []
    assert model.stem.out_channels == 16


def test_a_producer_that_would_grow_is_left_alone() -> None:
    """G = 4 groups each keeping half the inputs gather 2x the channels the stem makes."""
    model = finalized(groups=4, condense_factor=2)
    assert model.head.index.numel() > model.stem.out_channels
    assert fold_gathers_into_producers(model) == []


def test_an_untraceable_model_is_left_as_it_is() -> None:
    class Branching(Chain):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = self.stem(x)
            return self.head(self.mid(s)) if s.sum() > 0 else s  # data-dependent: fx cannot trace it

    torch.manual_seed(0)
    model = Branching()
    lgconv.condensify(model, 4, include=["head"])
    model = lgconv.finalize(condense_all(model)).eval()
    assert fold_gathers_into_producers(model) == []


def test_export_onnx_writes_no_gather_for_a_folded_layer(tmp_path: Path) -> None:
    model = finalized()
    path = tmp_path / "chain.onnx"
    report = lgconv.export_onnx(model, path, torch.randn(1, 3, 9, 9), repeats=1)
    assert report.folded_gathers == ("head",) and "input gathers folded" in str(report)
    operators = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Gather" not in operators
