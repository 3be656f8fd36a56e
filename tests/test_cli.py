"""The lgconv command line: every command on every format, and every error as one line with exit 2."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from click.testing import CliRunner
from helpers import condense_all, perturb_

import lgconv
import lgconv.models
from lgconv.cli import main
from lgconv.layers import CondensedConv2d


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small model saved in every format the CLI reads, plus broken files."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5)
    lgconv.condensify(model, groups=4)
    perturb_(condense_all(model)).eval()
    names = ("masked.pt", "partial.pt", "sd.pth", "whole.pt", "ts.pt", "ep.pt2")
    paths = {name.split(".")[0]: folder / name for name in names}
    lgconv.save(model, paths["masked"], input_size=(3, 32, 32))
    partial = timm.create_model("resnet18", num_classes=5)
    lgconv.save(condense_all(lgconv.condensify(partial, groups=4), stage=1), paths["partial"])
    dense = timm.create_model("resnet18", num_classes=5).eval()
    torch.save(dense.state_dict(), paths["sd"])
    torch.save(dense, paths["whole"])
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(dense, x), paths["ts"])
        torch.export.save(torch.export.export(dense, (x,)), paths["ep"])
    paths["junk"] = folder / "junk.bin"
    paths["junk"].write_bytes(b"this is not a model at all" * 10)
    paths["truncated"] = folder / "truncated.pt"
    paths["truncated"].write_bytes(paths["masked"].read_bytes()[:-5000])
    return paths


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def json_report(*args: object) -> dict:
    code, out, err = run("flops", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_flops_of_a_masked_lgconv_file_shows_dense_and_effective(files) -> None:
    code, out, err = run("flops", files["masked"])
    assert code == 0, err
    assert "input 1x3x32x32 (recorded in the file)" in out
    assert "multiply-adds" in out and "dense" in out and "effective:" in out
    report = json_report(files["masked"])
    library = lgconv.count_flops(lgconv.load(files["masked"]), (3, 32, 32))
    assert report["total"] == library.total < report["dense_total"] == library.dense_total
    assert report["input_source"] == "recorded in the file" and report["counter"] == "fvcore"


def test_flops_options_change_what_is_counted_and_shown(files) -> None:
    report = json_report(files["masked"], "--input-size", 3, 64, 64, "--batch", 2)
    assert report["input_shapes"] == [[2, 3, 64, 64]] and report["input_source"] == "from --input-size"
    small = json_report(files["masked"])
    assert report["by_operator"]["conv"] == 8 * small["by_operator"]["conv"]  # 2x batch, 4x pixels
    code, out, _ = run("flops", files["masked"], "--by", "operator")
    assert code == 0 and out.splitlines()[1].startswith("operator")
    code, out, _ = run("flops", files["masked"], "--depth", 0)
    assert "layer1" not in out and "(model)" in out
    paper = json_report(files["masked"], "--convention", "paper")
    assert "relu" in paper["by_operator"] and "batch_norm" not in paper["by_operator"]


def test_flops_of_a_plain_state_dict_needs_the_architecture(files) -> None:
    report = json_report(files["sd"], "--arch", "timm:resnet18")
    assert report["format"] == "state dict" and report["input_source"] == "declared by the model"
    assert report["input_shapes"] == [[1, 3, 224, 224]]


def test_flops_of_a_state_dict_with_builder_arguments(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "tv.pth")
    args = ("--arch", "torchvision.models:resnet18", "--input-size", 3, 32, 32)
    code, _, err = run("flops", tmp_path / "tv.pth", *args)
    assert code == 2 and "--arch-kwargs" in err
    report = json_report(tmp_path / "tv.pth", *args, "--arch-kwargs", '{"num_classes": 3}')
    assert report["by_module"]["fc"] == 512 * 3


def test_flops_of_torchscript_and_exported_programs(files) -> None:
    script = json_report(files["ts"])
    assert script["counter"] == "torch.utils.flop_counter" and script["fallback_reason"]
    assert script["input_source"].startswith("default")
    exported = json_report(files["ep"])
    assert exported["input_source"] == "from the torch.export program"
    assert exported["input_shapes"] == [[1, 3, 32, 32]]
    state = json_report(files["sd"], "--arch", "timm:resnet18", "--input-size", 3, 32, 32)
    assert exported["by_operator"]["conv"] == state["by_operator"]["conv"]
    code, out, _ = run("flops", files["ts"])
    assert "default; pass --input-size" in out and "torch.utils.flop_counter counted it" in out


def test_pickled_modules_load_only_when_trusted(files) -> None:
    code, _, err = run("flops", files["whole"])
    assert code == 2 and "--trust-pickle" in err
    report = json_report(files["whole"], "--trust-pickle", "--input-size", 3, 32, 32)
    assert report["format"] == "pickled nn.Module"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("flops", "{tmp}/missing.pt"), "does not exist"),
        (("flops", "{junk}"), "not a model file lgconv reads"),
        (("flops", "{truncated}"), "corrupt or truncated"),
        (("flops", "{masked}", "--input-size", "1", "32", "32"), "an input size the model accepts"),
        (("flops", "{sd}", "--arch", "timm:no_such_net"), "unknown timm architecture"),
        (("flops", "{sd}", "--arch", "resnet18"), "not of the form"),
        (("flops", "{sd}"), "pass --arch"),
        (("flops", "{sd}", "--arch", "timm:resnet34"), "do not fit"),
        (("flops", "{sd}", "--arch", "timm:resnet18", "--arch-kwargs", "num_classes=5"), "not a JSON object"),
        (("flops", "{masked}", "--arch-kwargs", '{{"num_classes": 5}}'), "drop --arch"),
        (("flops", "{masked}", "--arch", "timm:resnet18"), "drop --arch"),
        (("flops", "{whole}"), "--trust-pickle"),
        (("flops", "{masked}", "--input-size", "0", "32", "32"), "--input-size"),
        (("flops", "{masked}", "--by", "layer"), "see lgconv flops --help"),
        (("plan", "--arch", "timm:no_such_net"), "unknown timm architecture"),
        (("plan",), "Missing option '--arch'"),
        (("finalize", "{partial}", "{tmp}/out.pt"), "--allow-partial"),
        (("finalize", "{ts}", "{tmp}/out.pt"), "finalize reads lgconv files"),
        (("finalize", "{masked}", "{tmp}/no/such/folder/out.pt"), "does not exist"),
        (("finalize", "{junk}", "{tmp}/out.pt"), "not a model file"),
        (("inspect", "{sd}"), "not an lgconv file"),
        (("inspect", "{truncated}"), "corrupt or truncated"),
        (("inspect", "{tmp}"), "is a directory"),
        (("nosuchcommand",), "No such command"),
    ],
)
def test_every_error_is_one_line_on_stderr_with_exit_2(files, tmp_path: Path, args, message: str) -> None:
    names = {"tmp": tmp_path, **{name: path for name, path in files.items()}}
    code, out, err = run(*(arg.format(**names) for arg in args))
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert err.startswith("lgconv")
    assert not (tmp_path / "out.pt").exists()


def test_plan_prints_the_table_and_flops_before_and_after(files) -> None:
    code, out, err = run(
        "plan", "--arch", "timm:resnet18", "--input-size", 3, 32, 32, "--exclude", "layer4.*"
    )
    assert code == 0, err
    assert "layer4.0.downsample.0" in out and "excluded by pattern" in out
    assert "2 of 21 layers condensed" in out
    line = next(line for line in out.splitlines() if line.startswith("FLOPs"))
    before, after = (
        int(n.replace(",", "")) for n in re.search(r"([\d,]+) before -> ([\d,]+) after", line).groups()
    )
    assert after < before
    dense = timm.create_model("resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert before == lgconv.count_flops(dense, (3, 32, 32)).total


def test_finalize_then_count_and_inspect(files, tmp_path: Path) -> None:
    out_file = tmp_path / "final.pt"
    code, out, err = run("finalize", files["masked"], out_file)
    assert code == 0, err and "finalized 3 layers" in out
    masked, final = lgconv.load(files["masked"]).eval(), lgconv.load(out_file).eval()
    assert sum(isinstance(m, CondensedConv2d) for m in final.modules()) == 3
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(final(x), masked(x), rtol=1e-5, atol=1e-5)
    assert json_report(out_file)["total"] == json_report(files["masked"])["total"]
    code, out, _ = run("inspect", out_file)
    assert code == 0 and "CondensedConv2d" in out and "0 masked" in out and "3x32x32" in out
    code, out, _ = run("finalize", out_file, tmp_path / "again.pt")
    assert code == 2 and not (tmp_path / "again.pt").exists()


def test_finalize_allow_partial(files, tmp_path: Path) -> None:
    code, out, err = run("finalize", files["partial"], tmp_path / "p.pt", "--allow-partial")
    assert code == 0, err
    assert "3 of them partially condensed" in out


def test_inspect_lists_every_condensed_layer(files) -> None:
    code, out, err = run("inspect", files["partial"])
    assert code == 0, err
    assert "architecture: timm:resnet18" in out
    rows = [line for line in out.splitlines() if "LearnedGroupConv" in line]
    assert len(rows) == 3 and all("1/3" in row and "0.750" in row for row in rows)
    code, out, _ = run("inspect", files["partial"], "--json")
    assert json.loads(out)["layers"][0]["state"]["stage"] == 1


@pytest.mark.parametrize("command", ["flops", "plan", "finalize", "inspect", "export"])
def test_help_of_every_command_shows_an_example(command: str) -> None:
    code, out, _ = run(command, "--help")
    assert code == 0 and "Examples:" in out and f"lgconv {command}" in out


def test_the_installed_console_script_runs(files) -> None:
    script = shutil.which("lgconv") or str(Path(sys.executable).with_name("lgconv"))
    done = subprocess.run(
        [script, "flops", str(files["masked"]), "--json"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["input_shapes"] == [[1, 3, 32, 32]]
    done = subprocess.run([script, "flops", str(files["junk"])], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and not done.stdout


def test_condensenet_preset_plan_matches_the_paper_and_its_file_counts_at_32(tmp_path: Path) -> None:
    code, out, err = run("plan", "--arch", "lgconv:condensenet50", "--convention", "paper")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("FLOPs"))
    after = int(re.search(r"-> ([\d,]+) after", line).group(1).replace(",", ""))
    assert abs(after - 28.6e6) / 28.6e6 < 0.01  # CondenseNet-50: 28.6M in the paper's table
    model = lgconv.models.create_model("condensenet50")
    lgconv.save(condense_all(model), tmp_path / "cn50.pt")
    report = json_report(tmp_path / "cn50.pt", "--convention", "paper")
    assert report["input_shapes"] == [[1, 3, 32, 32]] and report["input_source"] == "recorded in the file"
    assert report["total"] == after


@pytest.fixture(scope="module")
def final_file(files, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("final") / "final.pt"
    lgconv.save(lgconv.finalize(lgconv.load(files["masked"])).eval(), path, input_size=(3, 32, 32))
    return path


def test_export_writes_an_onnx_graph_that_matches_the_model(final_file, tmp_path: Path) -> None:
    out_file = tmp_path / "model.onnx"
    code, out, err = run("export", final_file, out_file, "--batch", 2)
    assert code == 0, err
    assert "ONNX for onnxruntime, timed on input 2x3x32x32" in out and "max relative error" in out
    from lgconv.export import compile_onnx

    model, x = lgconv.load(final_file).eval(), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(compile_onnx(out_file)(x.numpy())), model(x))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("{final}", "{tmp}/m.onnx", "--runtime", "tensorrt"),
            "runtime must be one of onnxruntime, openvino",
        ),
        (("{masked}", "{tmp}/m.onnx"), "still has learned group layers; finalize it first"),
        (("{final}", "{tmp}/m.onnx", "--input-size", "1", "32", "32"), "does not fit the model"),
        (("{final}", "{tmp}/no/such/folder/m.onnx"), "does not exist"),
    ],
)
def test_export_errors_are_one_line_with_exit_2(files, final_file, tmp_path: Path, args, message) -> None:
    names = {"tmp": tmp_path, "final": final_file, "masked": files["masked"]}
    code, out, err = run("export", *(arg.format(**names) for arg in args))
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("lgconv export")
    assert list(tmp_path.iterdir()) == []


def test_export_with_a_runtime_not_installed_names_the_extra(final_file, tmp_path: Path, monkeypatch) -> None:
    from lgconv import export

    real = export.importlib.import_module
    monkeypatch.setattr(
        export.importlib,
        "import_module",
        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "openvino" else real(name, *a),
    )
    code, _, err = run("export", final_file, tmp_path / "m.onnx", "--runtime", "openvino")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "needs the openvino package" in err and 'pip install "lgconv[deploy]"' in err
