"""Learned group convolutions in 1, 2 and 3 dimensions: a dense conv trained under a learned-group mask.

One implementation, :class:`LearnedGroupConvNd`, holds the whole behaviour; ``LearnedGroupConv1d``,
``LearnedGroupConv`` (2D, the historical name) and ``LearnedGroupConv3d`` only pick the torch conv
they extend. Pointwise convs (kernel 1, 1x1, 1x1x1) are the ones condensify picks by default.
"""

# No ``from __future__ import annotations``: TorchScript reads the class annotations (see learned_group).
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lgconv.layers.conv_geometry import conv_geometry
from lgconv.layers.learned_group import Layout, LearnedGroupMixin


class LearnedGroupConvNd(LearnedGroupMixin):
    """A conv whose weight is multiplied by a 0/1 mask that condensing shrinks group by group.

    Subclasses also derive from one of ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (named in
    ``conv_type``): ``groups`` stays 1, the dense convolution; ``learned_groups`` is the number of
    groups the outputs are split into. ``forward`` is a pure function of input, weight and mask:
    pruning only happens through :meth:`condense`, called by the scheduler.
    """

    conv_type: ClassVar[type[nn.Module]]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any = 1,
        *,
        learned_groups: int = 4,
        condense_factor: int | None = None,
        layout: Layout = "contiguous",
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]  # the conv class after the mixin in the MRO
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
        conv: nn.Module,
        learned_groups: int = 4,
        condense_factor: int | None = None,
        layout: Layout = "contiguous",
    ) -> "LearnedGroupConvNd":
        """Wrap ``conv`` (sharing its parameters); the result computes the same until condensed."""
        if not isinstance(conv, cls.conv_type):
            raise TypeError(
                f"{cls.__name__}.from_conv needs an nn.{cls.conv_type.__name__}, got {type(conv).__name__}"
            )
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
        return layer.train(conv.training)  # type: ignore[attr-defined]

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild this layer's structure; state is in buffers."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "learned_groups": self.learned_groups,
            "condense_factor": self.condense_factor,
            "layout": self.layout,
            "bias": self.bias is not None,
            **conv_geometry(self),  # type: ignore[arg-type]
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LearnedGroupConvNd":
        """A fresh layer of the structure ``config()`` described (load the state dict into it)."""
        return cls(**config)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.condensing_repr()}"  # type: ignore[misc]


class LearnedGroupConv1d(LearnedGroupConvNd, nn.Conv1d):
    """The learned group form of an ``nn.Conv1d`` (speech and time-series pointwise layers)."""

    conv_type = nn.Conv1d


class LearnedGroupConv(LearnedGroupConvNd, nn.Conv2d):
    """The learned group form of an ``nn.Conv2d``."""

    conv_type = nn.Conv2d


class LearnedGroupConv3d(LearnedGroupConvNd, nn.Conv3d):
    """The learned group form of an ``nn.Conv3d`` (video networks' 1x1x1 layers)."""

    conv_type = nn.Conv3d


def learned_group_conv_type(conv: nn.Module) -> "type[LearnedGroupConvNd]":
    """The learned group class for ``conv`` (an ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``)."""
    for cls in (LearnedGroupConv1d, LearnedGroupConv, LearnedGroupConv3d):
        if isinstance(conv, cls.conv_type):
            return cls
    raise TypeError(f"no learned group form for {type(conv).__name__}; it needs Conv1d, Conv2d or Conv3d")
