"""The benchmark scripts' smoke mode: they run, time every form, and write what the docs show."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_smoke_times_every_form_and_checks_outputs(tmp_path):
    latency = _script("latency")
    assert (
        latency.main(["--smoke", "--json", str(tmp_path / "l.json"), "--markdown", str(tmp_path / "l.md")])
        == 0
    )
    result = json.loads((tmp_path / "l.json").read_text())
    forms = {row["form"] for row in result["rows"]}
    assert {"dense", "masked", "naive (reference-style)", "finalized", "optimised (auto)"} <= forms
    assert any(form.startswith("+ ") for form in forms)  # ablation rows
    for row in result["rows"]:
        assert row["timing"]["median_ms"] > 0 and row["flop_ratio"] > 1.5
        if row["rel_error_vs_masked"] is not None:
            assert row["rel_error_vs_masked"] < 1e-5, row
    assert result["machine"]["cores"] >= 1 and "torch" in result["machine"]
    assert "| condensenet50 | 1 | optimised (auto) |" in (tmp_path / "l.md").read_text()


def test_train_overhead_smoke(tmp_path):
    train = _script("train_overhead")
    assert train.main(["--smoke", "--json", str(tmp_path / "t.json")]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert {row["form"] for row in rows} == {
        "unmodified",
        "unmodified, 2nd copy (A/A control)",
        "masked (stage 0)",
        "masked (fully condensed)",
        "condense",
    }
    assert all(row["timing"]["median_ms"] > 0 for row in rows)


def test_unknown_model_exits_2(capsys):
    latency = _script("latency")
    with pytest.raises(SystemExit) as exit_info:
        latency.main(["--models", "vgg99"])
    assert exit_info.value.code == 2
    assert "unknown model 'vgg99'" in capsys.readouterr().err


def test_load_time_smoke_times_every_form(tmp_path):
    load_time = _script("load_time")
    assert (
        load_time.main(["--smoke", "--json", str(tmp_path / "t.json"), "--markdown", str(tmp_path / "t.md")])
        == 0
    )
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [row["form"] for row in rows] == list(load_time.FORMS)
    assert all(row["timing"]["median_ms"] > 0 for row in rows)
    assert "| condensified resnet18 | lgconv.load |" in (tmp_path / "t.md").read_text()
