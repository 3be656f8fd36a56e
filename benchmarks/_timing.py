"""Timing shared by the benchmark scripts: interleaved rounds, warm-up, medians, machine description."""

from __future__ import annotations

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
    least ``min_round_s``. Returns the median (and range) of the per-call time over the rounds.
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
    return (
        f"{description['cpu']}, {description['cores']} cores, torch {description['torch']} with "
        f"{description['torch_threads']} threads, load average {description['load_average']} "
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
