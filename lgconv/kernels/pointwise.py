"""The ``lgconv::condensed_pointwise`` op: a condensed 1x1 conv (gather, clamp, grouped product, reorder).

The op is registered with ``torch.library`` so that eager code, ``torch.compile``, ``torch.export``
and TorchScript all see one operator. Its PyTorch reference (below) runs wherever the native CPU
kernel (``condensed_pointwise.cpp``, loaded by ``lgconv.kernels.build``) is not loaded, and on
other devices; the fake implementation gives compilers the output's shape and memory format.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional

OP_NAME = "lgconv::condensed_pointwise"
_SCHEMA = (
    "(Tensor input, Tensor index, Tensor weight, Tensor? bias, Tensor? low, Tensor? high, "
    "Tensor? order, int groups) -> Tensor"
)


def output_format(input: Tensor) -> torch.memory_format:
    """Channels-last output for an input whose channels are its innermost dimension (as the kernel)."""
    return torch.channels_last if input.shape[1] > 1 and input.stride(1) == 1 else torch.contiguous_format


def empty_output(input: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An uninitialised output of ``shape`` laid out as the kernels lay out theirs for ``input``."""
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=output_format(input))


def condensed_pointwise_reference(
    input: Tensor,
    index: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045 - TorchScript reads these annotations
    low: Optional[Tensor],  # noqa: UP045
    high: Optional[Tensor],  # noqa: UP045
    order: Optional[Tensor],  # noqa: UP045
    groups: int,
) -> Tensor:
    """What the op computes, in PyTorch ops: ``conv1x1(clamp(input[:, index], low, high))`` per group.

    ``index`` lists each group's kept inputs (``groups`` equal runs), ``weight`` is
    ``(outputs, kept per group[, 1, 1])`` with the outputs group by group, ``low``/``high`` hold one
    bound per entry of ``index`` (None: no bound), and output channel ``c`` is grouped row
    ``order[c]`` (None: grouped order).
    """
    x = input.index_select(1, index)
    if low is not None or high is not None:
        x = torch.clamp(
            x,
            None if low is None else low.reshape(1, -1, 1, 1),
            None if high is None else high.reshape(1, -1, 1, 1),
        )
    output = functional.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), bias, groups=groups)
    if order is not None:
        output = output.index_select(1, order)
    result = torch.empty(
        output.shape, dtype=output.dtype, device=output.device, memory_format=output_format(input)
    )
    return result.copy_(output)


def _fake(
    input: Tensor,
    index: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    low: Optional[Tensor],  # noqa: UP045
    high: Optional[Tensor],  # noqa: UP045
    order: Optional[Tensor],  # noqa: UP045
    groups: int,
) -> Tensor:
    batch, _, height, width = input.shape
    return empty_output(input, (batch, weight.shape[0], height, width))


torch.library.define(OP_NAME, _SCHEMA)
torch.library.impl(OP_NAME, "CompositeExplicitAutograd", condensed_pointwise_reference)
torch.library.register_fake(OP_NAME, _fake)
