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
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
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
    assert {"uncondensed, same pipeline", "ONNX Runtime, dense network", "ONNX Runtime, export_onnx"} <= forms
    assert {"optimised (auto), TorchScript", "uncondensed, same pipeline, TorchScript"} <= forms
    assert any(form.startswith("+ ") for form in forms)  # ablation rows
    traced = next(r for r in result["rows"] if r["form"] == "optimised (auto), TorchScript")
    assert traced["baseline"] == "uncondensed, same pipeline, TorchScript"
    for row in result["rows"]:
        assert row["timing"]["median_ms"] > 0 and row["flop_ratio"] > 1.5 and row["vs_uncondensed"] > 0
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


def test_native_kernels_smoke_compares_native_with_pytorch(tmp_path):
    bench = _script("native_kernels")
    assert (
        bench.main(["--smoke", "--json", str(tmp_path / "p.json"), "--markdown", str(tmp_path / "p.md")]) == 0
    )
    results = json.loads((tmp_path / "p.json").read_text())
    rows = results["rows"]
    assert len(rows) == 4 and {row["format"] for row in rows} == {"channels_last", "planes"}
    for row in rows:
        assert row["dense"]["median_ms"] > 0 and row["native"]["median_ms"] > 0
        assert row["max_abs_difference"] < 1e-4 and row["flop_ratio"] > 1.5
    (conv,) = results["conv3x3_rows"]
    assert conv["native_planes"]["median_ms"] > 0 and conv["max_abs_difference"] < 1e-4
    markdown = (tmp_path / "p.md").read_text()
    assert "native ms" in markdown and "native planes ms" in markdown


def test_runtimes_not_installed_are_skipped_with_one_line(monkeypatch, capsys):
    latency = _script("latency")

    def only_onnxruntime(runtime):
        if runtime != "onnxruntime":
            raise ImportError(f"runtime {runtime!r} needs the {runtime} package, which is not installed")

    monkeypatch.setattr(latency.export, "require_runtime", only_onnxruntime)
    assert latency.installed_runtimes(None) == ["onnxruntime"]
    assert "skipping openvino: runtime 'openvino' needs the openvino package" in capsys.readouterr().out
    assert latency.installed_runtimes([]) == []


def _write_idx(path: Path, array) -> None:
    """An idx file as Fashion-MNIST ships it: magic (ubyte, dims), big-endian sizes, bytes; gzipped."""
    import gzip

    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype("uint8").tobytes()))


