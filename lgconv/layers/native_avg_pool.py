"""NativeAvgPool2d: 2x2 average pooling with stride 2 computed by the native ``lgconv::avg_pool2x2`` op.

ATen's ``avg_pool2d`` runs several times slower on NCHW tensors than on channels-last ones; where
``optimize_for_inference`` keeps a model in NCHW it offers this layer for such pools and keeps it
where timing says it is faster. Same function as the pool.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lgconv import kernels
from lgconv.layers.onnx_export import exporting_onnx


def computes_avg_pool2x2(pool: nn.Module) -> bool:
    """Whether ``pool`` is a plain 2x2 average pooling with stride 2, no padding, floor mode."""

    def pair(value: Any) -> tuple[int, int]:
        return (value, value) if isinstance(value, int) else tuple(value)

    return (
        type(pool) is nn.AvgPool2d
        and pair(pool.kernel_size) == (2, 2)
        and pair(pool.stride if pool.stride is not None else pool.kernel_size) == (2, 2)
        and pair(pool.padding) == (0, 0)
        and not pool.ceil_mode
        and pool.divisor_override is None
    )


class NativeAvgPool2d(nn.Module):
    """``nn.AvgPool2d(2)`` whose forward runs ``lgconv::avg_pool2x2`` (its reference without the kernel)."""

    def __init__(self) -> None:
        super().__init__()
        kernels.load_native()  # builds the C++ kernels on first use; the reference runs without them

    def config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NativeAvgPool2d:
        return cls(**config)

    def forward(self, input: Tensor) -> Tensor:
        if exporting_onnx():
            return nn.functional.avg_pool2d(input, 2)  # ONNX has no such op: record the pool
        return torch.ops.lgconv.avg_pool2x2(input)
