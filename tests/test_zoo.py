"""Zoo models through the whole lifecycle: condensify, train with the scheduler, finalize, count, save.

Each model is built with random weights, condensified with groups = condense_factor = 4, trained a
few SGD steps while the scheduler runs to its end (several stages due in one step), then finalized.
The finalized model must equal the masked one in eval mode, every parameter must have received a
gradient, and the FLOPs must drop by exactly what the plan predicts from the condensed layers'
shapes. The default run covers a short list of small models; ``pytest -m slow`` the longer list.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from zoo_lifecycle import (
    EXPECTED_STAGES,
    GROUPS,
    assert_finalized_as_planned,
    build,
    input_batch,
    run_lifecycle,
)

import lgconv

FAST = [
    ("timm", "test_resnet", {}),
    ("timm", "test_efficientnet", {}),
    ("timm", "test_byobnet", {}),
    ("timm", "test_convnext", {"conv_mlp": True}),
    ("timm", "densenet121", {}),
    ("timm", "mobilenetv3_small_050", {}),
    ("timm", "regnetx_002", {}),
    ("torchvision", "resnet18", {}),
    ("torchvision", "squeezenet1_1", {}),
    ("torchvision", "shufflenet_v2_x0_5", {}),
]
SLOW = [
    ("timm", "test_efficientnet_gn", {}),
    ("timm", "test_efficientnet_ln", {}),
    ("timm", "test_efficientnet_evos", {}),
    ("timm", "test_coatnet", {}),
    ("timm", "test_maxvit", {}),
    ("timm", "resnet26", {}),
    ("timm", "resnext26ts", {}),
    ("timm", "regnety_002", {}),
    ("timm", "efficientnet_b0", {}),
    ("timm", "mobilenetv2_035", {}),
    ("timm", "mixnet_s", {}),
    ("timm", "cs3darknet_focus_s", {}),
    ("timm", "dla46_c", {}),
    ("timm", "hrnet_w18_small", {}),
    ("timm", "ese_vovnet19b_slim", {}),
    ("timm", "convnext_atto", {"conv_mlp": True}),
    ("timm", "ghostnet_050", {}),
    ("timm", "lcnet_035", {}),
    ("timm", "rexnet_100", {}),
    ("torchvision", "resnet50", {}),
    ("torchvision", "resnext50_32x4d", {}),
    ("torchvision", "densenet121", {}),
    ("torchvision", "mobilenet_v2", {}),
    ("torchvision", "mobilenet_v3_small", {}),
    ("torchvision", "mnasnet0_5", {}),
    ("torchvision", "regnet_x_400mf", {}),
    ("torchvision", "regnet_y_400mf", {}),
    ("torchvision", "efficientnet_b0", {}),
    ("torchvision", "googlenet", {}),
]


def cases(entries: list[tuple[str, str, dict[str, Any]]]) -> list[Any]:
    return [pytest.param(s, n, k, id=f"{s}:{n}") for s, n, k in entries]


def check_model(source: str, name: str, kwargs: dict[str, Any], tmp_path: Any) -> None:
    model = build(source, name, kwargs)
    x = input_batch(model)
    result = run_lifecycle(model, x)

    assert result["condensed"] == len(result["eligible"]) >= 1
    assert result["missing_grads"] == [], f"parameters without a gradient: {result['missing_grads'][:5]}"
    assert result["stages"] == [[s] for s in EXPECTED_STAGES]
    assert result["lasso_after"] == 0.0
    assert_finalized_as_planned(result, x, lgconv.CondensedConv2d)
    final = result["model"]

    path = tmp_path / f"{name}.lgconv"
    # timm models name their architecture themselves, but not the keyword arguments they were
    # built with; torchvision models name neither.
    arch = f"torchvision.models:{name}" if source == "torchvision" else None
    lgconv.save(final, path, arch=arch, arch_kwargs=kwargs)
    loaded = lgconv.load(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result["finalized"], rtol=0, atol=0)


@pytest.mark.parametrize(("source", "name", "kwargs"), cases(FAST))
def test_zoo_model_condenses_exactly(source: str, name: str, kwargs: dict[str, Any], tmp_path: Any) -> None:
    check_model(source, name, kwargs, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("source", "name", "kwargs"), cases(SLOW))
def test_zoo_model_condenses_exactly_slow(
    source: str, name: str, kwargs: dict[str, Any], tmp_path: Any
) -> None:
    check_model(source, name, kwargs, tmp_path)


@pytest.mark.parametrize("name", ["test_vit", "test_convnext"])
def test_model_without_eligible_conv_is_refused_with_reasons(name: str) -> None:
    """ViT blocks and ConvNeXt's default MLP are Linear layers: no 1x1 conv, so nothing to condense."""
    model = build("timm", name, {})
    decisions = lgconv.plan(model, GROUPS)
    assert decisions.eligible == []
    assert any("linear=True" in d.reason for d in decisions.skipped)
    with pytest.raises(ValueError, match="no eligible layer"):
        lgconv.condensify(model, GROUPS)


