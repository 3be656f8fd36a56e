"""The model families the zoo sweep checks: how each is listed, built, fed, trained and compared.

A model is named ``family:name``. Classification models take an image batch; timm ``features_only``
backbones return a list of feature maps; torchvision detection models take a list of images (and
targets in training, where they return their losses); segmentation models return a dict; video
models take clips (N, 3, T, H, W); optical-flow models take two images and return a list of flows.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

COVERAGE_JSON = Path(__file__).resolve().parent.parent / "docs" / "coverage.json"


@dataclass(frozen=True)
class Inputs:
    """What one forward gets: ``eval_args`` for eval, ``train_args`` in training (detection: targets)."""

    eval_args: tuple[Any, ...]
    train_args: tuple[Any, ...]
    size: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def call(self, model: nn.Module, train: bool) -> Any:
        return model(*(self.train_args if train else self.eval_args), **dict(self.kwargs))


@dataclass(frozen=True)
class Family:
    """One zoo family: its model names, a builder, the inputs to try (smallest first) and, for
    detectors, the head modules whose outputs their post-processing (top-k, NMS) selects from."""

    name: str
    names: Callable[[], list[str]]
    build: Callable[[str], nn.Module]
    inputs: Callable[[str, nn.Module, int], Iterator[Inputs]]
    heads: Callable[[nn.Module], list[nn.Module]] | None = None


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _images(count: int, size: int) -> Tensor:
    return torch.randn(count, 3, size, size, generator=_generator())


def _square_sizes(model: nn.Module, preferred: int, extra: tuple[int, ...]) -> list[int]:
    sizes = [preferred, *extra]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    for field in ("min_input_size", "input_size", "test_input_size"):
        if cfg.get(field):
            sizes.append(int(cfg[field][-1]))
    return sorted({s for s in sizes if s >= preferred})


def _image_inputs(extra: tuple[int, ...]) -> Callable[[str, nn.Module, int], Iterator[Inputs]]:
    def inputs(name: str, model: nn.Module, preferred: int) -> Iterator[Inputs]:
        for size in _square_sizes(model, preferred, extra):
            x = _images(2, size)
            yield Inputs((x,), (x,), f"{size}x{size}")

    return inputs


# timm: classification models, and features_only backbones (one per timm module)


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


def _timm_build(name: str, **kwargs: Any) -> nn.Module:
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(name, pretrained=False, **kwargs)


def _timm_feature_names() -> list[str]:
    """Per timm module, its smallest model that passed the classification sweep (from coverage.json),
    so every architecture family is checked as a backbone at the cost of its smallest member; where
    that is one of timm's ``test_*`` models, the smallest real one too."""
    import timm

    records = {}
    if COVERAGE_JSON.exists():
        records = {r["model"]: r for r in json.loads(COVERAGE_JSON.read_text())}
    names = []
    for module in timm.list_modules():
        members = [
            n for n in timm.list_models(module=module) if records.get(f"timm:{n}", {}).get("status") == "pass"
        ]
        real = [n for n in members if not n.startswith("test_")]
        for group in {tuple(members), tuple(real)}:
            if group:
                names.append(min(group, key=lambda n: (records[f"timm:{n}"].get("params", 0), n)))
    return sorted(set(names))


# torchvision


def _tv_names(module_name: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        import torchvision

        module = torchvision.models if not module_name else getattr(torchvision.models, module_name)
        return list(torchvision.models.list_models(module=module))

    return names


def _tv_build(name: str, **kwargs: Any) -> nn.Module:
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None, **kwargs)


DETECTION_SIZE = 128


def _detection_build(name: str) -> nn.Module:
    """Detection models at a small fixed image size (their transform resizes every image to it),
    keeping up to 20 detections per image whatever their score, so eval outputs are never empty."""
    if name.startswith("ssd"):  # SSD models have their own fixed size
        return _tv_build(name, weights_backbone=None, score_thresh=0.0, detections_per_img=20)
    if "rcnn" in name:
        keep = {"box_score_thresh": 0.0, "box_detections_per_img": 20}
    else:
        keep = {"score_thresh": 0.0, "detections_per_img": 20}
    return _tv_build(name, weights_backbone=None, min_size=DETECTION_SIZE, max_size=DETECTION_SIZE, **keep)


