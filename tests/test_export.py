"""export_onnx: every representation computes the model, the written graph runs right in its runtime.

The ONNX Runtime path runs everywhere (onnxruntime is a test dependency); the OpenVINO path and the
reproduction of OpenVINO 2026.4's channel-permutation bug run where openvino is installed.
"""

from __future__ import annotations

import copy
import importlib
import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import condense_all, perturb_
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lgconv
from lgconv import export
from lgconv.channel_streams import find_streams
from lgconv.export import ExportMismatchError, compile_onnx, export_onnx, permutation_gathers, to_onnx
from lgconv.layers import CondensedConv2d

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
RUNTIMES = [
    "onnxruntime",
    pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")),
]


class Residual(nn.Module):
    """Condensed 1x1 convs in the three places an output order can go: into a plain 3x3 conv (``a``),
    into a residual sum (``c``), into a grouped 3x3 conv (``d``)."""

    def __init__(self, width: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.a, self.bn_a = nn.Conv2d(width, 2 * width, 1), nn.BatchNorm2d(2 * width)
        self.b, self.bn_b = nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.c, self.bn_c = nn.Conv2d(2 * width, width, 1), nn.BatchNorm2d(width)
        self.d, self.bn_d = nn.Conv2d(width, 2 * width, 1), nn.BatchNorm2d(2 * width)
        self.e = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=groups)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.bn_a(self.a(s)))
        y = self.relu(self.bn_b(self.b(y)))
        y = self.bn_c(self.c(y)) + s
        y = self.relu(self.bn_d(self.d(y)))
        return self.head(self.e(y).mean((2, 3)))


def finalized(layout: str = "interleaved", width: int = 16, groups: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Residual(width, groups)
    lgconv.condensify(model, groups, include=["a", "c", "d"], layout=layout)
    perturb_(condense_all(model), seed).eval()
    return lgconv.finalize(model).eval()


def run_graph(path: Path, runtime: str, x: torch.Tensor) -> np.ndarray:
    return compile_onnx(path, runtime)(x.numpy())


def assert_close(actual: np.ndarray, expected: torch.Tensor) -> None:
    torch.testing.assert_close(torch.as_tensor(actual), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("layout", ["interleaved", "contiguous"])
def test_export_matches_the_model_in_the_runtime_at_another_batch(runtime, layout, tmp_path: Path) -> None:
    model = finalized(layout)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, torch.randn(2, 3, 8, 8), runtime=runtime, repeats=1)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    assert_close(run_graph(path, runtime, x), expected)
    assert not permutation_gathers(onnx.load(str(path)))
    names = {choice.name for choice in report.layers}
    assert {"a", "c", "d", "e"} <= names
    for choice in report.layers:
        assert choice.representation in choice.candidates_ms and choice.ms > 0
    assert report.chosen in report.trials_ms and report.max_error < 1e-5
    text = str(report)
    assert str(path) in text and runtime in text and "\n  a " in text


def test_an_optimised_model_exports_too(tmp_path: Path) -> None:
    model = finalized()
    x = torch.randn(2, 3, 8, 8)
    optimised = lgconv.optimize_for_inference(copy.deepcopy(model), x, repeats=1)
    path = tmp_path / "model.onnx"
    report = export_onnx(optimised, path, x, repeats=1)
    with torch.no_grad():
        assert_close(run_graph(path, "onnxruntime", x), model(x))
    assert {"a", "c", "d"} <= {choice.name for choice in report.layers}


def test_a_model_optimised_with_the_native_kernel_exports_as_its_grouped_structure(tmp_path: Path) -> None:
    model = finalized()
    x = torch.randn(2, 3, 8, 8)
    optimised = lgconv.optimize_for_inference(copy.deepcopy(model), kernel="native")
    assert any(getattr(m, "kernel", None) == "native" for m in optimised.modules())
    path = tmp_path / "model.onnx"
    export_onnx(optimised, path, x, repeats=1)
    with torch.no_grad():
        assert_close(run_graph(path, "onnxruntime", x), model(x))


def test_an_optimised_layer_of_a_kernel_it_cannot_rebuild_is_refused_clearly(tmp_path: Path) -> None:
    optimised = lgconv.optimize_for_inference(finalized(), kernel="dense")
    optimised.a.kernel = "mystery"  # e.g. a kernel of a later lgconv whose weights export_onnx does not read
    with pytest.raises(ValueError, match="export the finalized model"):
        export_onnx(optimised, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), repeats=1)
    assert list(tmp_path.iterdir()) == []


