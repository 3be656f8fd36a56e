"""lgconv.save / lgconv.load: exact round trips, a fresh process, no pickled code, atomic writes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from helpers import TinyConvNet, condense_all, perturb_
from torch import nn

import lgconv
from lgconv import model_file, safetensors_io
from lgconv.layers import CondensedConv2d, LearnedGroupConv
from lgconv.layers.learned_group import LearnedGroupMixin


def build_tiny(width: int = 16) -> nn.Module:
    """A builder named by its import path in the file (module ``test_io`` is not a trusted package)."""
    return TinyConvNet(in_channels=3, width=width)


def timm_model(stage: int | None) -> nn.Module:
    model = timm.create_model("resnet18", num_classes=7)
    lgconv.condensify(model, groups=4, condense_factor=4, layout="interleaved")
    return perturb_(condense_all(model, stage)).eval()


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("stage", [1, None], ids=["mid-condensing", "fully-condensed"])
def test_masked_timm_model_round_trips_exactly(tmp_path: Path, stage: int | None) -> None:
    model = timm_model(stage)
    path = lgconv.save(model, tmp_path / "model.pt")
    loaded = lgconv.load(path)
    assert_same_outputs(model, loaded, torch.randn(2, 3, 32, 32))
    for (name, a), b in zip(model.named_modules(), loaded.modules()):
        assert type(a) is type(b), name
        if isinstance(a, LearnedGroupMixin):
            assert torch.equal(a.mask, b.mask) and int(a.stage) == int(b.stage) and a.layout == b.layout
    spec = model_file.read_spec(path)
    assert spec.arch == "timm:resnet18" and spec.arch_kwargs == {"num_classes": 7}
    assert spec.input_size == (3, 224, 224) and loaded.default_input_size == (3, 224, 224)


def test_finalized_timm_model_round_trips_exactly(tmp_path: Path) -> None:
    model = lgconv.finalize(timm_model(stage=2), allow_partial=True)
    loaded = lgconv.load(lgconv.save(model, tmp_path / "final.lgc"))
    assert sum(isinstance(m, CondensedConv2d) for m in loaded.modules()) == 3
    assert_same_outputs(model, loaded, torch.randn(2, 3, 32, 32))


def test_condensed_linear_layers_round_trip(tmp_path: Path) -> None:
    model = timm.create_model("test_vit", num_classes=5)
    lgconv.condensify(model, groups=4, linear=True)
    perturb_(condense_all(model, stage=1)).eval()
    lgconv.finalize(model, allow_partial=True)
    loaded = lgconv.load(lgconv.save(model, tmp_path / "vit.pt"))
    assert_same_outputs(model, loaded, torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:]))


def test_condensenet_preset_round_trips(tmp_path: Path) -> None:
    models = pytest.importorskip("lgconv.models", reason="the CondenseNet presets have not landed yet")
    model = models.create_model("condensenet50")
    perturb_(condense_all(model, stage=1)).eval()
    x = torch.randn(2, *model.default_input_size)
    loaded = lgconv.load(lgconv.save(model, tmp_path / "cn.pt"))
    assert model_file.read_spec(tmp_path / "cn.pt").arch == "lgconv:condensenet50"
    assert_same_outputs(model, loaded, x)
    final = lgconv.finalize(copy.deepcopy(model), allow_partial=True)
    assert_same_outputs(final, lgconv.load(lgconv.save(final, tmp_path / "cn_final.pt")), x)


def test_loads_in_a_fresh_process_with_only_lgconv_imported(tmp_path: Path) -> None:
    model = lgconv.finalize(timm_model(stage=None))
    lgconv.save(model, tmp_path / "model.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        safetensors.torch.save_file({"x": x, "y": model(x)}, tmp_path / "io.safetensors")
    script = (
        "import sys, torch, lgconv, safetensors.torch as st\n"
        "torch.set_num_threads(1)  # as the test process: the same kernels, so bit-equal outputs\n"
        "d = st.load_file(sys.argv[2]); m = lgconv.load(sys.argv[1]).eval()\n"
        "with torch.no_grad(): y = m(d['x'])\n"
        "assert torch.equal(y, d['y']), 'outputs differ'\n"
        "print(type(m).__name__, sum(type(l).__name__ == 'CondensedConv2d' for l in m.modules()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model.pt"), str(tmp_path / "io.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ResNet", "3"]


def test_the_file_holds_no_pickle(tmp_path: Path) -> None:
    path = lgconv.save(timm_model(stage=1), tmp_path / "model.pt")
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    spec = json.loads(header["__metadata__"]["lgconv"])
    assert spec["format"] == "lgconv" and spec["layers"][0]["type"] == "LearnedGroupConv"
    assert spec["layers"][0]["config"]["learned_groups"] == 4 and spec["layers"][0]["state"]["stage"] == 1
    assert b"\x80\x04" not in path.read_bytes()[: length + 8]  # no pickle protocol marker in the header


def test_torchvision_builder_given_as_a_function(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(num_classes=3)
    lgconv.condensify(model, groups=2)
    perturb_(condense_all(model, stage=1)).eval()
    path = lgconv.save(
        model, tmp_path / "tv.pt", arch=torchvision.models.resnet18, arch_kwargs={"num_classes": 3}
    )
    assert model_file.read_spec(path).arch == "torchvision.models.resnet:resnet18"
    assert_same_outputs(model, lgconv.load(path), torch.randn(1, 3, 32, 32))


def test_untrusted_builders_run_only_when_trusted(tmp_path: Path) -> None:
    model = lgconv.condensify(build_tiny(width=8), groups=2)
    perturb_(condense_all(model)).eval()
    path = lgconv.save(
        model, tmp_path / "tiny.pt", arch=build_tiny, arch_kwargs={"width": 8}, input_size=(3, 8, 8)
    )
    with pytest.raises(ValueError, match="trust_builder=True"):
        lgconv.load(path)
    loaded = lgconv.load(path, trust_builder=True)
    assert loaded.default_input_size == (3, 8, 8)
    assert_same_outputs(model, loaded, torch.randn(1, 3, 8, 8))


def test_shared_layers_keep_being_shared(tmp_path: Path) -> None:
    layer = LearnedGroupConv(8, 8, 1, learned_groups=2)
    model = perturb_(condense_all(nn.Sequential(layer, nn.ReLU(), layer))).eval()
    record = model_file.layer_records(model)
    assert len(record) == 1 and record[0].names == ("0", "2")
    spec = model_file.ModelSpec("torch.nn:Sequential", {}, record)
    rebuilt = model_file._replace_layers(
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1)), spec.layers, ""
    )
    assert rebuilt[0] is rebuilt[2] and isinstance(rebuilt[0], LearnedGroupConv)


def test_save_refuses_a_model_of_unknown_origin(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot tell where the architecture"):
        lgconv.save(TinyConvNet(), tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def test_save_checks_that_the_spec_rebuilds_the_model(tmp_path: Path) -> None:
    model = timm_model(stage=1)
    with pytest.raises(ValueError, match="does not rebuild"):
        lgconv.save(model, tmp_path / "x.pt", arch="timm:resnet34", arch_kwargs={"num_classes": 7})
    with pytest.raises(ValueError, match="unknown timm architecture"):
        lgconv.save(model, tmp_path / "x.pt", arch="timm:no_such_net")
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    model = timm_model(stage=1)
    path = lgconv.save(model, tmp_path / "model.pt")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        lgconv.save(timm_model(stage=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    with pytest.raises(OSError, match="disk full"):
        lgconv.save(model, tmp_path / "new.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_write_into_a_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        lgconv.save(timm_model(stage=1), tmp_path / "nope" / "x.pt")


@pytest.mark.parametrize("cut", [4, 100, -1000])
def test_truncated_files_are_reported_as_corrupt(tmp_path: Path, cut: int) -> None:
    path = lgconv.save(timm_model(stage=1), tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ValueError, match="corrupt|not an lgconv model file"):
        lgconv.load(path)


def test_wrong_files_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lgconv.load(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello, I am not a model")
    with pytest.raises(ValueError, match="not an lgconv model file"):
        lgconv.load(tmp_path / "text.pt")
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="without an lgconv spec"):
        lgconv.load(tmp_path / "plain.safetensors")


def test_spec_problems_are_named(tmp_path: Path) -> None:
    path = lgconv.save(timm_model(stage=1), tmp_path / "model.pt")
    tensors = safetensors.torch.load_file(path)
    spec = json.loads(model_file.safetensors_metadata(path)["lgconv"])

    def write(changed: dict) -> Path:
        safetensors.torch.save_file(tensors, tmp_path / "edited.pt", metadata={"lgconv": json.dumps(changed)})
        return tmp_path / "edited.pt"

    with pytest.raises(ValueError, match="newer lgconv"):
        lgconv.load(write({**spec, "version": 99}))
    with pytest.raises(ValueError, match="unknown to this lgconv"):
        lgconv.load(write({**spec, "layers": [{**spec["layers"][0], "type": "FancyConv"}]}))
    with pytest.raises(ValueError, match="corrupt lgconv spec"):
        lgconv.load(write({k: v for k, v in spec.items() if k != "arch"}))
    with pytest.raises(ValueError, match="unknown dtype 'system'"):
        lgconv.load(write({**spec, "dtype": "system"}))
    with pytest.raises(ValueError, match="do not fit"):
        lgconv.load(write({**spec, "arch_kwargs": {"num_classes": 8}}))
    for arch in ("os:system", "lgconv.cli:main", "torchvision.models.resnet:torch.hub.download_url_to_file"):
        with pytest.raises(ValueError, match="not a public model builder"):
            lgconv.load(write({**spec, "arch": arch, "arch_kwargs": {}}))
    with pytest.raises(ValueError, match="not a public model builder"):  # imported into a models module
        lgconv.load(write({**spec, "arch": "torchvision.models.resnet:ImageClassification"}))
    with pytest.raises(ValueError, match="fetch other weights"):
        lgconv.load(
            write({**spec, "arch": "torchvision.models:resnet18", "arch_kwargs": {"weights": "DEFAULT"}})
        )


def test_half_precision_models_come_back_in_their_dtype(tmp_path: Path) -> None:
    model = lgconv.finalize(timm_model(stage=None)).to(torch.bfloat16)
    loaded = lgconv.load(lgconv.save(model, tmp_path / "bf16.pt"))
    assert model_file.read_spec(tmp_path / "bf16.pt").dtype == "bfloat16"
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert_same_outputs(model, loaded, torch.randn(1, 3, 32, 32, dtype=torch.bfloat16))


def test_wrapped_models_are_saved_as_the_model_inside(tmp_path: Path) -> None:
    model = timm_model(stage=1)
    wrapped = torch.compile(torch.nn.DataParallel(model))  # nothing runs: only the wrappers are peeled
    loaded = lgconv.load(lgconv.save(wrapped, tmp_path / "wrapped.pt"))
    assert model_file.read_spec(tmp_path / "wrapped.pt").arch == "timm:resnet18"
    assert_same_outputs(model, loaded, torch.randn(1, 3, 32, 32))


def test_module_versions_of_the_state_dict_survive(tmp_path: Path) -> None:
    """torchvision's MNASNet refuses weights without the version its state dict carries."""
    model = torchvision.models.mnasnet0_5(num_classes=4)
    lgconv.condensify(model, groups=2)
    perturb_(condense_all(model, stage=1)).eval()
    path = lgconv.save(
        model, tmp_path / "mnas.pt", arch=torchvision.models.mnasnet0_5, arch_kwargs={"num_classes": 4}
    )
    assert model_file.read_spec(path).state_metadata[""]["version"] == 2
    assert_same_outputs(model, lgconv.load(path), torch.randn(1, 3, 32, 32))


