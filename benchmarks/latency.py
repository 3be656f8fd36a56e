"""Inference latency of one network in every form: dense, masked, naive-converted, finalized, optimised.

All forms of one network and batch are timed in the same interleaved rounds (after warm-up; the
median and the range over rounds are reported), next to the FLOP ratio masked / finalized, and every
form's output is checked against the masked model's. The baseline that says what condensing buys is
"uncondensed, same pipeline" (the network condensified but left at stage 0, finalized and optimised
the same way; the TorchScript rows trace and freeze both); each installed runtime (ONNX Runtime,
OpenVINO) adds the dense network, lgconv's plain finalized graph and the ``lgconv.export_onnx``
graph, compared with that runtime's dense network.
Writes a JSON and ``docs/benchmarks.md``.

    .venv/bin/python benchmarks/latency.py            # full run, a few minutes on 2 cores
    .venv/bin/python benchmarks/latency.py --smoke    # seconds: one small network, tiny batches
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "OMP_WAIT_POLICY" not in os.environ and os.getloadavg()[0] > (os.cpu_count() or 1):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # busy-waiting threads collapse on a shared machine

import argparse  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _models  # noqa: E402
import _timing  # noqa: E402

import lgconv  # noqa: E402
from lgconv import export  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FULL = {"condensenet86": (1, 64), "condensenet74_imagenet": (1, 8), "resnet50": (1, 8), "densenet121": (1, 8)}
SMOKE = {"condensenet50": (1, 2)}
ABLATED = ("condensenet86", "condensenet50")
UNCONDENSED = "uncondensed, same pipeline"
TRACED = ", TorchScript"  # suffix of the rows traced and frozen (torch.jit.trace + torch.jit.freeze)
RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


def optimised_forms(finalized: nn.Module, example: Tensor, ablation: bool) -> dict[str, nn.Module]:
    """lgconv's optimised model (kernels and memory format chosen by timing), and with --ablation
    one row per optimisation added on top of the last."""
    forms = {}
    if ablation:
        steps: list[tuple[str, dict[str, Any]]] = [
            ("+ fold BN into grouped", {"kernel": "grouped", "channels_last": False}),
            ("+ dense kernel (no gather/shuffle)", {"kernel": "dense", "channels_last": False}),
            ("+ channels-last", {"kernel": "dense", "channels_last": True}),
            (
                "+ dense 3x3 (zeros across groups)",
                {"kernel": "dense", "channels_last": True, "dense_grouped": True},
            ),
            (
                "+ matmul 1x1 (no conv primitive)",
                {"kernel": "matmul", "channels_last": True, "dense_grouped": True},
            ),
        ]
        for label, options in steps:
            forms[label] = lgconv.optimize_for_inference(copy.deepcopy(finalized), **options)
    forms["optimised (auto)"] = lgconv.optimize_for_inference(copy.deepcopy(finalized), example, repeats=3)
    if ablation:
        forms["optimised (auto), concatenating"] = _models.concatenating(
            copy.deepcopy(forms["optimised (auto)"])
        )
    return forms


def _max_error(model: Callable[[Tensor], Any], reference: Tensor, x: Tensor) -> float:
    with torch.inference_mode():
        out = model(x)
    return float((out.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def _input_format(model: nn.Module) -> torch.memory_format:
    """The memory format ``model``'s weights are in, which its input should have too."""
    channels_last = any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )
    return torch.channels_last if channels_last else torch.contiguous_format


