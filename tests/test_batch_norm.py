"""recalibrate_batch_norm: running statistics re-estimated from data, nothing else changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lgconv
from lgconv import LearnedGroupConv, recalibrate_batch_norm


def data(count: int, seed: int = 0, channels: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, channels, 5, 5, generator=generator) * 3 + 2 for _ in range(count)]


def test_running_statistics_become_the_plain_average_over_the_batches():
    norm = nn.BatchNorm2d(4)
    batches = data(3)
    assert recalibrate_batch_norm(nn.Sequential(norm), batches) == 3
    expected_mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    expected_var = torch.stack([b.transpose(0, 1).reshape(4, -1).var(1) for b in batches]).mean(0)
    torch.testing.assert_close(norm.running_mean, expected_mean)
    torch.testing.assert_close(norm.running_var, expected_var)
    assert int(norm.num_batches_tracked) == 3


def test_modes_momentum_and_weights_are_restored():
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5))
    model.eval()
    model[2].train()
    weights = {
        k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k
    }
    recalibrate_batch_norm(model, data(2))
    assert [m.training for m in model] == [False, False, True]
    assert model[1].momentum == 0.3
    for name, value in weights.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert all(p.grad is None for p in model.parameters())


def test_empty_batches_raise_and_leave_statistics_alone():
    norm = nn.BatchNorm2d(4)
    recalibrate_batch_norm(nn.Sequential(norm), data(1))
    before = norm.running_mean.clone()
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batch_norm(nn.Sequential(norm), [])
    assert torch.equal(norm.running_mean, before)


def test_a_model_without_batch_norm_raises():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        recalibrate_batch_norm(nn.Sequential(nn.Conv2d(4, 4, 1)), data(1))


def test_recalibration_after_a_drop_restores_normalized_eval_outputs():
    """A drop leaves the running statistics stale; re-estimating them centres the outputs again."""
    torch.manual_seed(0)
    model = nn.Sequential(LearnedGroupConv(8, 8, learned_groups=2, condense_factor=2), nn.BatchNorm2d(8))
    batches = data(4, channels=8)
    recalibrate_batch_norm(model, batches)  # statistics of the uncondensed layer
    scheduler = lgconv.CondensationScheduler(model, total_steps=2, condense_end=0.5)
    assert scheduler.step() is True  # half the inputs of every group dropped
    model.eval()
    with torch.no_grad():
        stale = model(torch.cat(batches)).mean((0, 2, 3)).abs().max()
        recalibrate_batch_norm(model, batches)
        fresh = model(torch.cat(batches)).mean((0, 2, 3)).abs().max()
    assert fresh < 1e-4 < 0.05 < stale
    assert not model.training
