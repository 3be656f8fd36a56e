"""Hostile and broken model files: every reader ends in a model or one line, with memory bounded.

Fuzzed with hypothesis over real files of every format the CLI opens: truncation, byte flips in
header and data, random edits of every spec and header field, swapped tensors. The default run is
quick; ``HYPOTHESIS_PROFILE=slow pytest tests/test_model_file_fuzz.py`` runs 16x the examples.
Peak memory is measured in a subprocess for the crafted files of issue 13.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from click.testing import CliRunner
from helpers import condense_all, perturb_
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lgconv
from lgconv import model_file, model_formats
from lgconv.cli import main

EXAMPLES = settings.default.max_examples
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = settings(FUZZ, max_examples=max(4, EXAMPLES // 3))
ONE_GB = 2**30


def small_model(finalized: bool) -> torch.nn.Module:
    """timm's test_resnet condensified with the interleaved layout, half-condensed or finalized."""
    model = timm.create_model("test_resnet", num_classes=5)
    lgconv.condensify(model, groups=2, condense_factor=2, layout="interleaved")
    perturb_(condense_all(model)).eval()
    return lgconv.finalize(model) if finalized else model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    masked, final = small_model(finalized=False), small_model(finalized=True)
    paths = {
        "masked": lgconv.save(masked, folder / "masked.pt", input_size=(3, 32, 32)),
        "final": lgconv.save(final, folder / "final.pt", input_size=(3, 32, 32)),
    }
    dense = timm.create_model("test_resnet", num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.save(dense.state_dict(), folder / "sd.pth")
    torch.save(dense, folder / "whole.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(dense, x), folder / "ts.pt")
        torch.export.save(torch.export.export(dense, (x,)), folder / "ep.pt2")
    for name in ("sd", "whole", "ts", "ep"):
        paths[name] = next(folder.glob(f"{name}.*"))
    return paths


def one_line(call: Callable[[], Any]) -> str:
    """'ok' or 'refused'; anything but a one-line ValueError/TypeError fails the test."""
    try:
        call()
    except (ValueError, TypeError) as error:
        message = str(error).strip()
        assert message and "\n" not in message, repr(message)
        return "refused"
    return "ok"


def load_and_run(path: Path) -> None:
    model = lgconv.load(path)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 32, 32))


def open_any(path: Path, **options: Any) -> None:
    opened = model_formats.open_model(path, **options)
    assert isinstance(opened.module, torch.nn.Module)


def header_and_data(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header: dict[str, Any], data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def spec_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (object keys and list indices), the value itself included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += spec_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += spec_paths(item, (*prefix, index))
    return found


def replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, -1, 1, 3, 400_000, 3_000_000_000, 2**31, 2**53 + 1, 10**30])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["", "conv1", "layer1.0", "fc", "timm:resnet18", "LearnedGroupConv", "os:system"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


@FUZZ
@given(data=st.data())
def test_truncated_lgconv_files_are_refused_in_one_line(files, tmp_path: Path, data) -> None:
    raw = files[data.draw(st.sampled_from(["masked", "final"]))].read_bytes()
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    path = tmp_path / "cut.pt"
    path.write_bytes(raw[:cut])
    assert one_line(lambda: load_and_run(path)) == "refused"


@FUZZ
@given(data=st.data())
def test_byte_flips_anywhere_load_cleanly_or_are_refused(files, tmp_path: Path, data) -> None:
    raw = bytearray(files[data.draw(st.sampled_from(["masked", "final"]))].read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    where = data.draw(st.sampled_from(["length", "header", "data"]))
    span = {"length": (0, 7), "header": (8, header_end - 1), "data": (header_end, len(raw) - 1)}[where]
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(*span))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(raw))
    one_line(lambda: load_and_run(path))


