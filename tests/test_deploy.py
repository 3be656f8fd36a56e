"""Finalized models go where users deploy them: TorchScript, torch.export, ONNX, torch.compile.

Each path's output is compared with the finalized model's eager output on a batch size other than
the one the model was traced or exported with, so the gather and grouped layers stay batch-generic.
The default run covers four representative models (conv and linear, both layouts); ``-m slow`` the
zoo test's whole default list and the inductor backend.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import pytest
import torch
from timm.models.mlp_mixer import MlpMixer
from torch import Tensor, nn
from zoo_lifecycle import build, input_batch, run_lifecycle

import lgconv

Case = tuple[Callable[[], nn.Module], dict[str, Any]]

CASES: dict[str, Case] = {
    "timm:test_resnet-interleaved": (lambda: build("timm", "test_resnet", {}), {"layout": "interleaved"}),
    "timm:test_efficientnet": (lambda: build("timm", "test_efficientnet", {}), {}),
    "torchvision:squeezenet1_1": (lambda: build("torchvision", "squeezenet1_1", {}), {}),
    "mixer-linear-interleaved": (
        lambda: MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, embed_dim=64),
        {"linear": True, "include": ["*mlp_*.fc*"], "layout": "interleaved"},
    ),
}
SLOW_CASES: dict[str, Case] = {
    "timm:test_byobnet": (lambda: build("timm", "test_byobnet", {}), {}),
    "timm:test_convnext-conv_mlp": (lambda: build("timm", "test_convnext", {"conv_mlp": True}), {}),
    "timm:densenet121": (lambda: build("timm", "densenet121", {}), {}),
    "timm:mobilenetv3_small_050": (lambda: build("timm", "mobilenetv3_small_050", {}), {}),
    "timm:regnetx_002": (lambda: build("timm", "regnetx_002", {}), {}),
    "torchvision:resnet18": (lambda: build("torchvision", "resnet18", {}), {}),
    "torchvision:shufflenet_v2_x0_5": (lambda: build("torchvision", "shufflenet_v2_x0_5", {}), {}),
}
EVERY_CASE = {**CASES, **SLOW_CASES}


def cases(fast: Any) -> list[Any]:
    """Every case as a pytest parameter, those not in ``fast`` marked slow."""
    return [pytest.param(n, id=n, marks=() if n in fast else (pytest.mark.slow,)) for n in EVERY_CASE]


ALL = cases(CASES)
# The dynamo exporter takes seconds per model: two cases by default, conv and linear.
DYNAMO = cases(("timm:test_resnet-interleaved", "mixer-linear-interleaved"))


@pytest.fixture(scope="module")
def finalized() -> Callable[[str], tuple[nn.Module, Tensor]]:
    """Build, train and finalize each case once per module: (finalized model in eval, test batch)."""
    cache: dict[str, tuple[nn.Module, Tensor]] = {}

    def get(name: str) -> tuple[nn.Module, Tensor]:
        if name not in cache:
            torch.manual_seed(0)
            factory, options = EVERY_CASE[name]
            model = factory()
            result = run_lifecycle(model, input_batch(model), **options)
            assert any(
                isinstance(m, (lgconv.CondensedConv2d, lgconv.CondensedLinear))
                for m in result["model"].modules()
            )
            cache[name] = (result["model"].eval(), input_batch(model)[:1])
        return cache[name]

    return get


def other_batch(x: Tensor) -> Tensor:
    """Three fresh images of the same size: a batch size the program was not built with."""
    return torch.randn(3, *x.shape[1:])


def assert_same(actual: Any, expected: Tensor) -> None:
    actual = torch.as_tensor(actual)
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def eager(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", ALL)
def test_torchscript_trace_saves_loads_and_matches(name: str, finalized: Any) -> None:
    model, x = finalized(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of export
        traced = torch.jit.trace(model, x)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    y = other_batch(x)
    assert_same(eager(loaded, y), eager(model, y))


@pytest.mark.parametrize("name", ALL)
def test_torch_export_with_dynamic_batch_saves_loads_and_matches(
    name: str, finalized: Any, tmp_path: Path
) -> None:
    model, x = finalized(name)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x.expand(2, -1, -1, -1).clone(),), dynamic_shapes=({0: batch},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    y = other_batch(x)
    assert_same(eager(loaded.module(), y), eager(model, y))


def _onnx_outputs(model: nn.Module, x: Tensor, y: Tensor, path: Path, dynamo: bool) -> np.ndarray:
    """Export ``model`` on ``x`` with a dynamic batch axis, run ``y`` through onnxruntime."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=64)
            torch.onnx.export(
                model, (x,), path, dynamo=True, input_names=["image"], dynamic_shapes=({0: batch},)
            )
        else:
            torch.onnx.export(
                model, (x,), path, dynamo=False, input_names=["image"], dynamic_axes={"image": {0: "batch"}}
            )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: y.numpy()})[0]


@pytest.mark.parametrize("name", ALL)
def test_onnx_torchscript_exporter_matches_onnxruntime(name: str, finalized: Any, tmp_path: Path) -> None:
    model, x = finalized(name)
    y = other_batch(x)
    assert_same(_onnx_outputs(model, x, y, tmp_path / "model.onnx", dynamo=False), eager(model, y))


@pytest.mark.parametrize("name", DYNAMO)
def test_onnx_dynamo_exporter_matches_onnxruntime(name: str, finalized: Any, tmp_path: Path) -> None:
    model, x = finalized(name)
    y = other_batch(x)
    assert_same(
        _onnx_outputs(model, x.expand(2, -1, -1, -1).clone(), y, tmp_path / "model.onnx", dynamo=True),
        eager(model, y),
    )


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("name", ALL)
def test_torch_compile_matches_eager(name: str, backend: str, finalized: Any) -> None:
    model, x = finalized(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    assert_same(eager(compiled, x), eager(model, x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm:test_resnet-interleaved", "mixer-linear-interleaved"])
def test_torch_compile_inductor_matches_eager(name: str, finalized: Any) -> None:
    model, x = finalized(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor")
    assert_same(eager(compiled, x), eager(model, x))


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_torchscript_script_compiles_the_condensed_layers(kind: str, layout: str) -> None:
    """``torch.jit.script`` (not only trace) accepts both inference layers, the optional order buffer too."""
    dense = nn.Conv2d(16, 8, 1) if kind == "conv" else nn.Linear(16, 8)
    model = lgconv.condensify(nn.Sequential(dense), 4, linear=True, layout=layout)
    for module in model.modules():
        while hasattr(module, "fully_condensed") and not module.fully_condensed:
            module.condense()
    final = lgconv.finalize(model).eval()
    scripted = torch.jit.script(final)
    x = torch.randn(3, 16, 5, 5) if kind == "conv" else torch.randn(3, 7, 16)
    assert_same(eager(scripted, x), eager(final, x))
