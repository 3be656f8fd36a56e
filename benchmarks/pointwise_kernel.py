"""The native condensed 1x1 kernel against the dense one the tuner had before, on real layer shapes.

Each layer is BN -> ReLU -> 1x1 conv, condensified (G = C = 4), fully condensed, finalized and
optimised twice through the public API: ``kernel="matmul"`` (clamp, then the dense product with the
dropped weights at zero, on channels-last input) and ``kernel="native"`` (the fused C++ op). Both
read a channel slice of a wider channels-last tensor, as CondenseNet's dense blocks hand them.
Prints layer shape, both times, their ratio and the FLOP ratio; writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from _timing import add_run_options, interleaved, machine, machine_line, markdown_table, write_json
from torch import nn

import lgconv
from lgconv.kernels import load_native
from lgconv.layers import FusedCondensedConv2d

# (inputs, outputs, height = width, batch sizes): CondenseNet-86's first and last 1x1 of each stage
# (CIFAR, 32x32) and ResNet-50's bottleneck 1x1 convs (224x224).
SHAPES = [
    ("condensenet86", 16, 32, 32, (64, 1)),
    ("condensenet86", 120, 32, 32, (64, 1)),
    ("condensenet86", 128, 64, 16, (64, 1)),
    ("condensenet86", 336, 64, 16, (64, 1)),
    ("condensenet86", 352, 128, 8, (64, 1)),
    ("condensenet86", 768, 128, 8, (64, 1)),
    ("resnet50", 256, 64, 56, (8, 1)),
    ("resnet50", 64, 256, 56, (8, 1)),
    ("resnet50", 512, 128, 28, (8, 1)),
    ("resnet50", 1024, 256, 14, (8, 1)),
    ("resnet50", 256, 1024, 14, (8, 1)),
    ("resnet50", 2048, 512, 7, (8, 1)),
    ("resnet50", 512, 2048, 7, (8, 1)),
]
SMOKE_SHAPES = [("smoke", 20, 12, 5, (2,)), ("smoke", 44, 24, 3, (1,))]
EXTRA_CHANNELS = 16  # the input is a slice of a tensor this much wider


def _layer(inputs: int, outputs: int, kernel: str, seed: int) -> FusedCondensedConv2d:
    """BN-ReLU-conv1x1 through condensify, condensing, finalize and optimize_for_inference(kernel)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.BatchNorm2d(inputs), nn.ReLU(), nn.Conv2d(inputs, outputs, 1, bias=False))
    with torch.no_grad():
        norm = model[0]
        norm.running_mean.normal_(0, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.2)
    model = lgconv.condensify(model, groups=4, condense_factor=4, layout="interleaved")
    while not model[2].fully_condensed:
        model[2].condense()
    final = lgconv.finalize(model.eval())
    fast = lgconv.optimize_for_inference(copy.deepcopy(final), kernel=kernel, channels_last=True)
    return fast[2]


def run(shapes: list, rounds: int, min_round_s: float) -> list[dict]:
    rows = []
    for net, inputs, outputs, size, batches in shapes:
        dense = _layer(inputs, outputs, "matmul", 0)
        native = _layer(inputs, outputs, "native", 0)
        kept = native.index.numel() // native.conv.groups
        for batch in batches:
            wide = torch.randn(batch, inputs + EXTRA_CHANNELS, size, size)
            x = torch.relu(wide.contiguous(memory_format=torch.channels_last))[:, :inputs]
            with torch.inference_mode():
                error = (native(x) - dense(x)).abs().max().item()
                timings = interleaved(
                    {"dense": lambda d=dense, x=x: d(x), "native": lambda n=native, x=x: n(x)},
                    rounds=rounds,
                    min_round_s=min_round_s,
                )
            rows.append(
                {
                    "network": net,
                    "shape": f"{inputs}->{outputs} {size}x{size}",
                    "batch": batch,
                    "dense": timings["dense"],
                    "native": timings["native"],
                    "ratio": timings["dense"].median_ms / timings["native"].median_ms,
                    "flop_ratio": inputs / kept,
                    "max_abs_difference": error,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(parser, "two tiny layers, two rounds: checks the script runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not load_native():
        print("the native kernel is unavailable on this machine: nothing to compare", file=sys.stderr)
    rounds = args.rounds or (2 if args.smoke else 7)
    min_round_s = args.min_round_s or (0.001 if args.smoke else 0.05)
    rows = run(SMOKE_SHAPES if args.smoke else SHAPES, rounds, min_round_s)
    description = machine()
    header = ["network", "layer", "batch", "dense clamp+matmul ms", "native ms", "ratio", "FLOP ratio"]
    table = markdown_table(
        header,
        [
            [
                r["network"],
                r["shape"],
                r["batch"],
                f"{r['dense'].median_ms:.3f}",
                f"{r['native'].median_ms:.3f}",
                f"{r['ratio']:.2f}x",
                f"{r['flop_ratio']:.2f}",
            ]
            for r in rows
        ],
    )
    print(machine_line(description))
    print(table)
    default = (
        Path(__file__).parent
        / "results"
        / ("pointwise_kernel_smoke.json" if args.smoke else "pointwise_kernel.json")
    )
    write_json(args.json or default, {"machine": description, "rows": rows})
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
