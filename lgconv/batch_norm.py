"""Batch-norm re-estimation: running statistics recomputed from data after the network changed.

A condensing drop removes a quarter of a layer's inputs at once, so the running means and variances
the batch-norm layers after it collected no longer describe their inputs: in eval mode the network
falls to chance until training refreshes them. Re-estimating them on a few training batches right
after the drop (as SWA does after averaging) gives back an evaluable network without any training.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def recalibrate_batch_norm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Recompute every batch-norm layer's running statistics as the plain average over ``batches``.

    ``batches`` yields input tensors (already normalized, on the model's device). Only the
    statistics change: no gradient, no weight update, and each layer's momentum and the train/eval
    mode of every module are restored. Returns the number of batches used.

    Raises ``ValueError`` when ``model`` has no batch-norm layer or ``batches`` is empty.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m for m in norms if m.track_running_stats]
    if not tracked:
        raise ValueError(
            f"{type(model).__name__} has no batch-norm layer with running statistics to recalibrate"
        )
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:  # checked before any statistic is reset
        raise ValueError("recalibrate_batch_norm got no batches; pass at least one input tensor")
    modes = {module: module.training for module in model.modules()}
    momenta = {norm: norm.momentum for norm in tracked}
    used = 0
    try:
        for norm in tracked:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average: every batch weighs the same
        model.train()
        with torch.no_grad():
            for batch in itertools.chain([first], iterator):
                model(batch)
                used += 1
    finally:
        for norm, momentum in momenta.items():
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    return used
