"""examples/condensenet_cifar.py end to end in a tiny mode: outputs, exact resume, clear data errors."""

from __future__ import annotations

import importlib.util
import json
import traceback
from pathlib import Path
from types import ModuleType

import pytest
import torch
from click.testing import CliRunner, Result

import lgconv

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "condensenet_cifar.py"
# 32 digits in batches of 16: 2 steps per epoch; 3 epochs put the three 1x1 drops at steps 1, 2, 3
# and the classifier drop at step 3, so stopping after epoch 1 is mid-condensation.
TINY = ["--dataset", "digits", "--model", "condensenet50", "--subset", "32", "--batch-size", "16"]
TINY += ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("condensenet_cifar", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(example: ModuleType, *args: str) -> Result:
    result = CliRunner().invoke(example.main, [*TINY, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        traceback.print_exception(result.exception)
    return result


def test_tiny_run_ends_with_finalized_model_table_log_and_plot(example: ModuleType, tmp_path: Path) -> None:
    result = run(example, "--epochs", "2", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "stage", "train_images_per_s"} <= set(
        rows[0]
    )
    assert rows[-1]["stage"] == "optimization" and rows[-1]["lr"] == pytest.approx(0.0)
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    masked, final, optimized = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert final["test_acc"] == masked["test_acc"] == optimized["test_acc"]
    assert final["params"] < 0.5 * masked["params"] and final["flops_paper"] < 0.5 * masked["flops_paper"]
    assert optimized["form"] == "finalized + optimized"
    assert "finalized / masked" in result.output and "same accuracy: True" in result.output
    assert "gives back outputs within 0.0e+00" in result.output
    model = lgconv.load(tmp_path / "model_final.safetensors")
    assert any(isinstance(m, lgconv.CondensedConv2d) for m in model.modules())
    assert isinstance(model.classifier, lgconv.CondensedLinear)
    assert model.default_input_size == (1, 16, 16)


def test_resume_after_an_interrupt_mid_condensation_is_exact(example: ModuleType, tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run(example, "--epochs", "3", "--out", str(straight)).exit_code == 0
    stopped = run(example, "--epochs", "3", "--out", str(interrupted), "--stop-after", "1")
    assert stopped.exit_code == 0 and "stopped after epoch 1" in stopped.output
    middle = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    stages = {int(v) for k, v in middle["model"].items() if k.endswith("conv1.stage")}
    assert stages == {2}  # two of the three 1x1 drops done: mid-condensation
    resumed = run(example, "--epochs", "3", "--out", str(interrupted), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed after epoch 1" in resumed.output
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    logs = [
        [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        for d in (straight, interrupted)
    ]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]
    assert [r["train_loss"] for r in logs[0]] == [r["train_loss"] for r in logs[1]]


def test_resume_refuses_other_options(example: ModuleType, tmp_path: Path) -> None:
    assert run(example, "--epochs", "2", "--out", str(tmp_path), "--stop-after", "1").exit_code == 0
    result = run(example, "--epochs", "2", "--out", str(tmp_path), "--resume", "--lr", "0.05")
    assert result.exit_code == 2
    assert "--lr 0.1 (now 0.05)" in result.output


def test_dense_baseline_trains_without_condensing(example: ModuleType, tmp_path: Path) -> None:
    result = run(example, "--epochs", "1", "--dense", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert row["form"] == "dense baseline"
    assert json.loads((tmp_path / "log.jsonl").read_text())["stage"] == "dense"


def test_missing_fashion_mnist_says_how_to_get_it(example: ModuleType, tmp_path: Path) -> None:
    result = CliRunner().invoke(example.main, ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in result.output
    assert "--data-dir" in result.output


def test_missing_cifar_without_download_says_how_to_get_it(example: ModuleType, tmp_path: Path) -> None:
    result = CliRunner().invoke(example.main, ["--data-dir", str(tmp_path), "--no-download"])
    assert result.exit_code == 2
    assert "cifar10 is not in" in result.output and "--download" in result.output


def test_augment_crops_a_shifted_window_and_flips(example: ModuleType) -> None:
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).reshape(2, 1, 8, 8)
    cropped = example.augment(images, torch.Generator().manual_seed(1), crop=True, flip=False)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(2):
        windows = padded[i, 0].unfold(0, 8, 1).unfold(1, 8, 1).reshape(-1, 8, 8)
        assert any(torch.equal(cropped[i, 0], w) for w in windows)
    flipped = example.augment(images, torch.Generator().manual_seed(0), crop=False, flip=True)
    for i in range(2):
        assert torch.equal(flipped[i], images[i]) or torch.equal(flipped[i], images[i].flip(2))