def _detection_targets(name: str, size: int) -> list[dict[str, Tensor]]:
    """Two boxes per image, with masks (Mask R-CNN) and 17 keypoints (Keypoint R-CNN) inside them."""
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.3, 0.2, 0.9, 0.8]]) * size
    targets = []
    for _ in range(2):
        labels = torch.tensor([1, 1] if name.startswith("keypointrcnn") else [1, 2])  # person only
        target = {"boxes": boxes.clone(), "labels": labels}
        if name.startswith("maskrcnn"):
            masks = torch.zeros(2, size, size, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[k, y0:y1, x0:x1] = 1
            target["masks"] = masks
        if name.startswith("keypointrcnn"):
            points = torch.rand(2, 17, 2, generator=_generator())
            low, high = boxes[:, None, :2], boxes[:, None, 2:]
            target["keypoints"] = torch.cat([low + points * (high - low), torch.ones(2, 17, 1)], -1)
        targets.append(target)
    return targets


def _detection_inputs(name: str, model: nn.Module, preferred: int) -> Iterator[Inputs]:
    size = max(preferred, DETECTION_SIZE)
    images = list(_images(2, size))
    yield Inputs((images,), (images, _detection_targets(name, size)), f"2 images {size}x{size}")


def _detection_heads(model: nn.Module) -> list[nn.Module]:
    """The prediction heads of a torchvision detector (everything its post-processing ranks)."""
    names = ("head", "rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor")
    names += ("roi_heads.keypoint_predictor",)
    modules = dict(model.named_modules())
    return [modules[n] for n in names if modules.get(n) is not None]


def _video_inputs(name: str, model: nn.Module, preferred: int) -> Iterator[Inputs]:
    for frames, size in ((4, preferred), (8, 112), (16, 224)):
        clip = torch.randn(2, 3, frames, size, size, generator=_generator())
        yield Inputs((clip,), (clip,), f"{frames}x{size}x{size}")


def _flow_inputs(name: str, model: nn.Module, preferred: int) -> Iterator[Inputs]:
    size = max(preferred, 128)  # RAFT's correlation pyramid needs images of at least 128
    first, second = _images(2, size), _images(2, size).roll(3, dims=-1)
    yield Inputs((first, second), (first, second), f"2x {size}x{size}", (("num_flow_updates", 2),))


FAMILIES = {
    family.name: family
    for family in (
        Family("timm", _timm_names, _timm_build, _image_inputs(())),
        Family(
            "timm-features",
            _timm_feature_names,
            lambda name: _timm_build(name, features_only=True),
            _image_inputs(()),
        ),
        Family("torchvision", _tv_names(""), _tv_build, _image_inputs((224, 299))),
        Family("torchvision-quantization", _tv_names("quantization"), _tv_build, _image_inputs((224, 299))),
        Family(
            "torchvision-detection",
            _tv_names("detection"),
            _detection_build,
            _detection_inputs,
            _detection_heads,
        ),
        Family(
            "torchvision-segmentation",
            _tv_names("segmentation"),
            lambda name: _tv_build(name, weights_backbone=None),
            _image_inputs((224,)),
        ),
        Family("torchvision-video", _tv_names("video"), _tv_build, _video_inputs),
        Family("torchvision-optical_flow", _tv_names("optical_flow"), _tv_build, _flow_inputs),
    )
}


def tensors(output: Any) -> list[Tensor]:
    """Every tensor of a model output, in order: dict values (in key order), list and tuple items."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in tensors(item)]
    return []


def training_loss(output: Any) -> Tensor:
    """A loss reaching every output: a detector's losses summed, other outputs' mean squares."""
    parts = [t.float() for t in tensors(output) if t.is_floating_point()]
    if isinstance(output, dict) and all(k.startswith("loss") for k in output):
        return sum(parts)
    return sum(t.square().mean() for t in parts)


def output_error(masked: Any, final: Any) -> float:
    """Largest difference over all output tensors, each relative to its own largest magnitude;
    inf when the outputs differ in structure, shape or an integer tensor (labels)."""
    expected, actual = tensors(masked), tensors(final)
    if len(expected) != len(actual) or not expected:
        return float("inf")
    worst = 0.0
    for e, a in zip(expected, actual):
        if e.shape != a.shape or e.dtype != a.dtype:
            return float("inf")
        if not e.is_floating_point():
            if not torch.equal(e, a):
                return float("inf")
            continue
        if e.numel() == 0:
            continue
        scale = max(float(e.abs().max()), torch.finfo(torch.float32).tiny)
        worst = max(worst, float((a.float() - e.float()).abs().max()) / scale)
    return worst


def same_scores(masked: Any, final: Any, rtol: float) -> bool:
    """Whether two detectors' outputs hold the same detection scores per image (as sorted lists),
    i.e. they differ only in which of several equally scored candidates the top-k kept."""
    if not isinstance(masked, list) or len(masked) != len(final):
        return False
    for expected, actual in zip(masked, final):
        e, a = expected["scores"].sort().values, actual["scores"].sort().values
        if e.shape != a.shape or not torch.allclose(
            a, e, rtol=rtol, atol=rtol * (float(e.abs().max()) if e.numel() else 0.0)
        ):
            return False
    return True