def _runner(model: Callable[[Tensor], Any], x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def traced(model: nn.Module, x: Tensor) -> torch.jit.ScriptModule:
    """``model`` traced on ``x`` and frozen: the same ops without Python's per-module cost, as a
    user serving from TorchScript would run it."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values in the graph
        return torch.jit.freeze(torch.jit.trace(model, x, check_trace=False).eval())


def installed_runtimes(asked: list[str] | None) -> list[str]:
    """The runtimes asked for (default: all lgconv exports to) that are installed; the others are
    skipped with one line each."""
    runtimes = []
    for runtime in export.RUNTIMES if asked is None else asked:
        try:
            export.require_runtime(runtime)
        except ImportError as error:
            print(f"skipping {runtime}: {error}")
            continue
        runtimes.append(runtime)
    return runtimes


def runtime_forms(
    forms: _models.Forms, x: Tensor, runtimes: list[str], folder: Path, repeats: int
) -> dict[str, Callable[[Tensor], object]]:
    """Per runtime: the dense network, the finalized graph (``torch.onnx.export``) and the graph of
    ``lgconv.export_onnx`` tuned on ``x``, each compiled as a function of the input array."""
    graphs = {}
    dense = _models.concatenating(copy.deepcopy(forms.dense))
    finalized = _models.concatenating(copy.deepcopy(forms.finalized))
    export.to_onnx(dense, x, folder / "dense.onnx")
    export.to_onnx(finalized, x, folder / "finalized.onnx")
    for runtime in runtimes:
        name = RUNTIME_NAMES[runtime]
        tuned = folder / f"{runtime}.onnx"
        report = lgconv.export_onnx(forms.finalized, tuned, x, runtime=runtime, repeats=repeats)
        print(f"export_onnx for {runtime}: kept {report.chosen!r}, trials {report.trials_ms}")
        for label, path in (
            ("dense network", folder / "dense.onnx"),
            ("finalized graph", folder / "finalized.onnx"),
            ("export_onnx", tuned),
        ):
            # Passive threads: interleaved in one process, a session whose threads spin after its call
            # slows the next one, and graphs of many small ops far more than the dense network's
            # (ResNet-50 b1 export_onnx: 27.3 ms alone, 28.4 ms passive interleaved, 39.2 ms spinning).
            graphs[f"{name}, {label}"] = _onnx_runner(export.compile_onnx(path, runtime, passive=True))
    return graphs


def _onnx_runner(session: Callable[[Any], Any]) -> Callable[[Tensor], object]:
    return lambda x: torch.from_numpy(session(x.numpy()))


def _baseline(label: str) -> str:
    """The row a form's speedup is measured against: the same runtime's dense network for graphs
    run by ONNX Runtime or OpenVINO, the uncondensed network through the same pipeline otherwise."""
    for name in RUNTIME_NAMES.values():
        if label.startswith(f"{name}, "):
            return f"{name}, dense network"
    return UNCONDENSED + TRACED if label.endswith(TRACED) else UNCONDENSED


def _other_function(label: str) -> bool:
    """Rows that compute the uncondensed network, not the masked one: no error against it."""
    return label in ("dense", UNCONDENSED, UNCONDENSED + TRACED) or label.endswith(", dense network")


def bench_network(name: str, batches: tuple[int, ...], args: argparse.Namespace) -> list[dict[str, Any]]:
    forms = _models.forms(name)
    flops = lgconv.count_flops(forms.masked, forms.input_size)
    ratio = flops.reduction
    rows = []
    for batch in batches:
        x = torch.randn(batch, *forms.input_size, generator=torch.Generator().manual_seed(batch))
        models = {
            "dense": forms.dense,
            "masked": forms.masked,
            "naive (reference-style)": forms.naive,
            "finalized": forms.finalized,
        }
        models.update(optimised_forms(forms.finalized, x, args.ablation and name in ABLATED))
        models[UNCONDENSED] = lgconv.optimize_for_inference(copy.deepcopy(forms.uncondensed), x, repeats=3)
        inputs = {label: x.contiguous(memory_format=_input_format(model)) for label, model in models.items()}
        for label in ("optimised (auto)", UNCONDENSED):
            models[label + TRACED] = traced(models[label], inputs[label])
            inputs[label + TRACED] = inputs[label]
        runners = {label: _runner(model, inputs[label]) for label, model in models.items()}
        with torch.inference_mode():
            reference = forms.masked(x).float()
        errors = {label: _max_error(model, reference, inputs[label]) for label, model in models.items()}
        with tempfile.TemporaryDirectory() as folder:
            runtimes = [] if args.smoke and batch != batches[0] else args.runtimes  # smoke: seconds
            graphs = runtime_forms(forms, x, runtimes, Path(folder), 1 if args.smoke else 3)
            for label, graph in graphs.items():
                runners[label] = functools.partial(graph, x)
                errors[label] = _max_error(graph, reference, x)
            timings = _timing.interleaved(runners, rounds=args.rounds, min_round_s=args.min_round_s)
        naive_ms = timings["naive (reference-style)"].median_ms
        masked_ms = timings["masked"].median_ms
        for label, timing in timings.items():
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "form": label,
                    "timing": timing,
                    "vs_naive": naive_ms / timing.median_ms,
                    "vs_masked": masked_ms / timing.median_ms,
                    "baseline": _baseline(label),
                    "vs_uncondensed": timings[_baseline(label)].median_ms / timing.median_ms,
                    "flop_ratio": ratio,
                    "rel_error_vs_masked": None if _other_function(label) else errors[label],
                }
            )
        _print_rows(rows[-len(timings) :])
    return rows


def _print_rows(rows: list[dict[str, Any]]) -> None:
    first = rows[0]
    print(
        f"\n{first['model']} batch {first['batch']}  (FLOP ratio masked/finalized {first['flop_ratio']:.2f})"
    )
    for row in rows:
        t = row["timing"]
        error = "" if row["rel_error_vs_masked"] is None else f"  err {row['rel_error_vs_masked']:.1e}"
        print(
            f"  {row['form']:<36} {t.median_ms:9.2f} ms  [{t.low_ms:.2f}-{t.high_ms:.2f}]  "
            f"x{row['vs_naive']:.2f} vs naive  x{row['vs_masked']:.2f} vs masked  "
            f"x{row['vs_uncondensed']:.2f} vs uncondensed{error}"
        )


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    table = _timing.markdown_table(
        [
            "model",
            "batch",
            "form",
            "median ms",
            "range ms",
            "vs naive",
            "vs masked",
            "vs uncondensed",
            "FLOP ratio",
            "rel. err",
        ],
        [
            [
                r["model"],
                r["batch"],
                r["form"],
                *_timing.timing_cells(r["timing"]),
                f"{r['vs_naive']:.2f}x",
                f"{r['vs_masked']:.2f}x",
                f"{r['vs_uncondensed']:.2f}x",
                f"{r['flop_ratio']:.2f}",
                "" if r["rel_error_vs_masked"] is None else f"{r['rel_error_vs_masked']:.0e}",
            ]
            for r in rows
        ],
    )
    note = (
        "vs uncondensed: speedup over the same network left uncondensed through the same pipeline "
        "(stage 0, finalized, optimised; TorchScript rows: both traced and frozen);\n"
        "for ONNX Runtime / OpenVINO rows, over that runtime's dense network."
    )
    return f"Machine: {_timing.machine_line(machine)}\n\n{table}\n\n{note}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _timing.add_run_options(parser, smoke_help="one small network, tiny batches: seconds")
    parser.add_argument("--models", nargs="*", help="networks to time (default: all of the full run)")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip ablation rows")
    parser.add_argument(
        "--runtimes",
        nargs="*",
        choices=export.RUNTIMES,
        help="ONNX runtimes to add rows for (default: every installed one; none: --runtimes with no name)",
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.models:
        unknown = sorted(set(args.models) - set(_models.BUILDERS))
        if unknown:
            parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(_models.BUILDERS)}")
        plan = {name: plan.get(name, FULL.get(name, (1, 2))) for name in args.models}
    # Half a second per sample: at 0.2 s a batch-1 sample of CondenseNet-86 was some 50 calls, few
    # enough that the previous row's threads and a busy neighbour on a shared VM moved the medians by
    # a third (optimised 3.84 ms, range 2.42-5.33, against 2.39 ms, range 2.08-3.12, at 0.5 s).
    machine = _timing.start_run(args, min_round_s=0.5)
    args.runtimes = installed_runtimes(args.runtimes)
    rows = [row for name, batches in plan.items() for row in bench_network(name, batches, args)]
    _timing.finish_run(args, machine, rows, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