def test_exactness_check_detects_a_wrong_gather() -> None:
    """The exactness check above can fail: a finalized layer gathering the wrong inputs differs."""
    model = build("timm", "test_resnet", {})
    x = torch.randn(2, 3, 64, 64)
    result = run_lifecycle(model, x)
    final = result["model"]
    layer = next(m for m in final.modules() if isinstance(m, lgconv.CondensedConv2d))
    layer.index.copy_(layer.index.flip(0))
    with torch.no_grad():
        corrupted = final(x)
    assert not torch.allclose(corrupted, result["masked"], rtol=1e-5, atol=1e-5)


@pytest.fixture
def sweep(monkeypatch: pytest.MonkeyPatch) -> Any:
    """benchmarks/zoo_sweep.py imported as a module (benchmarks/ is not a package)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "zoo_sweep.py"
    spec = importlib.util.spec_from_file_location("zoo_sweep", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "zoo_sweep", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_zoo_sweep_smoke_mode_writes_the_coverage_page(sweep: Any, tmp_path: Path) -> None:
    """``benchmarks/zoo_sweep.py --smoke`` checks a few tiny models and writes the page and its JSON."""
    out, cache = tmp_path / "coverage.md", tmp_path / "cache.jsonl"
    arguments = ["--smoke", "--out", str(out), "--cache", str(cache)]
    result = CliRunner().invoke(sweep.main, arguments)
    assert result.exit_code == 0, result.output
    records = {r["model"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert set(records) == set(sweep.SMOKE_MODELS)
    assert records["timm:test_resnet"]["status"] == "pass"
    assert records["timm:test_vit"]["status"] == "no eligible layer"
    page = out.read_text()
    assert "| timm:test_resnet |" in page
    assert "| all | 7 | 6 | 0 | 1 | 0 | 0 | 6/6 (100.0%) |" in page
    assert records["timm-features:test_resnet"]["outputs"] > 1  # a list of feature maps, all compared
    assert records["torchvision-video:r3d_18"]["dims"] == [3]  # its 1x1x1 Conv3d layers were condensed
    assert records["torchvision-video:r3d_18"]["input"] == "4x64x64"
    # A second run resumes from the cache: nothing is surveyed or checked again.
    before = cache.read_text()
    again = CliRunner().invoke(sweep.main, arguments)
    assert again.exit_code == 0 and cache.read_text() == before


def test_zoo_sweep_linear_mode_condenses_a_vit(sweep: Any, tmp_path: Path) -> None:
    """With ``--linear`` a ViT's Linear layers are condensed and checked like convs."""
    out = tmp_path / "coverage.md"
    result = CliRunner().invoke(sweep.main, ["--linear", "--models", "timm:test_vit3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(out.with_suffix(".json").read_text())
    assert record["status"] == "pass" and record["condensed"] == record["eligible"] > 0
    assert record["flop_reduction"] > 1.5


NEW_FAMILIES = [
    "torchvision-detection:fasterrcnn_mobilenet_v3_large_320_fpn",
    "torchvision-optical_flow:raft_small",
    pytest.param("torchvision-detection:retinanet_resnet50_fpn", marks=pytest.mark.slow),
    pytest.param("torchvision-detection:maskrcnn_resnet50_fpn", marks=pytest.mark.slow),
    pytest.param("torchvision-segmentation:deeplabv3_mobilenet_v3_large", marks=pytest.mark.slow),
    pytest.param("torchvision-video:mc3_18", marks=pytest.mark.slow),
    pytest.param("timm-features:resnet10t", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("key", NEW_FAMILIES)
def test_sweep_checks_detection_flow_video_and_feature_models_in_full(sweep: Any, key: str) -> None:
    """Detectors trained with targets (their loss path) then compared in eval, RAFT's list of flows,
    feature lists: every output tensor equal after finalize, FLOPs dropping as planned."""
    record = sweep.check(key, sweep.Settings(groups=4, input_size=64, max_params=100e6, timeout=0, rtol=1e-4))
    assert record["status"] == "pass", record.get("reason")
    assert record["condensed"] == record["eligible"] > 0
    assert record["output_values"] > 0 and record["flop_reduction"] > 1.0
    if key.startswith(("torchvision-detection", "torchvision-optical_flow", "timm-features")):
        assert record["outputs"] > 1  # detections per image, RAFT's flow per update, feature maps
