"""LearnedGroupConv: a dense convolution trained under a learned-group mask (the training form)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lgconv.layers.conv_geometry import conv_geometry
from lgconv.layers.learned_group import Layout, LearnedGroupMixin


class LearnedGroupConv(LearnedGroupMixin, nn.Conv2d):
    """A ``Conv2d`` whose weight is multiplied by a 0/1 mask that condensing shrinks group by group.

    It is an ``nn.Conv2d`` (``groups`` stays 1, the dense convolution); ``learned_groups`` is the
    number of groups the outputs are split into. ``forward`` is a pure function of input, weight
    and mask: pruning only happens through :meth:`condense`, called by the scheduler.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        *,
        learned_groups: int = 4,
        condense_factor: int | None = None,
        layout: Layout = "contiguous",
        stride: int | tuple[int, int] = 1,
        padding: Any = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=1,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        factor = learned_groups if condense_factor is None else condense_factor
        self._init_condensing(learned_groups, factor, layout)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        learned_groups: int = 4,
        condense_factor: int | None = None,
        layout: Layout = "contiguous",
    ) -> LearnedGroupConv:
        """Wrap ``conv`` (sharing its parameters); the result computes the same until condensed."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"cannot learn groups on a grouped convolution (groups={conv.groups})")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            learned_groups=learned_groups,
            condense_factor=condense_factor,
            layout=layout,
            bias=conv.bias is not None,
            device="meta",
            dtype=conv.weight.dtype,
            **conv_geometry(conv),
        )
        layer.weight = conv.weight
        layer.bias = conv.bias
        layer._init_condensing(layer.learned_groups, layer.condense_factor, layout)
        return layer.train(conv.training)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild this layer's structure; state is in buffers."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "learned_groups": self.learned_groups,
            "condense_factor": self.condense_factor,
            "layout": self.layout,
            "bias": self.bias is not None,
            **conv_geometry(self),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LearnedGroupConv:
        """A fresh layer of the structure ``config()`` described (load the state dict into it)."""
        return cls(**config)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.condensing_repr()}"
