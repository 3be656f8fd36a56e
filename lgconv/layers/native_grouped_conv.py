"""NativeGroupedConv2d: a grouped 3x3 conv computed by the native ``lgconv::grouped_conv3x3`` op.

On pixel planes (NCHW) with few channels per group, as CondenseNet's dense layers have, oneDNN's
grouped conv is several times slower than its multiply-adds need; ``optimize_for_inference`` offers
this layer as a candidate and keeps it where timing says it is faster. Same function as the conv.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lgconv import kernels
from lgconv.layers.conv_geometry import conv_geometry
from lgconv.layers.onnx_export import exporting_onnx


def computes_grouped_conv3x3(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` has the window the op computes: 3x3, stride 1, padding 1, no dilation, zeros."""
    return (
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and not isinstance(conv.padding, str)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.padding_mode == "zeros"
    )


class NativeGroupedConv2d(nn.Conv2d):
    """A ``Conv2d`` (3x3, stride 1, padding 1, any groups) whose forward runs ``lgconv::grouped_conv3x3``.

    Its PyTorch reference runs where the C++ kernel is not built; ONNX export records a plain conv.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not computes_grouped_conv3x3(self):
            raise ValueError(
                "NativeGroupedConv2d computes 3x3 convs with stride 1, padding 1, no dilation and zero "
                f"padding; got kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}: use nn.Conv2d"
            )
        kernels.load_native()  # builds the C++ kernels on first use; the reference runs without them

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> NativeGroupedConv2d:
        """The layer computing what ``conv`` computes, with its weight and bias."""
        native = cls(
            conv.in_channels,
            conv.out_channels,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **conv_geometry(conv),
        )
        with torch.no_grad():
            native.weight.copy_(conv.weight)
            if conv.bias is not None:
                native.bias.copy_(conv.bias)
        return native.train(conv.training)

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "groups": self.groups,
            "bias": self.bias is not None,
            **conv_geometry(self),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NativeGroupedConv2d:
        return cls(**config)

    def forward(self, input: Tensor) -> Tensor:
        if exporting_onnx():
            return self._conv_forward(input, self.weight, self.bias)
        return torch.ops.lgconv.grouped_conv3x3(input, self.weight, self.bias, self.groups)
