"""How long lgconv.load takes next to the fastest way to load the same tensors by hand.

A condensified timm ResNet-152 (masked, half-condensed) saved with ``lgconv.save`` is loaded, in
interleaved rounds, by:

* ``lgconv.load``: header and spec validated, skeleton checked against the header, data read, assigned;
* ``meta build + assign``: the same structure built under ``torch.device("meta")`` and the tensors,
  already in memory, assigned with ``load_state_dict(assign=True)`` (the floor: no checks, no I/O);
* ``meta build + load_file + assign``: the same, reading the file with ``safetensors.torch.load_file``;
* ``real build + load_state_dict``: what lgconv.load did before (random init, then copy).

    .venv/bin/python benchmarks/load_time.py            # ResNet-152, about a minute
    .venv/bin/python benchmarks/load_time.py --smoke    # ResNet-18, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing  # noqa: E402

import lgconv  # noqa: E402
from lgconv import model_file  # noqa: E402

FORMS = (
    "lgconv.load",
    "meta build + assign",
    "meta build + load_file + assign",
    "real build + load_state_dict",
)


def _condensified(arch: str) -> nn.Module:
    model = lgconv.condensify(timm.create_model(arch), groups=4, condense_factor=4)
    for module in model.modules():
        if isinstance(module, lgconv.LearnedGroupConv):
            module.condense()
    return model.eval()


def _structure(spec: model_file.ModelSpec, device: str | None) -> nn.Module:
    if device is None:
        return model_file._replace_layers(model_file.build_arch(spec.arch, spec.arch_kwargs), spec.layers, "")
    with torch.device(device):
        return model_file._replace_layers(model_file.build_arch(spec.arch, spec.arch_kwargs), spec.layers, "")


def forms(path: Path) -> dict[str, Any]:
    """The four ways of loading ``path``, as functions returning the model."""
    spec = model_file.read_spec(path)
    in_memory = safetensors.torch.load_file(path)

    def meta_assign(tensors: dict[str, torch.Tensor]) -> nn.Module:
        model = _structure(spec, "meta")
        model.load_state_dict(tensors, strict=True, assign=True)
        return model

    def real_copy() -> nn.Module:
        model = _structure(spec, None)
        model.load_state_dict(safetensors.torch.load_file(path), strict=True)
        return model

    return {
        FORMS[0]: lambda: lgconv.load(path),
        FORMS[1]: lambda: meta_assign(in_memory),
        FORMS[2]: lambda: meta_assign(safetensors.torch.load_file(path)),
        FORMS[3]: real_copy,
    }


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    table = _timing.markdown_table(
        ["model", "form", "median ms", "range ms", "x meta build + assign"],
        [
            [row["model"], row["form"], *_timing.timing_cells(row["timing"]), f"{row['ratio']:.2f}"]
            for row in rows
        ],
    )
    return f"{table}\n\nMeasured on {_timing.machine_line(machine)}.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _timing.add_run_options(parser, smoke_help="ResNet-18, two rounds: seconds")
    args = parser.parse_args(argv)
    machine = _timing.start_run(args, min_round_s=0.0)
    arch = "resnet18" if args.smoke else "resnet152"
    with tempfile.TemporaryDirectory() as folder:
        model = _condensified(arch)
        path = lgconv.save(model, Path(folder) / f"{arch}.safetensors")
        functions = forms(path)
        loaded = functions[FORMS[0]]()
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            if not torch.equal(a, b):
                raise SystemExit(f"lgconv.load changed {name}")
        timings = _timing.interleaved(functions, rounds=args.rounds, warmup=1, min_round_s=args.min_round_s)
    floor = timings[FORMS[1]].median_ms
    rows = [
        {
            "model": f"condensified {arch}",
            "form": form,
            "timing": timings[form],
            "ratio": timings[form].median_ms / floor,
        }
        for form in FORMS
    ]
    for row in rows:
        print(f"{row['model']:24} {row['form']:34} {row['timing'].median_ms:9.1f} ms  {row['ratio']:.2f}x")
    _timing.finish_run(args, machine, rows, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
