"""Timing shared by the benchmark scripts: interleaved rounds, warm-up, medians, machine description."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median over rounds, and the spread (lowest and highest round)."""

    median_ms: float
    low_ms: float
    high_ms: float
    calls: int

    @property
    def spread(self) -> float:
        """(high - low) / median: how far apart the rounds were."""
        return (self.high_ms - self.low_ms) / self.median_ms if self.median_ms else 0.0


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    functions: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 7,
    warmup: int = 2,
    min_round_s: float = 0.05,
    device: torch.device | None = None,
) -> dict[str, Timing]:
    """Time every function in turn, round after round, so that load changes hit all of them alike.

    Each function first runs ``warmup`` times; its calls per round are set so that a round lasts at
    least ``min_round_s``. In every round each function first runs once untimed: the previous one's
    threads (ONNX Runtime, OpenVINO and OpenMP spin for a while after a call) stop competing with
    it and its own data return to the caches, so a row's place in the order does not bias it (an
    ONNX Runtime graph timed right after another session measured 0.86x where it is 1.33x).
    Returns the median (and range) of the per-call time over the rounds.
    """
    calls: dict[str, int] = {}
    for name, function in functions.items():
        for _ in range(warmup):
            function()
        _synchronize(device)
        start = time.perf_counter()
        function()
        _synchronize(device)
        once = time.perf_counter() - start
        calls[name] = max(1, min(1000, int(min_round_s / max(once, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            function()
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                function()
            _synchronize(device)
            samples[name].append((time.perf_counter() - start) / calls[name] * 1e3)
    return {
        name: Timing(statistics.median(values), min(values), max(values), calls[name])
        for name, values in samples.items()
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, torch, load, GPU if any."""
    description: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name()
    return description


def machine_line(description: Mapping[str, Any]) -> str:
    gpu = f", GPU {description['gpu']}" if "gpu" in description else ""
    threads = description["torch_threads"]
    return (
        f"{description['cpu']}, {description['cores']} cores, torch {description['torch']} with "
        f"{threads} thread{'' if threads == 1 else 's'}, load average {description['load_average']} "
        f"at {description['time_utc']}{gpu}"
    )


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    def plain(value: Any) -> Any:
        if isinstance(value, Timing):
            return asdict(value)
        raise TypeError(f"cannot write {type(value).__name__} to JSON")

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=plain) + "\n")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def timing_cells(timing: Timing) -> list[str]:
    """The median and the range of one timing, as table cells."""
    return [f"{timing.median_ms:.2f}", f"{timing.low_ms:.2f}-{timing.high_ms:.2f}"]


def add_run_options(parser: argparse.ArgumentParser, smoke_help: str) -> None:
    """The options every benchmark script takes: smoke mode, rounds, threads and where to write."""
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, smoke 2)")
    parser.add_argument("--min-round-s", type=float, default=None, help="seconds per form per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")


def start_run(args: argparse.Namespace, min_round_s: float) -> dict[str, Any]:
    """Fill the round defaults (``min_round_s`` for a full run), set threads, print the machine."""
    args.rounds = args.rounds or (2 if args.smoke else 7)
    if args.min_round_s is None:
        args.min_round_s = 0.0 if args.smoke else min_round_s
    if args.threads:
        torch.set_num_threads(args.threads)
    description = machine()
    description["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "default")
    print(f"Machine: {machine_line(description)}")
    return description


def finish_run(
    args: argparse.Namespace,
    description: dict[str, Any],
    rows: list[dict[str, Any]],
    markdown: Callable[[list[dict[str, Any]], dict[str, Any]], str],
) -> None:
    """Record the load at the end and write the JSON and markdown results that were asked for."""
    description["load_average_end"] = machine()["load_average"]
    if args.json:
        write_json(args.json, {"machine": description, "rows": rows})
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows, description))