@pytest.fixture
def fake_fashion_mnist(tmp_path) -> Path:
    """Tiny idx files of Fashion-MNIST's layout: a bright square whose place is the class."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion"
    folder.mkdir()
    for split, count in (("train", 128), ("t10k", 64)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 60, (count, 28, 28))
        for image, label in zip(images, labels):
            row, col = divmod(int(label), 4)
            image[2 + 8 * row : 8 + 8 * row, 2 + 6 * col : 8 + 6 * col] = 250
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def test_accuracy_smoke_runs_every_arm_at_the_stated_flops_and_resumes(tmp_path, fake_fashion_mnist, capsys):
    accuracy = _script("accuracy")
    out = tmp_path / "acc.json"
    args = ["--smoke", "--seeds", "1", "--no-progress", "--data-dir", str(fake_fashion_mnist)]
    args += ["--json", str(out), "--work-dir", str(tmp_path / "work")]
    assert accuracy.main(args) == 0
    result = json.loads(out.read_text())
    runs = {row["arm"]: row for row in result["runs"]}
    assert list(runs) == list(accuracy.ARMS)  # registry order, dense before the arms that reuse it
    assert result["recipe"]["threads"] == 1 and "torch" in result["machine"]
    for row in runs.values():
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["params"] > 0 and row["wall_s"] >= 0
        assert row["seed"] == 0 and row["epochs"] >= 1
    target = runs["lgc"]["flops"]
    assert runs["lgc"]["flops_target"] == target
    assert runs["dense"]["flops"] > 3 * target
    for name in (
        "dense_equal_flops",
        "fixed_groups",
        "fixed_groups_shuffle",
        "lgc_finetune",
        "lgc_bn_recal",
        "lgc_budget",
        "lgc_activation",
        "lgc_gradual",
        "lgc_finetune_activation",
        "lgc_finetune_gradual",
        "lgc_finetune_combined",
        "lgc_finetune_combined_gradual",
        "lgc_gradual_warmup",
        "lgc_finetune_gradual_lr02",
        "lgc_finetune_budget",
        "lgc_gradual_full_classifier",
        "lgc_gradual_learned_3x3",
        "lgc_finetune_gradual_lr01_full_classifier",
        "lgc_finetune_budget_lr005",
    ):
        assert abs(runs[name]["flops"] / target - 1) <= 0.05, name
    assert runs["lgc_gradual_learned_3x3"]["learned_3x3"] and "learned_3x3" not in runs["lgc_gradual"]
    assert runs["lgc_gradual_learned_3x3"]["params"] == runs["lgc_gradual_full_classifier"]["params"]
    full = runs["lgc_finetune_gradual_lr01_full_classifier"]
    assert (
        full["params"] > runs["lgc_finetune_gradual_lr01"]["params"]
        and full["classifier_condense_factor"] == 1
    )
    assert (runs["channel_pruning_lr01"]["lr"], runs["channel_pruning"]["lr"]) == (0.1, 0.05)
    assert (runs["lgc_finetune_budget_lr005"]["lr"], runs["lgc_finetune_budget"]["lr"]) == (0.05, 0.1)
    assert runs["lgc_gradual_warmup"]["condense_start"] == 0.0625
    assert runs["lgc_gradual_full_classifier"]["params"] > runs["lgc_gradual"]["params"]
    chosen = runs["lgc_finetune_budget"]["groups_and_factors"]  # per layer, 3x3 convs included
    assert len({tuple(f) for f in chosen.values()}) > 1 and any(n.endswith("conv2") for n in chosen)
    assert runs["lgc_activation"]["importance"] == "activation" and "drops" in runs["lgc_activation"]
    assert runs["lgc_gradual"]["schedule"] == "gradual" and "drops" not in runs["lgc_gradual"]
    assert runs["lgc_finetune_combined"]["lr"] == result["recipe"]["lr"]
    assert 0.85 * target <= runs["channel_pruning"]["flops"] <= target
    assert runs["lgc_finetune"]["epochs"] * 2 <= runs["lgc"]["epochs"]
    assert all("recalibrated_accuracy" in drop for drop in runs["lgc_bn_recal"]["drops"])
    assert all("recalibrated_accuracy" not in drop for drop in runs["lgc"]["drops"])
    capsys.readouterr()

    assert accuracy.main(args) == 0  # everything done: nothing retrained, the file unchanged
    assert f"0 runs to do ({len(accuracy.ARMS)} already" in capsys.readouterr().out
    assert json.loads(out.read_text()) == result

    again = tmp_path / "again.json"  # seeds 0 and 1 of lgc, elsewhere: seed 0 gives the same numbers
    rerun_args = ["--json", str(again), "--work-dir", str(tmp_path / "w2"), "--arms", "lgc"]
    assert accuracy.main([*args[:2], "2", *args[3:-4], *rerun_args]) == 0
    rerun = json.loads(again.read_text())["runs"][0]
    assert (rerun["test_accuracy"], rerun["drops"]) == (runs["lgc"]["test_accuracy"], runs["lgc"]["drops"])
    capsys.readouterr()
    assert accuracy.main(["--smoke", "--json", str(out), "--merge", str(again)]) == 0  # only seed 1 is new
    assert "merged 1 runs" in capsys.readouterr().out
    merged = [(r["arm"], r["seed"]) for r in json.loads(out.read_text())["runs"]]
    assert merged == sorted(merged, key=lambda run: (list(accuracy.ARMS).index(run[0]), run[1]))
    assert merged[:2] == [("lgc", 0), ("lgc", 1)]  # in the suite's order, not appended

    report = _script("accuracy_report")
    page = tmp_path / "results.md"
    page.write_text("intro\n<!-- accuracy-report:begin -->\nold\n<!-- accuracy-report:end -->\nkept\n")
    plot = tmp_path / "img" / "plot.png"
    assert report.main(["--json", str(out), "--markdown", str(page), "--plot", str(plot)]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("kept\n") and "old" not in text
    assert "| `lgc` | 2 |" in text and "| `lgc_finetune` | 1 |" in text
    combined = next(
        line for line in text.splitlines() if line.startswith("- variant `lgc_finetune_combined`")
    )
    assert "vs `lgc_finetune`" in combined and "≥ `channel_pruning`: " in combined
    best = next(line for line in text.splitlines() if line.startswith("| learned groups ≥ `fixed_groups` |"))
    assert "`lgc` " in best and "(n = 2)" in best and " of 1 seeds" in best  # paired: seed 0 only
    assert "no arm of this kind on 3 seeds or more" in best
    assert (
        "- `lgc` within 1.0 point of `dense`:" in text and "![accuracy against FLOPs](img/plot.png)" in text
    )
    assert plot.read_bytes().startswith(b"\x89PNG")
    page.write_text("no markers")
    assert report.main(["--json", str(out), "--markdown", str(page), "--plot", str(plot)]) == 2


def test_accuracy_more_epochs_is_another_recipe_in_its_own_json(tmp_path, fake_fashion_mnist, monkeypatch):
    accuracy = _script("accuracy")
    monkeypatch.chdir(tmp_path)
    args = ["--smoke", "--seeds", "1", "--no-progress", "--data-dir", str(fake_fashion_mnist), "--arms"]
    assert accuracy.main([*args, "dense,lgc_finetune", "--epochs", "4"]) == 0
    longer = json.loads((tmp_path / "runs" / "accuracy-smoke_4_epochs.json").read_text())
    assert (longer["recipe"]["epochs"], longer["recipe"]["finetune_epochs"]) == (4, 2)
    assert [(r["arm"], r["epochs"]) for r in longer["runs"]] == [("dense", 4), ("lgc_finetune", 2)]
    assert not (tmp_path / "runs" / "accuracy-smoke.json").exists()
    assert accuracy.main([*args, "dense", "--epochs", "2"]) == 0  # the smoke recipe's own epochs
    assert (tmp_path / "runs" / "accuracy-smoke.json").exists()
    mixed = [*args, "dense", "--epochs", "4", "--json", "runs/accuracy-smoke.json"]
    assert accuracy.main(mixed) == 2  # runs of two recipes never share a file

    report = _script("accuracy_report")  # its --epochs finds that recipe's JSON, page and plot
    monkeypatch.setattr(report, "ROOT", tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "runs" / "accuracy-smoke_4_epochs.json").rename(
        tmp_path / "benchmarks/results/accuracy_4_epochs.json"
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results_4_epochs.md").write_text(
        "<!-- accuracy-report:begin -->\n<!-- accuracy-report:end -->\n"
    )
    assert report.main(["--epochs", "4"]) == 0
    page = (tmp_path / "docs" / "results_4_epochs.md").read_text()
    assert (
        "from `benchmarks/results/accuracy_4_epochs.json`" in page and "4 epochs (fine-tuning arms 2)" in page
    )
    assert (tmp_path / "docs" / "img" / "accuracy_vs_flops_4_epochs.png").read_bytes().startswith(b"\x89PNG")


def test_accuracy_report_without_the_paper_arm_checks_what_ran():
    report = _script("accuracy_report")  # e.g. a longer recipe run for two arms only
    scores = {"dense": (0.88, 0.881, 0.879), "lgc_gradual_full_classifier": (0.874, 0.868, 0.866)}
    runs = [
        {"arm": arm, "seed": seed, "test_accuracy": a}
        for arm, row in scores.items()
        for seed, a in enumerate(row)
    ]
    groups = report.by_arm(runs)
    rows = [line for line in report.best_table(groups).splitlines() if line.startswith("| learned")]
    assert len(rows) == 1 and rows[0].startswith("| learned groups within 1.0 of `dense` | not run |")
    assert (
        "`lgc_gradual_full_classifier` 86.93" in rows[0]
        and "-1.07, 1 of 3 seeds | missed by 0.07 |" in rows[0]
    )
    variant = report.targets(groups)[-1]
    assert variant.startswith("- variant `lgc_gradual_full_classifier` (3 seeds): 86.93%")
    assert "within 1.0 of `dense`: missed" in variant


def test_accuracy_missing_data_and_unknown_arm_exit_2(tmp_path, fake_fashion_mnist, capsys):
    accuracy = _script("accuracy")
    common = ["--smoke", "--json", str(tmp_path / "a.json"), "--work-dir", str(tmp_path / "w")]
    assert accuracy.main([*common, "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert accuracy.main([*common, "--data-dir", str(fake_fashion_mnist), "--arms", "lgc,nope"]) == 2
    assert "unknown arm 'nope'" in capsys.readouterr().err
    assert accuracy.main([*common, "--data-dir", str(fake_fashion_mnist), "--arms", "lgc_finetune"]) == 2
    assert "add --arms dense" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()


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
