"""The ``lgconv::dense_block`` op: a CondenseNet dense block of served layers in one call.

Layer ``i`` computes ``grouped_conv3x3(relu(condensed_pointwise(x, ...)))`` on the block's channels
so far and appends its outputs, as the block's concatenation does. One call instead of about five
small ops and their Python per layer is what batch-1 inference is short of; eager inference uses it
(``DenseBlock``), compilers and exporters see the per-layer ops. The reference below runs where the
native kernel (``dense_block.cpp``) is not loaded; the fake gives compilers the output's shape.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lgconv.kernels.grouped_conv import grouped_conv3x3_reference
from lgconv.kernels.pointwise import condensed_pointwise_reference, empty_output

DENSE_BLOCK_OP = "lgconv::dense_block"
_SCHEMA = (
    "(Tensor input, Tensor?[] index, Tensor[] weight1, Tensor?[] bias1, Tensor?[] low, Tensor?[] high, "
    "Tensor?[] order, int[] groups1, Tensor[] weight2, Tensor?[] bias2, int[] groups2, bool[] native2) "
    "-> Tensor"
)


def dense_block_reference(
    input: Tensor,
    index: list[Optional[Tensor]],  # noqa: UP045 - torch.library reads these annotations
    weight1: list[Tensor],
    bias1: list[Optional[Tensor]],  # noqa: UP045
    low: list[Optional[Tensor]],  # noqa: UP045
    high: list[Optional[Tensor]],  # noqa: UP045
    order: list[Optional[Tensor]],  # noqa: UP045
    groups1: list[int],
    weight2: list[Tensor],
    bias2: list[Optional[Tensor]],  # noqa: UP045
    groups2: list[int],
    native2: list[bool],
) -> Tensor:
    """What the op computes: per layer, the condensed 1x1 (``index`` None: every input), a ReLU, the
    3x3 conv (``native2`` says which kernel computes it natively: the values are the same), then
    the layer's outputs appended to its input."""
    x = input
    for i, weight in enumerate(weight1):
        kept = index[i]
        if kept is None:
            kept = torch.arange(x.shape[1], device=x.device)
        bottleneck = condensed_pointwise_reference(
            x, kept, weight, bias1[i], low[i], high[i], order[i], groups1[i]
        )
        new = grouped_conv3x3_reference(torch.relu(bottleneck), weight2[i], bias2[i], groups2[i])
        x = torch.cat([x, new], 1)
    return empty_output(input, tuple(x.shape)).copy_(x)


def _fake(
    input: Tensor,
    index: list[Optional[Tensor]],  # noqa: UP045
    weight1: list[Tensor],
    bias1: list[Optional[Tensor]],  # noqa: UP045
    low: list[Optional[Tensor]],  # noqa: UP045
    high: list[Optional[Tensor]],  # noqa: UP045
    order: list[Optional[Tensor]],  # noqa: UP045
    groups1: list[int],
    weight2: list[Tensor],
    bias2: list[Optional[Tensor]],  # noqa: UP045
    groups2: list[int],
    native2: list[bool],
) -> Tensor:
    batch, channels, height, width = input.shape
    return empty_output(input, (batch, channels + sum(w.shape[0] for w in weight2), height, width))


torch.library.define(DENSE_BLOCK_OP, _SCHEMA)
torch.library.impl(DENSE_BLOCK_OP, "CompositeExplicitAutograd", dense_block_reference)
torch.library.register_fake(DENSE_BLOCK_OP, _fake)
