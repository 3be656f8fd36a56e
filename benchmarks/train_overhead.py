"""What learned group training costs: a training step of the masked vs the unmodified model, and
the time of one condensing step over every learned group layer of a ResNet-50.

A second copy of the unmodified model is timed alongside (A/A control): how far two forms doing
identical work land apart is the resolution of the other ratios on this machine.

    .venv/bin/python benchmarks/train_overhead.py            # full run, a couple of minutes
    .venv/bin/python benchmarks/train_overhead.py --smoke    # seconds
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "OMP_WAIT_POLICY" not in os.environ and os.getloadavg()[0] > (os.cpu_count() or 1):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # busy-waiting threads collapse on a shared machine

import argparse  # noqa: E402
import copy  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _models  # noqa: E402
import _timing  # noqa: E402

import lgconv  # noqa: E402
from lgconv.scheduler import learned_group_layers  # noqa: E402

# (network, batch, image size): CondenseNet-86 as it trains on CIFAR; ResNet-50 at a small image,
# where its weights (and so the masking) weigh most, and at the 224x224 it trains at.
FULL = [("condensenet86", 64, 32), ("resnet50", 16, 64), ("resnet50", 8, 224)]
SMOKE = [("condensenet50", 2, 32)]


def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], object]:
    """One SGD training step (forward, cross-entropy, backward, update) of ``model``."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return step


def training_rows(name: str, batch: int, size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    dense, masked, _ = _models.BUILDERS[name](0)
    masked.load_state_dict(dense.state_dict(), strict=False)
    condensed = _models.condense_fully(copy.deepcopy(masked))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    classes = dense(x[:1]).shape[1]
    target = torch.randint(0, classes, (batch,), generator=generator)
    timings = _timing.interleaved(
        {
            "unmodified": _step(dense, x, target),
            "unmodified, 2nd copy (A/A control)": _step(copy.deepcopy(dense), x, target),
            "masked (stage 0)": _step(masked, x, target),
            "masked (fully condensed)": _step(condensed, x, target),
        },
        rounds=args.rounds,
        min_round_s=args.min_round_s,
    )
    base = timings["unmodified"].median_ms
    rows = [
        {
            "what": f"train step {name} b{batch} {size}x{size}",
            "form": form,
            "timing": t,
            "vs_unmodified": t.median_ms / base,
        }
        for form, t in timings.items()
    ]
    for row in rows:
        t = row["timing"]
        ratio = row["vs_unmodified"]
        spread = f"[{t.low_ms:.2f}-{t.high_ms:.2f}]"
        print(f"  {row['what']:<36} {row['form']:<36} {t.median_ms:9.2f} ms {spread} x{ratio:.3f}")
    return rows


def condense_rows(arch: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One ``condense()`` on every learned group layer of a condensified timm model (G = C = 4)."""
    import timm

    model = lgconv.condensify(timm.create_model(arch, pretrained=False), groups=4, condense_factor=4)
    layers = [layer for _, layer in learned_group_layers(model)]

    def reset() -> None:
        for layer in layers:
            layer.mask.fill_(True)
            layer.stage.zero_()
            layer.kept_inputs.fill_(layer.weight.shape[1])

    def condense_all() -> None:
        if any(layer.fully_condensed for layer in layers):
            reset()
        for layer in layers:
            layer.condense()

    timing = _timing.interleaved({"condense": condense_all}, rounds=args.rounds, min_round_s=args.min_round_s)
    t = timing["condense"]
    print(f"  one condensing step, {len(layers)} layers of {arch}: {t.median_ms:.2f} ms", end="")
    print(f"  [{t.low_ms:.2f}-{t.high_ms:.2f}]")
    return [
        {
            "what": f"condense() on all {len(layers)} layers of {arch}",
            "form": "condense",
            "timing": t,
            "vs_unmodified": None,
        }
    ]


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    table = _timing.markdown_table(
        ["what", "form", "median ms", "range ms", "vs unmodified"],
        [
            [
                r["what"],
                r["form"],
                *_timing.timing_cells(r["timing"]),
                "" if r["vs_unmodified"] is None else f"{r['vs_unmodified']:.3f}x",
            ]
            for r in rows
        ],
    )
    return f"Machine: {_timing.machine_line(machine)}\n\n{table}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _timing.add_run_options(parser, smoke_help="tiny batch, few rounds: seconds")
    args = parser.parse_args(argv)
    machine = _timing.start_run(args, min_round_s=0.3)
    rows = []
    for name, batch, size in SMOKE if args.smoke else FULL:
        rows += training_rows(name, batch, size, args)
    rows += condense_rows("resnet26" if args.smoke else "resnet50", args)
    _timing.finish_run(args, machine, rows, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
