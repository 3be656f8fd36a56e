"""lgconv.kernels: the native condensed pointwise op equals its PyTorch reference; every path runs it."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import condense_all, perturb_
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lgconv
from lgconv.kernels import (
    DISABLE_VARIABLE,
    avg_pool2x2_reference,
    build,
    condensed_pointwise_reference,
    dense_block_reference,
    grouped_conv3x3_reference,
    load_native,
)
from lgconv.layers import FusedCondensedConv2d, NativeAvgPool2d, NativeGroupedConv2d
from lgconv.models import CondenseNet
from lgconv.models.condensenet import condense_network

ROOT = Path(__file__).resolve().parents[1]
op = torch.ops.lgconv.condensed_pointwise
conv3x3 = torch.ops.lgconv.grouped_conv3x3
avg_pool = torch.ops.lgconv.avg_pool2x2
dense_block = torch.ops.lgconv.dense_block


@pytest.fixture(scope="module")
def native() -> bool:
    """Build (once per machine, cached) and load the C++ kernel; the tests need a compiler."""
    if os.environ.get(DISABLE_VARIABLE) == "0":
        pytest.skip(f"{DISABLE_VARIABLE}=0 keeps the native kernel off")
    assert load_native(), "the native kernel did not build (see the warning)"
    return True


@st.composite
def op_arguments(draw, dtype: torch.dtype = torch.float32) -> tuple:
    """Random op arguments: odd channel counts, channel slices, strided pixels, both memory formats."""
    groups = draw(st.integers(1, 4))
    kept = draw(st.integers(1, 9))
    group_outputs = draw(st.integers(1, 19))
    channels = draw(st.integers(kept, kept + 12))
    extra = draw(st.integers(0, 5))  # a channel slice of a wider tensor, as in a dense block
    # Planes up to 12 x 12 reach every path of the planes kernel: whole chunks, whole vectors, a tail.
    batch, height, width = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    layout = draw(st.sampled_from(["channels_last", "contiguous", "spatial_stride"]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, channels + extra, height, width * 2, generator=generator, dtype=dtype)
    if layout != "contiguous":
        wide = wide.contiguous(memory_format=torch.channels_last)
    x = wide[:, extra:, :, ::2] if layout == "spatial_stride" else wide[:, extra:, :, :width]
    index = torch.cat([torch.randperm(channels, generator=generator)[:kept] for _ in range(groups)])
    outputs = groups * group_outputs
    weight = torch.randn(outputs, kept, 1, 1, generator=generator, dtype=dtype)
    sides = draw(st.sampled_from([None, "low", "high", "both"]))
    low = torch.randn(groups * kept, generator=generator, dtype=dtype) if sides in ("low", "both") else None
    high = None
    if sides in ("high", "both"):
        high = torch.randn(groups * kept, generator=generator, dtype=dtype) + (0 if low is None else low + 1)
    bias = torch.randn(outputs, generator=generator, dtype=dtype) if draw(st.booleans()) else None
    order = torch.randperm(outputs, generator=generator) if draw(st.booleans()) else None
    return x, index, weight, bias, low, high, order, groups


def assert_op_equals_reference(native_op, reference, args: tuple) -> None:
    """The native op gives the reference's values, shape and strides (the fake promises them)."""
    expected = reference(*args)
    with torch.inference_mode():
        actual = native_op(*args)
    assert actual.shape == expected.shape and actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(args=op_arguments())
def test_native_equals_reference(native, args):
    assert_op_equals_reference(op, condensed_pointwise_reference, args)


@settings(max_examples=20, deadline=None)
@given(args=op_arguments(torch.float64))
def test_other_dtypes_take_the_aten_path(native, args):
    torch.testing.assert_close(op(*args), condensed_pointwise_reference(*args), atol=1e-12, rtol=1e-12)