class _LargeNonPersistentBuffer(nn.Module):
    """Buffers the file does not hold, a fill and a range, larger than a thrifty build keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        table = torch.zeros(100_000)
        table[::3] = 1.0
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("positions", torch.arange(100_000) % 7, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.table[:4] + self.positions[1:5]


def build_with_table() -> nn.Module:
    return _LargeNonPersistentBuffer()


def build_tied() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    model[2].weight = model[0].weight
    return model


def test_loading_initialises_nothing_at_random(tmp_path: Path) -> None:
    """A mode outside lgconv's skeleton sees the random fills the skeleton lets through: none."""
    from torch.overrides import TorchFunctionMode

    class RandomFills(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("uniform_", "normal_") and args and isinstance(args[0], nn.Parameter):
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    model = timm_model(stage=1)
    path = lgconv.save(model, tmp_path / "model.pt")
    with RandomFills() as fills:
        timm.create_model("resnet18")
    assert fills.seen  # the probe sees a plain build's init
    with RandomFills() as fills:
        loaded = lgconv.load(path)
    assert fills.seen == []
    assert_same_outputs(model, loaded, torch.randn(1, 3, 32, 32))


def test_non_persistent_buffers_are_computed_and_ties_kept(tmp_path: Path) -> None:
    model = build_with_table()
    path = lgconv.save(model, tmp_path / "table.pt", arch=build_with_table, input_size=(4,))
    loaded = lgconv.load(path, trust_builder=True)
    assert torch.equal(loaded.table, model.table) and not loaded.table.is_meta
    assert torch.equal(loaded.positions, model.positions) and not loaded.positions.is_meta
    assert_same_outputs(model, loaded, torch.randn(2, 4))
    tied = build_tied()
    loaded = lgconv.load(
        lgconv.save(tied, tmp_path / "tied.pt", arch=build_tied, input_size=(6,)), trust_builder=True
    )
    assert loaded[0].weight is loaded[2].weight
    assert_same_outputs(tied, loaded, torch.randn(2, 6))


def _rewrite(path: Path, out: Path, edit) -> Path:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    header, data = edit(header, data)
    text = header if isinstance(header, str) else json.dumps(header)
    out.write_bytes(len(text.encode()).to_bytes(8, "little") + text.encode() + data)
    return out


def test_hostile_headers_are_refused_before_any_data_is_read(tmp_path: Path) -> None:
    path = lgconv.save(timm_model(stage=1), tmp_path / "model.pt")
    bad = tmp_path / "bad.pt"

    def entry(header: dict) -> str:
        return next(k for k in header if k.endswith("conv1.weight"))

    def overlap(header, data):
        key = entry(header)
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [start - 4, end - 4]
        return header, data

    def beyond(header, data):
        key = entry(header)
        header[key]["shape"] = [10**9, 10**9]
        return header, data

    def negative(header, data):
        header[entry(header)]["shape"] = [-1, 3, 3, 3]
        return header, data

    def duplicate(header, data):
        key = entry(header)
        text = json.dumps(header)
        return text[:-1] + f", {json.dumps(key)}: {json.dumps(header[key])}}}", data

    cases = [
        (overlap, "overlaps"),
        (beyond, "needs"),
        (negative, "is not a size"),
        (duplicate, "duplicate key"),
        (lambda h, d: (h, d + b"\0" * 8), "after the last tensor"),
        (lambda h, d: ({**h, "__metadata__": {"lgconv": 3}}, d), "not an object of strings"),
        (lambda h, d: ("[" * 5000 + "]" * 5000, d), "nested too deeply|not an lgconv"),
        (lambda h, d: (json.dumps(h).replace("]", ", NaN]", 1), d), "not a JSON number"),
    ]
    for edit, message in cases:
        with pytest.raises(ValueError, match=message):
            lgconv.load(_rewrite(path, bad, edit))
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{" + b" " * 100)
    with pytest.raises(ValueError, match="not an lgconv model file"):
        lgconv.load(bad)
    flipped = bytearray(path.read_bytes())
    length = int.from_bytes(flipped[:8], "little")
    header = json.loads(flipped[8 : 8 + length])
    mask = next(v for k, v in header.items() if k.endswith(".mask"))
    flipped[8 + length + mask["data_offsets"][0]] = 7
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is not 0/1"):
        lgconv.load(bad)


def test_hostile_specs_are_refused_in_one_line(tmp_path: Path) -> None:
    path = lgconv.save(timm_model(stage=1), tmp_path / "model.pt")
    tensors = safetensors.torch.load_file(path)
    spec = json.loads(model_file.safetensors_metadata(path)["lgconv"])
    layer = spec["layers"][0]

    def write(changed: dict | str) -> Path:
        text = changed if isinstance(changed, str) else json.dumps(changed)
        safetensors.torch.save_file(tensors, tmp_path / "edited.pt", metadata={"lgconv": text})
        return tmp_path / "edited.pt"

    wide = {**layer, "config": {**layer["config"], "in_channels": 400_000, "out_channels": 400_000}}
    cases = [
        ({**spec, "layers": [wide, *spec["layers"][1:]]}, "instead of \\(400000, 400000, 1, 1\\)"),
        ({**spec, "arch_kwargs": {"num_classes": 3_000_000_000}}, "absurdly large"),
        (
            {**spec, "arch_kwargs": {"num_classes": 70_000}},
            "'fc.weight' \\(7, 512\\) instead of \\(70000, 512\\)",
        ),
        ({**spec, "arch_kwargs": {"num_classes": -3}}, "building timm:resnet18 .* failed|do not fit"),
        ({**spec, "arch_kwargs": {"num_classes": "seven"}}, "building timm:resnet18 .* failed"),
        ({**spec, "layers": [layer, layer]}, "recorded twice"),
        ({**spec, "layers": [{**layer, "names": ["fc.weight"]}]}, "does not have"),
        ({**spec, "layers": [{**layer, "names": ["layer1.0.conv1.forward"]}]}, "does not have"),
        ({**spec, "layers": [{**layer, "names": ["a..b"]}]}, "not a dotted module name"),
        ({**spec, "layers": [{**layer, "config": {**layer["config"], "in_channels": 2.5}}]}, "bad config"),
        (
            {**spec, "layers": [{**layer, "config": {**layer["config"], "kernel_size": [-1, -1]}}]},
            "'kernel_size' is \\[-1, -1\\], not whole numbers >= 1",
        ),
        (  # torch's constructor accepts it and only the forward fails, in many lines: found by the fuzz suite
            {**spec, "layers": [{**layer, "config": {**layer["config"], "padding": [None, None]}}]},
            "'padding' is \\[None, None\\], not whole numbers >= 0",
        ),
        ({**spec, "layers": [{**layer, "state": {"stage": "one"}}]}, "state stage"),
        ({**spec, "input_size": [3, 100_000, 100_000]}, "absurdly large"),
        ({**spec, "input_size": [3, 0, 32]}, "input_size"),
        ({**spec, "version": True}, "version"),
        ({**spec, "training": "yes"}, "training"),
        ({**spec, "arch_kwargs": {"a": [[[[[[[[[[[[[[1]]]]]]]]]]]]]]}}, "nested deeper"),
        (json.dumps(spec).replace('"training": false', '"training": false, "training": true'), "duplicate"),
        ("x" * 5_000_000, "more than the"),
    ]
    for changed, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            lgconv.load(write(changed))
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="instead of \\(400000, 400000, 1, 1\\)"):
        model_file.read_spec(write({**spec, "layers": [wide, *spec["layers"][1:]]}))


def test_read_spec_does_not_run_an_untrusted_builder(tmp_path: Path) -> None:
    model = lgconv.condensify(build_tiny(width=8), groups=2)
    path = lgconv.save(
        model, tmp_path / "tiny.pt", arch=build_tiny, arch_kwargs={"width": 8}, input_size=(3, 8, 8)
    )
    tensors = safetensors.torch.load_file(path)
    spec = json.loads(model_file.safetensors_metadata(path)["lgconv"])
    safetensors.torch.save_file(
        tensors, tmp_path / "wide.pt", metadata={"lgconv": json.dumps({**spec, "arch_kwargs": {"width": 12}})}
    )
    assert model_file.read_spec(tmp_path / "wide.pt").arch_kwargs == {"width": 12}  # unchecked, not run
    with pytest.raises(ValueError, match="do not fit"):
        model_file.read_spec(tmp_path / "wide.pt", trust_builder=True)


def test_saved_tensors_lie_aligned_and_load_in_place_copy_on_write(tmp_path: Path) -> None:
    """lgconv.save pads the header so tensors start at 64-byte multiples; load maps them privately."""
    model = timm_model(stage=1)
    path = lgconv.save(model, tmp_path / "model.pt")
    header = safetensors_io.read_header(path)
    starts = {name: header.data_start + entry.start for name, entry in header.tensors.items()}
    aligned = [
        e.end - e.start for n, e in header.tensors.items() if starts[n] % safetensors_io.ALIGNMENT == 0
    ]
    assert sum(aligned) > 0.99 * header.data_size
    plain = safetensors.torch.load_file(path)  # still a file safetensors reads
    assert all(torch.equal(plain[name], tensor) for name, tensor in model.state_dict().items())
    before = path.read_bytes()
    loaded = lgconv.load(path)
    assert all(p.data_ptr() % safetensors_io.ALIGNMENT == 0 for p in loaded.parameters())
    with torch.no_grad():
        for parameter in loaded.parameters():
            parameter.add_(1.0)
    assert path.read_bytes() == before  # writes to a loaded model never reach the file
    torch.save(loaded.state_dict(), tmp_path / "state.pt")  # one storage per tensor, not one map
    assert (tmp_path / "state.pt").stat().st_size < 1.1 * header.data_size


def test_unaligned_files_are_read_into_aligned_tensors(tmp_path: Path) -> None:
    """A file written without the padding: every tensor is still exact and 64-byte aligned."""
    tensors = {
        "a": torch.tensor(3),
        "b": torch.randn(100, 33),
        "c": torch.tensor([True, False]),
        "d": torch.randn(7),
    }
    safetensors.torch.save_file(tensors, tmp_path / "plain.safetensors")
    header = safetensors_io.read_header(tmp_path / "plain.safetensors")
    assert any((header.data_start + e.start) % safetensors_io.ALIGNMENT for e in header.tensors.values())
    read = safetensors_io.read_data(tmp_path / "plain.safetensors", header)
    assert all(torch.equal(read[name], tensor) for name, tensor in tensors.items())
    assert all(tensor.data_ptr() % safetensors_io.ALIGNMENT == 0 for tensor in read.values())
