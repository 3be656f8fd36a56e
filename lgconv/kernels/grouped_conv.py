"""The ``lgconv::grouped_conv3x3`` op: a grouped 3x3 conv, stride 1, padding 1, on pixel planes.

CondenseNet's dense layers end in a 3x3 conv of 4 groups with few channels each, which oneDNN
computes slowly on NCHW tensors. The native CPU kernel (``grouped_conv3x3.cpp``) runs it on float32
planes; other inputs, devices and builds without the kernel run the reference below (``conv2d``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional

from lgconv.kernels.pointwise import empty_output

GROUPED_CONV_OP = "lgconv::grouped_conv3x3"
_SCHEMA = "(Tensor input, Tensor weight, Tensor? bias, int groups) -> Tensor"


def grouped_conv3x3_reference(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045 - TorchScript reads these annotations
    groups: int,
) -> Tensor:
    """What the op computes: ``conv2d(input, weight, bias, padding=1, groups=groups)``."""
    output = functional.conv2d(input, weight, bias, padding=1, groups=groups)
    return empty_output(input, tuple(output.shape)).copy_(output)


def _fake(input: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:  # noqa: UP045
    batch, _, height, width = input.shape
    return empty_output(input, (batch, weight.shape[0], height, width))


torch.library.define(GROUPED_CONV_OP, _SCHEMA)
torch.library.impl(GROUPED_CONV_OP, "CompositeExplicitAutograd", grouped_conv3x3_reference)
torch.library.register_fake(GROUPED_CONV_OP, _fake)
