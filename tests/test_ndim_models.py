"""1D and 3D networks through the whole lifecycle: a separable-Conv1d speech net trained on data made
here, torchvision's r3d_18 on a tiny clip; condensify -> train -> finalize -> count, save/load, serve."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from helpers import perturb_, speech_net
from torch import nn
from zoo_lifecycle import assert_finalized_as_planned, run_lifecycle

import lgconv
from lgconv.layers.learned_group import LearnedGroupMixin

CLASSES = 4


def utterances(
    count: int, features: int = 16, frames: int = 48, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectrogram-like (N, features, frames) inputs: class c lights a band of features that sweeps
    up over time (a rising formant), on top of noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    x = torch.randn(count, features, frames, generator=generator) * 0.5
    time = torch.arange(frames)
    for n, label in enumerate(labels.tolist()):
        band = (label * features // CLASSES + time * 2 // frames) % features
        x[n, band, time] += 2.0
    return x, labels


def test_a_separable_conv1d_speech_net_trains_condenses_and_finalizes_exactly(tmp_path):
    torch.manual_seed(0)
    model = speech_net(classes=CLASSES)
    plan = lgconv.plan(model)
    pointwise = [d for d in plan.decisions if d.shape.endswith(" 1")]
    assert pointwise and all(d.condense for d in pointwise)  # every pointwise Conv1d, residuals too
    assert all(not d.condense for d in plan.decisions if not d.shape.endswith(" 1"))
    model = lgconv.condensify(model)
    layers = [m for m in model.modules() if isinstance(m, LearnedGroupMixin)]
    assert {type(m).__name__ for m in layers} == {"LearnedGroupConv1d"} and len(layers) == len(pointwise)

    x, y = utterances(64)
    steps = 40
    scheduler = lgconv.CondensationScheduler(model, steps, lasso=1e-4)
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x).mean(-1), y)
        (loss + scheduler.lasso_loss()).backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    assert all(layer.fully_condensed for layer in layers)
    assert losses[-1] < 0.5 * losses[0]

    model.eval()
    test_x, test_y = utterances(32, seed=1)
    with torch.no_grad():
        masked = model(test_x)
        final = lgconv.finalize(model)
        finalized = final(test_x)
    torch.testing.assert_close(finalized, masked, rtol=1e-5, atol=1e-5)
    assert (finalized.mean(-1).argmax(1) == test_y).float().mean() >= 0.75
    assert sum(type(m).__name__ == "CondensedConv1d" for m in final.modules()) == len(pointwise)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lgconv.count_flops(final, inputs=test_x[:1])
    removed = sum(
        m.conv.weight.numel() * 3 * (test_x.shape[-1] // 2)  # kept 1/4: the removed 3/4 per frame
        for m in final.modules()
        if type(m).__name__ == "CondensedConv1d"
    )
    assert report.dense_total - report.total == removed

    path = lgconv.save(final, tmp_path / "speech.lgc", arch=speech_net, arch_kwargs={"classes": CLASSES})
    loaded = lgconv.load(path, trust_builder=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(test_x), finalized)
        served = lgconv.optimize_for_inference(loaded, test_x)  # no 1D kernels: returned as it is
        assert torch.equal(served(test_x), finalized)


def test_r3d_18_on_a_tiny_clip_condenses_its_1x1x1_convs_and_finalizes_as_planned(tmp_path):
    model = torchvision.models.video.r3d_18(num_classes=5)
    clip = torch.randn(2, 3, 4, 32, 32)
    result = run_lifecycle(model, clip)
    assert len(result["eligible"]) == 3  # the 1x1x1 downsample projections
    assert_finalized_as_planned(result, clip, lgconv.CondensedConv3d)
    path = lgconv.save(
        result["model"],
        tmp_path / "r3d.lgc",
        arch=torchvision.models.video.r3d_18,
        arch_kwargs={"num_classes": 5},
    )
    with torch.no_grad():
        assert torch.equal(lgconv.load(path).eval()(clip), result["finalized"])


class Video3d(nn.Module):
    """A small video net: a 3x3x3 stem, inverted-bottleneck blocks of pointwise (1x1x1) Conv3d."""

    def __init__(self, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, width, 3, padding=1, stride=(1, 2, 2)), nn.BatchNorm3d(width), nn.ReLU()
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(width, 4 * width, 1),
                nn.BatchNorm3d(4 * width),
                nn.ReLU(),
                nn.Conv3d(4 * width, 4 * width, 3, padding=1, groups=4 * width),
                nn.ReLU(),
                nn.Conv3d(4 * width, width, 1),
                nn.BatchNorm3d(width),
            )
            for _ in range(2)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3, 4)))


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_a_pointwise_conv3d_net_finalizes_exactly_and_exports(tmp_path, layout):
    model = perturb_(Video3d())
    clip = torch.randn(2, 3, 4, 16, 16)
    result = run_lifecycle(model, clip, layout=layout)
    assert len(result["eligible"]) == 4
    assert_finalized_as_planned(result, clip, lgconv.CondensedConv3d)
    report = lgconv.export_onnx(result["model"], tmp_path / "video.onnx", clip)
    assert report.max_error <= 1e-4