@pytest.fixture
def two_threads():
    """Two torch threads for one test: the kernels split their work between them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_kernels_split_between_threads_compute_the_same(native, two_threads, memory_format):
    """Shapes with many more work items than one thread's share, so every op runs split in two."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 23, 29, generator=generator).contiguous(memory_format=memory_format)
    index = torch.cat([torch.randperm(40, generator=generator)[:10] for _ in range(4)])
    weight, bias = torch.randn(36, 10, 1, 1, generator=generator), torch.randn(36, generator=generator)
    low = torch.randn(40, generator=generator)
    order = torch.randperm(36, generator=generator)
    args = (x, index, weight, bias, low, None, order, 4)
    conv_args = (x, torch.randn(16, 10, 3, 3, generator=generator), None, 4)
    with torch.inference_mode():
        torch.testing.assert_close(op(*args), condensed_pointwise_reference(*args), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            conv3x3(*conv_args), grouped_conv3x3_reference(*conv_args), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(avg_pool(x), avg_pool2x2_reference(x), atol=1e-6, rtol=1e-6)


def _fake_builds(monkeypatch, fails_with) -> list[list[str]]:
    """Replace the compiler: a build whose flags include any of ``fails_with`` raises."""
    from torch.utils import cpp_extension

    builds: list[list[str]] = []

    def load(name, sources, extra_cflags, **kwargs):
        builds.append(extra_cflags)
        if any(flag in extra_cflags for flag in fails_with):
            raise RuntimeError("Error building extension 'x': fatal error: omp.h: No such file or directory")

    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(build, "_threading_flags", lambda: ["-fopenmp"])
    monkeypatch.delenv(DISABLE_VARIABLE, raising=False)
    return builds


def test_a_failed_openmp_build_falls_back_to_a_serial_one_with_one_warning(monkeypatch):
    builds = _fake_builds(monkeypatch, fails_with=["-fopenmp"])
    with pytest.warns(RuntimeWarning, match="without OpenMP .*omp.h.*one thread") as caught:
        assert build.load_native.__wrapped__() is True
    assert len(caught) == 1 and ["-fopenmp" in flags for flags in builds] == [True, False]


def test_without_a_compiler_the_reference_runs_with_one_warning(monkeypatch):
    builds = _fake_builds(monkeypatch, fails_with=["-O3"])
    with pytest.warns(RuntimeWarning, match="unavailable .*PyTorch reference") as caught:
        assert build.load_native.__wrapped__() is False
    assert len(caught) == 1 and len(builds) == 2


@pytest.mark.skipif(
    sys.platform == "darwin" or not torch.backends.openmp.is_available(),
    reason="torch runs without OpenMP here",
)
def test_kernels_build_with_torchs_openmp_so_they_run_on_every_thread():
    """``at::parallel_for`` compiles serial without ``-fopenmp``: the kernels would use one core."""
    assert "-fopenmp" in build._flags() and "-fopenmp" in build._threading_flags()


@st.composite
def conv3x3_arguments(draw, dtype: torch.dtype = torch.float32) -> tuple:
    """Random grouped 3x3 conv arguments: channel slices, both memory formats, planes of 1 to 13."""
    groups = draw(st.integers(1, 4))
    group_inputs, group_outputs = draw(st.integers(1, 9)), draw(st.integers(1, 11))
    extra = draw(st.integers(0, 3))
    batch, height, width = draw(st.integers(1, 3)), draw(st.integers(1, 13)), draw(st.integers(1, 13))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    wide = torch.randn(batch, groups * group_inputs + extra, height, width, generator=generator, dtype=dtype)
    if draw(st.booleans()):
        wide = wide.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(groups * group_outputs, group_inputs, 3, 3, generator=generator, dtype=dtype)
    bias = (
        torch.randn(groups * group_outputs, generator=generator, dtype=dtype) if draw(st.booleans()) else None
    )
    return wide[:, extra:], weight, bias, groups


@settings(max_examples=60, deadline=None)
@given(args=conv3x3_arguments())
def test_native_grouped_conv3x3_equals_reference(native, args):
    assert_op_equals_reference(conv3x3, grouped_conv3x3_reference, args)


@settings(max_examples=10, deadline=None)
@given(args=conv3x3_arguments(torch.float64))
def test_grouped_conv3x3_other_dtypes_take_the_aten_path(native, args):
    torch.testing.assert_close(conv3x3(*args), grouped_conv3x3_reference(*args), atol=1e-12, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(2, 13), st.integers(2, 13)),
    extra=st.integers(0, 3),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_native_avg_pool_equals_reference(native, shape, extra, channels_last, dtype):
    """Odd sizes (floor mode), channel slices, both memory formats; float64 takes the ATen path."""
    batch, channels, height, width = shape
    x = torch.randn(batch, channels + extra, height, width, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x[:, extra:]
    expected = avg_pool2x2_reference(x)
    actual = avg_pool(x)
    assert actual.shape == expected.shape and actual.stride() == expected.stride()
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


@st.composite
def dense_block_arguments(draw) -> tuple:
    """A random block of 1 to 3 layers: channel slices, both memory formats, 1x1 convs with an index
    (groups, kept inputs, bounds, order) or over every input, 3x3 convs of any groups, either kernel."""
    layers = draw(st.integers(1, 3))
    batch, height, width = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    channels, extra = draw(st.integers(1, 10)), draw(st.integers(0, 3))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    wide = torch.randn(batch, channels + extra, height, width, generator=generator)
    if draw(st.booleans()):
        wide = wide.contiguous(memory_format=torch.channels_last)
    columns: list[list] = [[] for _ in range(11)]
    filled = channels
    for _ in range(layers):
        every_input = draw(st.booleans())
        groups1 = 1 if every_input else draw(st.integers(1, 3))
        kept = filled if every_input else draw(st.integers(1, min(filled, 6)))
        groups2 = draw(st.sampled_from([1, 2, 4]))
        outputs1 = groups2 * draw(st.integers(1, 3)) * groups1  # the 3x3's groups divide its inputs
        growth = groups2 * draw(st.integers(1, 3))
        index = None
        if not every_input:
            index = torch.cat([torch.randperm(filled, generator=generator)[:kept] for _ in range(groups1)])
        sides = draw(st.sampled_from([None, "low", "both"]))
        low = torch.randn(groups1 * kept, generator=generator) if sides else None
        high = low + torch.rand(groups1 * kept, generator=generator) + 0.5 if sides == "both" else None
        values = [
            index,
            torch.randn(outputs1, kept, 1, 1, generator=generator) / kept**0.5,  # values stay near 1
            torch.randn(outputs1, generator=generator) if draw(st.booleans()) else None,
            low,
            high,
            torch.randperm(outputs1, generator=generator) if draw(st.booleans()) else None,
            groups1,
            torch.randn(growth, outputs1 // groups2, 3, 3, generator=generator)
            / (9 * outputs1 // groups2) ** 0.5,
            torch.randn(growth, generator=generator) if draw(st.booleans()) else None,
            groups2,
            draw(st.booleans()),
        ]
        for column, value in zip(columns, values):
            column.append(value)
        filled += growth
    return (wide[:, extra:], *columns)


@settings(max_examples=60, deadline=None)
@given(args=dense_block_arguments())
def test_native_dense_block_equals_reference(native, args):
    assert_op_equals_reference(dense_block, dense_block_reference, args)


def test_dense_block_fake_gives_the_kernels_shape_and_strides(native):
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(1, 6, 4, 5)[:, 1:]
    weight1, weight2 = torch.randn(4, 5, 1, 1), torch.randn(2, 2, 3, 3)
    args = (x, [None], [weight1], [None], [None], [None], [None], [1], [weight2], [None], [2], [True])
    real = dense_block(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = dense_block(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert fake.shape == real.shape == (1, 7, 4, 5) and fake.stride() == real.stride()


def test_native_grouped_conv_refuses_other_windows():
    with pytest.raises(ValueError, match="3x3 convs with stride 1, padding 1"):
        NativeGroupedConv2d(8, 4, kernel_size=3, stride=2, padding=1, groups=4)


def test_fake_gives_the_kernels_shape_and_strides(native):
    from torch._subclasses.fake_tensor import FakeTensorMode

    for memory_format in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 10, 3, 5).contiguous(memory_format=memory_format)[:, 2:]
        args = (x, torch.tensor([0, 3, 5, 7]), torch.randn(6, 2, 1, 1), None, None, None, None, 2)
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert fake.shape == real.shape and fake.stride() == real.stride()


def test_bad_index_is_a_clear_error(native):
    x = torch.randn(1, 4, 2, 2).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="index out of range"):
        op(x, torch.tensor([0, 9]), torch.randn(2, 1, 1, 1), None, None, None, None, 2)


def _condensenet() -> CondenseNet:
    torch.manual_seed(0)
    model = CondenseNet((2, 2), (4, 8), num_classes=5, groups=2)
    condense_network(model, groups=2, condense_factor=2, classifier_condense_factor=2)
    return condense_all(perturb_(model)).eval()


def _native_model(masked: CondenseNet) -> CondenseNet:
    """Every condensed 1x1 on the native op, every grouped 3x3 a NativeGroupedConv2d, on planes (NCHW)."""
    fast = lgconv.optimize_for_inference(
        lgconv.finalize(copy.deepcopy(masked)), kernel="native", channels_last=False
    )
    fused = [m for m in fast.modules() if isinstance(m, FusedCondensedConv2d)]
    assert fused and all(m.kernel == "native" for m in fused)
    assert "kernel=native" in repr(fused[0])
    for layer in fast.modules():
        if hasattr(layer, "conv2"):
            layer.conv2 = NativeGroupedConv2d.from_conv(layer.conv2)
    for name, module in list(fast.features.named_children()):
        if isinstance(module, torch.nn.AvgPool2d):
            setattr(fast.features, name, NativeAvgPool2d())
    assert any(isinstance(m, NativeAvgPool2d) for m in fast.modules())
    return fast


def test_every_path_runs_the_native_model(native, tmp_path):
    """Eager, TorchScript, torch.export, torch.compile and ONNX (reference form) equal the masked model."""
    import onnxruntime

    masked = _condensenet()
    fast = _native_model(masked)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.jit.script(fast)(x), expected, atol=1e-5, rtol=1e-5)
        exported = torch.export.export(fast, (x,))
        assert "lgconv.condensed_pointwise" in str(exported.graph)
        assert "lgconv.grouped_conv3x3" in str(exported.graph)
        assert "lgconv.avg_pool2x2" in str(exported.graph)
        torch.testing.assert_close(exported.module()(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.compile(fast)(x), expected, atol=1e-5, rtol=1e-5)
        path = tmp_path / "native.onnx"
        torch.onnx.export(fast, (x,), path, dynamo=False, input_names=["image"])
    session = onnxruntime.InferenceSession(str(path))
    (onnx_output,) = session.run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_output), expected, atol=1e-5, rtol=1e-5)


class _OpsRun(TorchDispatchMode):
    """Records the name of every op that runs under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_native_dense_blocks_run_as_one_op_unless_a_layer_is_hooked(native):
    masked = _condensenet()
    fast = _native_model(masked)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        expected = masked(x)
        with _OpsRun() as run:
            torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
        assert run.names.count("lgconv::dense_block") == 2 and "lgconv::grouped_conv3x3" not in run.names
        assert "served by lgconv::dense_block" in repr(fast.features.denseblock1)
        assert "served by" not in repr(masked)
        seen = []
        fast.features.denseblock1.denselayer2.register_forward_hook(
            lambda *args: seen.append(args[2].shape[1])
        )
        with _OpsRun() as run:
            torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)
    assert run.names.count("lgconv::dense_block") == 1 and run.names.count("lgconv::grouped_conv3x3") == 2
    assert seen == [16]  # the hooked layer ran as a module: its output is its input and new channels


@pytest.mark.parametrize("kernel", ["matmul", "grouped"])
def test_dense_blocks_of_any_1x1_kernel_and_atens_3x3_run_as_one_op(native, kernel):
    """Layers without a gather or with ATen's 3x3 conv are served by the one op too."""
    masked = _condensenet()
    fast = lgconv.optimize_for_inference(lgconv.finalize(copy.deepcopy(masked)), kernel=kernel)
    x = torch.randn(1, 3, 16, 16)
    with torch.inference_mode(), _OpsRun() as run:
        torch.testing.assert_close(fast(x), masked(x), atol=1e-5, rtol=1e-5)
    assert run.names.count("lgconv::dense_block") == 2


_NO_BUILD = """
import torch, lgconv
from lgconv.kernels import load_native, native_loaded
from lgconv.models import CondenseNet
from lgconv.models.condensenet import condense_network
model = CondenseNet((2, 2), (4, 8), num_classes=5, groups=2)
condense_network(model, groups=2, condense_factor=2, classifier_condense_factor=2)
model = lgconv.finalize(model.eval(), allow_partial=True)
model = lgconv.optimize_for_inference(model, kernel="matmul")
with torch.no_grad():
    model(torch.randn(1, 3, 16, 16))
print(native_loaded(), load_native.cache_info().currsize)
"""


def test_serving_without_the_native_kernels_never_starts_their_build():
    """A dense block asks whether the kernels are loaded; a model that does not use them never
    triggers the minute-long build just by running."""
    result = subprocess.run(
        [sys.executable, "-c", _NO_BUILD],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "0"]


def test_count_flops_counts_the_kept_connections(native):
    masked = _condensenet()
    x = torch.randn(2, 3, 16, 16)
    grouped = lgconv.optimize_for_inference(lgconv.finalize(copy.deepcopy(masked)), kernel="grouped")
    report = lgconv.count_flops(_native_model(masked), inputs=x)
    assert report.total == lgconv.count_flops(grouped, inputs=x).total
    assert "lgconv::condensed_pointwise" not in report.unsupported
    assert "lgconv::grouped_conv3x3" not in report.unsupported


_RELOAD = """
import sys, torch, lgconv
from lgconv.kernels import load_native
model = lgconv.load(sys.argv[1]).eval()
x, expected = torch.load(sys.argv[2])
with torch.no_grad():
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
kinds = {m.kernel for m in model.modules() if type(m).__name__ == "FusedCondensedConv2d"}
kinds |= {type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Native")}
print(load_native(), sorted(kinds))
"""


@pytest.mark.parametrize("disabled", [False, True])
def test_saved_native_model_runs_in_a_fresh_process(native, tmp_path, disabled):
    """A file with native layers loads and runs anywhere; with the kernel off, through the reference."""
    fast = _native_model(_condensenet())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.save((x, fast(x)), tmp_path / "io.pt")
    arch_kwargs = {"stages": [2, 2], "growth": [4, 8], "num_classes": 5, "groups": 2}
    lgconv.save(
        fast, tmp_path / "native.safetensors", arch="lgconv.models:CondenseNet", arch_kwargs=arch_kwargs
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if disabled:
        env[DISABLE_VARIABLE] = "0"
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(tmp_path / "native.safetensors"), str(tmp_path / "io.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(not disabled),
        "['NativeAvgPool2d',",
        "'NativeGroupedConv2d',",
        "'native']",
    ]


def test_inspect_shows_the_native_kernel(native, tmp_path):
    from click.testing import CliRunner

    from lgconv.cli import main

    arch_kwargs = {"stages": [2, 2], "growth": [4, 8], "num_classes": 5, "groups": 2}
    path = tmp_path / "native.safetensors"
    lgconv.save(
        _native_model(_condensenet()), path, arch="lgconv.models:CondenseNet", arch_kwargs=arch_kwargs
    )
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "FusedCondensedConv2d[native]" in result.output


def test_export_onnx_tries_the_native_layers_plain_forms(native, tmp_path):
    """export_onnx reads native 1x1 layers as grouped and native 3x3 convs as plain convs."""
    masked = _condensenet()
    x = torch.randn(1, 3, 16, 16)
    report = lgconv.export_onnx(_native_model(masked), tmp_path / "native.onnx", x, repeats=1)
    assert report.max_error < 1e-4
    layers = {choice.name: choice for choice in report.layers}
    assert set(layers["features.denseblock1.denselayer1.conv2"].candidates_ms) == {"grouped", "dense"}


def test_a_native_layer_reads_its_tensors_fresh_after_they_change(native):
    """The native layer binds its argument dicts once; new weights or a new dtype still take effect."""
    torch.manual_seed(0)
    layer = FusedCondensedConv2d(8, 8, kernel="native", groups=2, gathered=8).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        layer(x)  # binds
        layer.conv.weight = torch.nn.Parameter(torch.randn_like(layer.conv.weight))
        layer.conv.bias.fill_(0.5)
        expected = condensed_pointwise_reference(
            x, layer.index, layer.conv.weight, layer.conv.bias, None, None, None, 2
        )
        torch.testing.assert_close(layer(x), expected)
        wide = layer.double()(x.double())
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide, expected.double(), rtol=1e-5, atol=1e-5)