@FUZZ
@given(data=st.data())
def test_random_edits_of_every_spec_field(files, tmp_path: Path, data) -> None:
    source = files[data.draw(st.sampled_from(["masked", "final"]))]
    tensors = safetensors.torch.load_file(source)
    spec = json.loads(model_file.safetensors_metadata(source)["lgconv"])
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(spec_paths(spec)[1:]))
        spec = replaced(spec, path, data.draw(JSON_VALUES))
    edited = tmp_path / "edited.pt"
    safetensors.torch.save_file(tensors, edited, metadata={"lgconv": json.dumps(spec)})
    one_line(lambda: load_and_run(edited))
    one_line(lambda: model_file.read_spec(edited))


@FUZZ
@given(data=st.data())
def test_random_edits_of_the_header(files, tmp_path: Path, data) -> None:
    header, payload = header_and_data(files[data.draw(st.sampled_from(["masked", "final"]))])
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "name", "entry", "duplicate"]))
    if field == "name":
        header[data.draw(st.sampled_from(["", "x", "fc.weight2", name + ".extra"]))] = header.pop(name)
    elif field == "entry":
        header[name] = data.draw(JSON_VALUES)
    elif field == "duplicate":
        text = json.dumps(header)
        text = text[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
        path = tmp_path / "dup.pt"
        path.write_bytes(len(text).to_bytes(8, "little") + text.encode() + payload)
        assert one_line(lambda: lgconv.load(path)) == "refused"
        return
    else:
        options = {
            "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "U8", "F99", 3]),
            "shape": st.lists(st.integers(-3, 10**12), max_size=5) | JSON_VALUES,
            "data_offsets": st.lists(st.integers(-3, 10**12), min_size=2, max_size=2) | JSON_VALUES,
        }
        header[name] = {**header[name], field: data.draw(options[field])}
    path = write_safetensors(tmp_path / "header.pt", header, payload)
    one_line(lambda: load_and_run(path))


@FUZZ
@given(data=st.data())
def test_swapped_tensors_load_or_are_refused(files, tmp_path: Path, data) -> None:
    header, payload = header_and_data(files[data.draw(st.sampled_from(["masked", "final"]))])
    names = sorted(k for k in header if k != "__metadata__")
    a, b = data.draw(st.lists(st.sampled_from(names), min_size=2, max_size=2, unique=True))
    header[a], header[b] = header[b], header[a]
    path = write_safetensors(tmp_path / "swapped.pt", header, payload)
    same = header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]
    outcome = one_line(lambda: load_and_run(path))
    checked = any(word in a + b for word in ("index", "mask", "stage", "kept"))  # values are checked
    assert outcome == "ok" or not same or checked


