"""Smoke on real zoo models: condensify, a training step and a jump to the end, finalize, same outputs."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from helpers import assert_finalize_exact
from torch import nn

import lgconv
from lgconv import CondensedConv2d, CondensedLinear

MODELS = {
    "timm/resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    "timm/resnet26": lambda: timm.create_model("resnet26", num_classes=10),
    "timm/test_resnet": lambda: timm.create_model("test_resnet", num_classes=10),
    "timm/densenet121": lambda: timm.create_model("densenet121", num_classes=10),
    "timm/test_efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=10),
    "torchvision/resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "torchvision/mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
}


def settle_batch_norm(model: nn.Module, x: torch.Tensor) -> None:
    """A few train-mode passes so running statistics are not the identity."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_condensify_train_jump_finalize(name):
    model = MODELS[name]()
    x = torch.randn(2, 3, 64, 64)
    settle_batch_norm(model, x)
    model.eval()
    with torch.no_grad():
        dense = model(x)
    params_before = sum(p.numel() for p in model.parameters())

    model = lgconv.condensify(model, groups=4, condense_factor=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense)  # nothing dropped yet: the same network

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    scheduler = lgconv.CondensationScheduler(model, total_steps=4, lasso=1e-5)
    model.train()
    for step in range(2):  # step 1: stage 1 of 3; step 2 reaches progress 0.5 and jumps to the end
        loss = model(x).logsumexp(1).mean() + scheduler.lasso_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        assert {int(m.stage) for _, m in scheduler.layers} == ({1} if step == 0 else {3})

    final = assert_finalize_exact(model, x, atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, CondensedConv2d) for m in final.modules())
    assert sum(p.numel() for p in final.parameters()) < params_before


def test_vit_linear_layers_condense_exactly_with_linear_true():
    model = timm.create_model("test_vit", num_classes=10).eval()
    x = torch.randn(2, 3, *model.default_cfg["input_size"][1:])
    model = lgconv.condensify(model, groups=4, condense_factor=2, linear=True)
    scheduler = lgconv.CondensationScheduler(model, total_steps=2)
    scheduler.step()
    final = assert_finalize_exact(model, x, atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, CondensedLinear) for m in final.modules())


def test_timm_nfnet_std_convs_are_skipped_with_their_reason():
    model = timm.create_model("test_nfnet", num_classes=10)
    table = lgconv.plan(model).table()
    assert "ScaledStdConv2d is a Conv2d subclass with its own forward" in table
