"""DistributedDataParallel on CPU (gloo, 2 processes): every rank ends with the same masks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lgconv
from lgconv.scheduler import learned_group_layers

WORLD = 2
STEPS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _net() -> nn.Module:
    """No batch norm: DDP would leave each rank's running stats slightly different."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _flat_masks(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.mask.flatten() for _, m in learned_group_layers(model)]).to(torch.uint8)


def _all_equal(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _worker(rank: int, port: int, out_dir: str, options: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP broadcasts rank 0's
        model = lgconv.condensify(_net(), groups=4, condense_factor=4, layout="interleaved")
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        scheduler = lgconv.CondensationScheduler(ddp, STEPS, lasso=1e-3, **options)
        generator = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        for _ in range(STEPS):
            x = torch.randn(8, 1, 8, 8, generator=generator)
            y = torch.randint(0, 10, (8,), generator=generator)
            loss = nn.functional.cross_entropy(ddp(x), y) + scheduler.lasso_loss()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        stages = [int(m.stage) for _, m in learned_group_layers(model)]
        masks_equal = _all_equal(_flat_masks(model))
        final = lgconv.finalize(model).eval()
        probe = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            output = final(probe)

        # Without DDP, ranks whose weights differ still get the group's first rank's masks.
        torch.manual_seed(10 + rank)
        loose = lgconv.condensify(_net(), groups=4)
        loose_scheduler = lgconv.CondensationScheduler(loose, 2, process_group=dist.new_group([0, 1]))
        loose_scheduler.step()
        loose_equal = _all_equal(_flat_masks(loose))
        loose_differs_from_local = not torch.equal(
            _flat_masks(loose), _flat_masks(_condensed_locally(10 + rank))
        )
        torch.save(
            {
                "stages": stages,
                "masks_equal": masks_equal,
                "output": output,
                "loose_equal": loose_equal,
                "loose_differs_from_local": loose_differs_from_local,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _condensed_locally(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = lgconv.condensify(_net(), groups=4)
    for _, layer in learned_group_layers(model):
        while not layer.fully_condensed:
            layer.condense()
    return model


@pytest.mark.parametrize(
    "options", [{}, {"importance": "activation", "schedule": "gradual"}], ids=["paper", "activation-gradual"]
)
def test_two_gloo_ranks_with_different_data_end_with_identical_masks(tmp_path, options):
    """Activation statistics differ between ranks (different data); the first rank's masks win."""
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), options), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for result in results:
        assert result["stages"] == [3, 3]
        assert result["masks_equal"] and result["loose_equal"]
    assert results[1]["loose_differs_from_local"]  # rank 1 alone would have chosen other inputs
    torch.testing.assert_close(results[0]["output"], results[1]["output"], atol=1e-6, rtol=1e-6)
