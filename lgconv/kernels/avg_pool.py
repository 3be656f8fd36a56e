"""The ``lgconv::avg_pool2x2`` op: 2x2 average pooling, stride 2, on pixel planes.

ATen's ``avg_pool2d`` is several times slower on NCHW tensors than on channels-last ones, and
CondenseNet's transitions pool whole block outputs. The native CPU kernel (``avg_pool2x2.cpp``) runs
float32 planes; everything else, and builds without the kernel, run the reference below.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

from lgconv.kernels.pointwise import empty_output, output_format

AVG_POOL_OP = "lgconv::avg_pool2x2"


def avg_pool2x2_reference(input: Tensor) -> Tensor:
    """What the op computes: ``avg_pool2d(input, 2)`` (stride 2, no padding, floor mode)."""
    return functional.avg_pool2d(input, 2).contiguous(memory_format=output_format(input))


def _fake(input: Tensor) -> Tensor:
    batch, channels, height, width = input.shape
    return empty_output(input, (batch, channels, height // 2, width // 2))


torch.library.define(AVG_POOL_OP, "(Tensor input) -> Tensor")
torch.library.impl(AVG_POOL_OP, "CompositeExplicitAutograd", avg_pool2x2_reference)
torch.library.register_fake(AVG_POOL_OP, _fake)
