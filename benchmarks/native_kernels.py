"""lgconv's native kernels against the PyTorch kernels they replace, on real layer shapes.

1x1: each layer is BN -> ReLU -> 1x1 conv, condensified (G = C = 4), fully condensed, finalized and
optimised twice through the public API: ``kernel="matmul"`` (clamp, then the dense product with the
dropped weights at zero) and ``kernel="native"`` (the fused C++ op). Both read a channel slice of a
wider tensor, as CondenseNet's dense blocks hand them, in channels-last and in NCHW (planes).
3x3: CondenseNet-86's grouped 3x3 convs (4 groups) as ``nn.Conv2d`` (oneDNN) in both memory
formats, as ``DenseGroupedConv2d`` and as ``NativeGroupedConv2d`` (the C++ op, on planes).
Prints the times and ratios next to the FLOP ratio; writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
from pathlib import Path

import torch
from _timing import add_run_options, interleaved, machine, machine_line, markdown_table, write_json
from torch import nn

import lgconv
from lgconv.kernels import load_native
from lgconv.layers import DenseGroupedConv2d, FusedCondensedConv2d, NativeGroupedConv2d

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
# CondenseNet-86's grouped 3x3 convs (inputs, outputs, height = width, batch sizes).
CONV3X3_SHAPES = [(32, 8, 32, (64, 1)), (64, 16, 16, (64, 1)), (128, 32, 8, (64, 1))]
SMOKE_CONV3X3_SHAPES = [(8, 4, 6, (2,))]
FORMATS = {"channels_last": torch.channels_last, "planes": torch.contiguous_format}
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
    """Dense clamp + matmul against the native op, per 1x1 shape, batch and memory format."""
    rows = []
    for net, inputs, outputs, size, batches in shapes:
        dense = _layer(inputs, outputs, "matmul", 0)
        native = _layer(inputs, outputs, "native", 0)
        kept = native.index.numel() // native.conv.groups
        for batch in batches:
            wide = torch.relu(torch.randn(batch, inputs + EXTRA_CHANNELS, size, size))
            for format_name, memory_format in FORMATS.items():
                x = wide.contiguous(memory_format=memory_format)[:, :inputs]
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
                        "format": format_name,
                        "dense": timings["dense"],
                        "native": timings["native"],
                        "ratio": timings["dense"].median_ms / timings["native"].median_ms,
                        "flop_ratio": inputs / kept,
                        "max_abs_difference": error,
                    }
                )
    return rows


def run_conv3x3(shapes: list, rounds: int, min_round_s: float) -> list[dict]:
    """oneDNN's grouped 3x3 conv (both formats), the dense form with zeros and the native op."""
    rows = []
    for inputs, outputs, size, batches in shapes:
        torch.manual_seed(0)
        conv = nn.Conv2d(inputs, outputs, 3, padding=1, groups=4, bias=False).eval()
        forms = {
            "onednn_planes": (conv, torch.contiguous_format),
            "onednn_channels_last": (conv, torch.channels_last),
            "dense_channels_last": (DenseGroupedConv2d.from_grouped(conv), torch.channels_last),
            "native_planes": (NativeGroupedConv2d.from_conv(conv), torch.contiguous_format),
        }
        for batch in batches:
            x = torch.relu(torch.randn(batch, inputs, size, size))
            inputs_by_format = {
                f: x.contiguous(memory_format=f) for f in (torch.contiguous_format, torch.channels_last)
            }
            calls = {
                name: functools.partial(module, inputs_by_format[memory_format])
                for name, (module, memory_format) in forms.items()
            }
            with torch.inference_mode():
                expected = conv(x)
                error = max((call() - expected).abs().max().item() for call in calls.values())
                timings = interleaved(calls, rounds=rounds, min_round_s=min_round_s)
            best_onednn = min(timings[name].median_ms for name in forms if name != "native_planes")
            rows.append(
                {
                    "shape": f"{inputs}->{outputs} {size}x{size}, 4 groups",
                    "batch": batch,
                    **timings,
                    "ratio": best_onednn / timings["native_planes"].median_ms,
                    "max_abs_difference": error,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_options(parser, "three tiny layers, two rounds: checks the script runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not load_native():
        print("the native kernel is unavailable on this machine: nothing to compare", file=sys.stderr)
    rounds = args.rounds or (2 if args.smoke else 7)
    min_round_s = args.min_round_s or (0.001 if args.smoke else 0.05)
    rows = run(SMOKE_SHAPES if args.smoke else SHAPES, rounds, min_round_s)
    conv3x3_rows = run_conv3x3(SMOKE_CONV3X3_SHAPES if args.smoke else CONV3X3_SHAPES, rounds, min_round_s)
    description = machine()
    header = [
        "network",
        "layer",
        "batch",
        "format",
        "dense clamp+matmul ms",
        "native ms",
        "ratio",
        "FLOP ratio",
    ]
    table = markdown_table(
        header,
        [
            [
                r["network"],
                r["shape"],
                r["batch"],
                r["format"],
                f"{r['dense'].median_ms:.3f}",
                f"{r['native'].median_ms:.3f}",
                f"{r['ratio']:.2f}x",
                f"{r['flop_ratio']:.2f}",
            ]
            for r in rows
        ],
    )
    conv3x3_header = [
        "3x3 conv",
        "batch",
        "oneDNN planes ms",
        "oneDNN channels-last ms",
        "dense with zeros, channels-last ms",
        "native planes ms",
        "best oneDNN / native",
    ]
    conv3x3_table = markdown_table(
        conv3x3_header,
        [
            [
                r["shape"],
                r["batch"],
                *(
                    f"{r[name].median_ms:.3f}"
                    for name in (
                        "onednn_planes",
                        "onednn_channels_last",
                        "dense_channels_last",
                        "native_planes",
                    )
                ),
                f"{r['ratio']:.2f}x",
            ]
            for r in conv3x3_rows
        ],
    )
    table = f"{table}\n\n{conv3x3_table}"
    print(machine_line(description))
    print(table)
    default = (
        Path(__file__).parent
        / "results"
        / ("native_kernels_smoke.json" if args.smoke else "native_kernels.json")
    )
    write_json(args.json or default, {"machine": description, "rows": rows, "conv3x3_rows": conv3x3_rows})
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