def test_the_model_is_left_unchanged(tmp_path: Path) -> None:
    model = finalized()
    before = copy.deepcopy(model.state_dict())
    export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), repeats=1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, CondensedConv2d) for m in model.modules()) == 3


@settings(max_examples=12, deadline=None)
@given(
    width=st.sampled_from([4, 8, 12]),
    groups=st.sampled_from([2, 4]),
    layout=st.sampled_from(["interleaved", "contiguous"]),
    seed=st.integers(0, 100),
    pick=st.integers(0, 10_000),
)
def test_every_mix_of_representations_computes_the_model(width, groups, layout, seed, pick) -> None:
    """Whatever form each layer takes (orders folded forward, shuffled or absent), the graph's module
    computes what the finalized model computes: the maths the runtimes then only execute."""
    model = finalized(layout, width, groups, seed)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    form, folded, _ = export._export_form(model)
    for name, item in folded.items():
        export._set(form, name, export._build(item, "dense"))
    absorbers = export._order_absorbers(form, list(folded))
    assert set(absorbers) == {"a"}  # only a's output reaches a plain conv (b) through per-channel ops
    streams = find_streams(form, export._shuffled_orders(folded, set(absorbers)), export._Tracer())
    # c's output, when it has an order, joins the residual sum with the stem's (bn0, relu), read by a and d.
    streaming = {n for stream in streams for n in stream.condensed}
    assert streaming == ({"c"} if export._build(folded["c"], "grouped").order is not None else set())
    forms, leftovers = {}, {}
    for name, item in folded.items():
        forms[name], leftover = export._candidates(item, name in absorbers, name in streaming)
        if leftover is not None:
            leftovers[name] = leftover
    combos = list(itertools.product(*(sorted(forms[n]) for n in folded)))
    names = combos[pick % len(combos)]
    choices = [export.LayerChoice(n, r, {r: 1.0}) for n, r in zip(folded, names)]
    graph, built = export._assemble(form, forms, choices, leftovers, absorbers, streams)
    assert [c.name for c in built] == [c.name for c in choices]
    with torch.no_grad():
        torch.testing.assert_close(graph(x), expected, rtol=1e-5, atol=1e-5)


def minimal_permutation_graph(seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """Gather(axis=1, a channel permutation) -> Conv: OpenVINO 2026.4 computes it wrongly.
    Returns the graph, an input and the exact output."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((8, 16, 1, 1)).astype(np.float32)
    permutation = rng.permutation(16).astype(np.int64)
    nodes = [
        helper.make_node("Gather", ["x", "permutation"], ["permuted"], axis=1),
        helper.make_node("Conv", ["permuted", "weight"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "permutation_then_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 4])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(permutation, "permutation")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 16, 4, 4)).astype(np.float32)
    exact = np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], x[:, permutation])
    return model, x, exact


def test_the_permutation_pattern_is_recognised_in_an_onnx_graph() -> None:
    model, _, _ = minimal_permutation_graph()
    assert permutation_gathers(model) == ["permuted"]
    model.graph.node[1].attribute.append(helper.make_attribute("group", 4))  # a grouped conv is fine
    assert permutation_gathers(model) == []


def test_plain_torch_onnx_export_of_an_interleaved_layer_has_the_pattern_and_lgconv_s_does_not(
    tmp_path: Path,
) -> None:
    """A condensed layer whose restoring order feeds a conv: ``torch.onnx.export`` writes the
    permutation, export_onnx folds it into the next conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 8, 1))
    lgconv.condensify(model, 4, include=["0"], layout="interleaved")
    final = lgconv.finalize(perturb_(condense_all(model))).eval()
    x = torch.randn(2, 16, 4, 4)
    to_onnx(final, x, tmp_path / "plain.onnx")
    assert permutation_gathers(onnx.load(str(tmp_path / "plain.onnx")))
    export_onnx(final, tmp_path / "lgconv.onnx", x, repeats=1)
    assert not permutation_gathers(onnx.load(str(tmp_path / "lgconv.onnx")))


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
def test_openvino_miscomputes_the_minimal_graph_and_computes_lgconv_s_export_of_the_same_layers(
    tmp_path: Path,
) -> None:
    model, x, exact = minimal_permutation_graph()
    onnx.save(model, str(tmp_path / "minimal.onnx"))
    x = torch.from_numpy(x)
    assert np.abs(run_graph(tmp_path / "minimal.onnx", "onnxruntime", x) - exact).max() < 1e-4
    wrong = np.abs(run_graph(tmp_path / "minimal.onnx", "openvino", x) - exact).max()
    if wrong < 1e-3 * np.abs(exact).max():
        pytest.skip("this OpenVINO computes Gather(permutation) -> Conv right: the bug is fixed")
    # The same computation as lgconv layers: a condensed conv whose output order feeds a 1x1 conv
    # (32 outputs in 4 groups: the restoring shuffle is no involution, as a 16 = 4 x 4 one would be,
    # and OpenVINO applies the permutation's inverse).
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Conv2d(16, 32, 1), nn.Conv2d(32, 8, 1))
    lgconv.condensify(layers, 4, include=["0"], layout="interleaved")
    final = lgconv.finalize(perturb_(condense_all(layers))).eval()
    example = torch.randn(2, 16, 4, 4)
    to_onnx(final, example, tmp_path / "plain.onnx")
    with torch.no_grad():
        expected = final(example)
    plain = torch.as_tensor(run_graph(tmp_path / "plain.onnx", "openvino", example))
    assert (plain - expected).abs().max() > 0.1 * expected.abs().max()  # the bug, through torch.onnx
    export_onnx(final, tmp_path / "lgconv.onnx", example, runtime="openvino", repeats=1)
    assert_close(run_graph(tmp_path / "lgconv.onnx", "openvino", example), expected)