@FEW
@given(data=st.data())
def test_the_cli_answers_every_broken_lgconv_file_with_exit_0_or_2_and_one_line(
    files, tmp_path: Path, data
) -> None:
    raw = bytearray(files[data.draw(st.sampled_from(["masked", "final"]))].read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "broken.pt"
    path.write_bytes(bytes(raw))
    command = data.draw(st.sampled_from([["flops"], ["inspect"], ["finalize", "--allow-partial"]]))
    args = [command[0], str(path), *([str(tmp_path / "out.pt")] if command[0] == "finalize" else [])]
    result = CliRunner().invoke(main, args + command[1:])
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@FUZZ
@given(data=st.data())
def test_other_formats_truncated_or_flipped(files, tmp_path: Path, data) -> None:
    kind = data.draw(st.sampled_from(["sd", "whole", "ts", "ep"]))
    raw = bytearray(files[kind].read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / files[kind].name
    path.write_bytes(bytes(raw))
    options = {"sd": {"arch": "timm:test_resnet"}, "whole": {"trust_pickle": True}}.get(kind, {})
    one_line(lambda: open_any(path, **options))


def test_other_formats_intact_still_open(files) -> None:
    assert one_line(lambda: open_any(files["sd"], arch="timm:test_resnet")) == "ok"
    assert one_line(lambda: open_any(files["whole"], trust_pickle=True)) == "ok"
    assert one_line(lambda: open_any(files["whole"])) == "refused"
    assert one_line(lambda: open_any(files["ts"])) == "ok"
    assert one_line(lambda: open_any(files["ep"])) == "ok"


def test_a_zip_bomb_is_refused_before_unpacking(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (300 * 2**20))
    assert path.stat().st_size < 2**20
    with pytest.raises(ValueError, match="refusing to unpack"):
        model_formats.open_model(path, arch="timm:test_resnet")


CRAFTED = textwrap.dedent(
    """
    import json, sys
    import safetensors.torch as st, timm, lgconv
    from lgconv import model_file

    folder = sys.argv[1]
    model = lgconv.condensify(timm.create_model("resnet18"), groups=4)
    base = lgconv.save(model, f"{folder}/base.pt")
    tensors = st.load_file(base)
    spec = json.loads(model_file.safetensors_metadata(base)["lgconv"])
    first = spec["layers"][0]
    wide = {**first, "config": {**first["config"], "in_channels": 400_000, "out_channels": 400_000}}
    crafted = {
        "wide": {**spec, "layers": [wide, *spec["layers"][1:]]},
        "classes": {**spec, "arch_kwargs": {"num_classes": 3_000_000_000}},
        "classes_2e6": {**spec, "arch_kwargs": {"num_classes": 2_000_000}},
        "depth": {
            **spec, "arch": "timm:vit_tiny_patch16_224", "arch_kwargs": {"depth": 60_000}, "layers": []
        },
    }
    for name, edited in crafted.items():
        st.save_file(tensors, f"{folder}/{name}.pt", metadata={"lgconv": json.dumps(edited)})
    """
)
# One crafted file per process, as a user would open it: the API, then flops / inspect / finalize.
OPEN_CRAFTED = textwrap.dedent(
    """
    import json, resource, sys
    import lgconv
    from click.testing import CliRunner
    from lgconv.cli import main

    folder, name = sys.argv[1], sys.argv[2]
    path = f"{folder}/{name}.pt"
    outcomes = {}
    try:
        lgconv.load(path)
        outcomes[name] = "loaded"
    except ValueError as error:
        outcomes[name] = str(error)
    for command in (["flops", path], ["inspect", path], ["finalize", path, f"{folder}/o.pt"]):
        result = CliRunner().invoke(main, command)
        outcomes[f"{name} {command[0]}"] = [result.exit_code, result.stderr]
    # VmHWM is this process's own peak: ru_maxrss survives exec, so a child started by vfork from a
    # 2 GB pytest process would report the parent's high-water mark.
    try:
        status = open("/proc/self/status").read()
        peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes["max_rss_bytes"] = peak * 1024
    print(json.dumps(outcomes))
    """
)


def test_crafted_files_of_issue_13_are_refused_in_one_line_with_bounded_memory(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-c", CRAFTED, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert made.returncode == 0, made.stderr[-3000:]
    outcomes: dict[str, Any] = {}
    for name in ("wide", "classes", "classes_2e6", "depth"):
        done = subprocess.run(
            [sys.executable, "-c", OPEN_CRAFTED, str(tmp_path), name],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        case = json.loads(done.stdout.strip().splitlines()[-1])
        peak = case.pop("max_rss_bytes")
        assert peak < 1.5 * ONE_GB, f"{name}: peak resident memory {peak / ONE_GB:.2f} GB"
        outcomes.update(case)
    assert "instead of (400000, 400000, 1, 1)" in outcomes["wide"]
    assert "absurdly large" in outcomes["classes"]
    assert "'fc.weight' (1000, 512) instead of (2000000, 512)" in outcomes["classes_2e6"]
    assert "tensors while the file holds" in outcomes["depth"]
    for name in ("wide", "classes", "classes_2e6", "depth"):
        for command in ("flops", "inspect", "finalize"):
            code, stderr = outcomes[f"{name} {command}"]
            assert code == 2 and len(stderr.strip().splitlines()) == 1, (name, command, stderr)
    assert not (tmp_path / "o.pt").exists()
