"""The lifecycle a user runs on a zoo model, shared by the zoo, linear and deployment tests.

condensify -> train a few SGD steps while the scheduler runs to its end -> finalize, recording what
the tests check: stages after each step, parameters without a gradient, masked and finalized
outputs, and the FLOPs before, after and as the plan predicts them from the layers' shapes.
"""

from __future__ import annotations

import warnings
from typing import Any

import timm
import torch
import torchvision
from helpers import perturb_
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import lgconv
from lgconv.layers.learned_group import LearnedGroupMixin

GROUPS = 4
TOTAL_STEPS = 4
# Stages due after each of the 4 steps with C = 4 and condense_end = 0.5: stage k is due once
# step / 4 >= k / 3 * 0.5, so steps 1 and 2 bring stages 1 and 3 (two stages in one step).
EXPECTED_STAGES = [1, 3, 3, 3]


def build(source: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A randomly initialised zoo model (no weights are downloaded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "timm":
            return timm.create_model(name, pretrained=False, **kwargs)
        return torchvision.models.get_model(name, weights=None, **kwargs)


def training_loss(output: Any) -> Tensor:
    """A loss reaching every output head, auxiliary ones too (GoogLeNet returns three in training)."""
    outputs = [output] if isinstance(output, Tensor) else [o for o in output if isinstance(o, Tensor)]
    return sum(o.square().mean() for o in outputs)


def input_batch(model: nn.Module, size: int = 64) -> Tensor:
    """Two random images of ``size``, or of the size a timm model is fixed to."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size"):
        size = int(cfg["input_size"][-1])
    return torch.randn(2, 3, size, size)


def torch_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs (2 per multiply-add) of one eval forward."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(x)
    return counter.get_total_flops()


def planned_drop(model: nn.Module, names: list[str], x: Tensor, factor: int = GROUPS) -> int:
    """FLOPs the plan removes: each named layer keeps 1/C of its multiply-adds, from its output size."""
    modules = dict(model.named_modules())
    removed = []

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
        macs = module.weight.numel() * (output.numel() // module.weight.shape[0])
        removed.append(2 * (macs - macs // factor))

    handles = [modules[name].register_forward_hook(hook) for name in names]
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    return sum(removed)


def run_lifecycle(model: nn.Module, x: Tensor, **options: Any) -> dict[str, Any]:
    """Condensify (``options`` go to condensify), train TOTAL_STEPS steps with the scheduler, finalize.

    Parameters and buffers are redrawn first: zero-init or layer-scaled branches would otherwise
    contribute next to nothing to the output and hide a wrong finalized layer.
    """
    perturb_(model)
    eligible = [d.name for d in lgconv.plan(model, GROUPS, **options).eligible]
    dense_flops = torch_flops(model, x[:1])
    removed = planned_drop(model, eligible, x[:1])

    model = lgconv.condensify(model, GROUPS, **options)
    layers = [m for m in model.modules() if isinstance(m, LearnedGroupMixin)]
    scheduler = lgconv.CondensationScheduler(model, TOTAL_STEPS, lasso=1e-4)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    stages, missing_grads = [], None
    for _ in range(TOTAL_STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = training_loss(model(x)) + scheduler.lasso_loss()
        loss.backward()
        if missing_grads is None:
            missing_grads = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        stages.append(sorted({int(layer.stage) for layer in layers}))

    model.eval()
    with torch.no_grad():
        masked = model(x)
        final = lgconv.finalize(model).eval()
        finalized = final(x)
    return {
        "eligible": eligible,
        "condensed": len(layers),
        "stages": stages,
        "missing_grads": missing_grads,
        "lasso_after": float(scheduler.lasso_loss()),
        "masked": masked,
        "finalized": finalized,
        "model": final,
        "dense_flops": dense_flops,
        "final_flops": torch_flops(final, x[:1]),
        "planned_drop": removed,
    }


def assert_finalized_as_planned(result: dict[str, Any], x: Tensor, condensed_type: type) -> None:
    """The finalized model holds only ``condensed_type`` layers, equals the masked model, and both
    torch's counter and lgconv's (multiply-adds) see exactly the planned FLOP drop."""
    final = result["model"]
    assert not any(isinstance(m, LearnedGroupMixin) for m in final.modules())
    assert sum(isinstance(m, condensed_type) for m in final.modules()) == result["condensed"]
    scale = max(float(result["masked"].abs().max()), 1.0)
    torch.testing.assert_close(result["finalized"], result["masked"], rtol=1e-5, atol=1e-5 * scale)
    assert result["dense_flops"] - result["final_flops"] == result["planned_drop"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # operators without a FLOP rule (activations) are summarised
        report = lgconv.count_flops(final, inputs=x[:1])
    assert 2 * (report.dense_total - report.total) == result["planned_drop"]