def test_bad_arguments_raise_one_clear_error_and_write_nothing(tmp_path: Path) -> None:
    model, x = finalized(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="runtime must be one of onnxruntime, openvino; got 'tensorrt'"):
        export_onnx(model, tmp_path / "m.onnx", x, runtime="tensorrt")
    with pytest.raises(ValueError, match="does not fit the model"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="does not exist"):
        export_onnx(model, tmp_path / "no" / "m.onnx", x)
    with pytest.raises(TypeError, match="example_input"):
        export_onnx(model, tmp_path / "m.onnx", x.long())
    masked = Residual()
    lgconv.condensify(masked, 4, include=["a"])
    with pytest.raises(ValueError, match="finalize"):
        export_onnx(masked.eval(), tmp_path / "m.onnx", x)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_runtime_names_the_package_and_the_extra(monkeypatch) -> None:
    real = importlib.import_module

    def without_openvino(name: str, *args: object) -> object:
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real(name, *args)

    monkeypatch.setattr(export.importlib, "import_module", without_openvino)
    with pytest.raises(ImportError, match=r'pip install "lgconv\[deploy\]"'):
        export_onnx(finalized(), "m.onnx", torch.randn(1, 3, 8, 8), runtime="openvino")


def test_outputs_that_differ_in_the_runtime_raise_and_write_nothing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(export, "_relative_error", lambda actual, expected: 0.5)
    with pytest.raises(ExportMismatchError, match="differ from the PyTorch model's in onnxruntime"):
        export_onnx(finalized(), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8), repeats=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dims", [1, 3])
def test_interleaved_conv1d_and_conv3d_export_as_a_shuffle_not_a_permutation(tmp_path, dims):
    """The interleaved layer's order before a plain conv is a channel shuffle in the graph (a
    ``Gather`` permutation there is what OpenVINO computes wrongly)."""
    conv = (nn.Conv1d, nn.Conv3d)[dims // 3]
    model = lgconv.condensify(
        nn.Sequential(conv(16, 32, 1), nn.ReLU(), conv(32, 16, 3, padding=1)), layout="interleaved"
    )
    condense_all(model)
    model = lgconv.finalize(model).eval()
    x = torch.randn(2, 16, *([5] * dims))
    report = lgconv.export_onnx(model, tmp_path / "m.onnx", x)
    assert report.max_error <= 1e-5
    assert permutation_gathers(onnx.load(str(tmp_path / "m.onnx"))) == []
    with torch.no_grad():
        assert model(x).shape == (2, 16, *([5] * dims))
