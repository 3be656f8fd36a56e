"""Condensed convs in 1, 2 and 3 dimensions: the inference form of a learned group conv
(gather, grouped conv, output order). One implementation, :class:`CondensedConvNd`; the 1D/2D/3D
classes only pick the torch conv inside."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lgconv.layers.conv_geometry import conv_geometry
from lgconv.layers.learned_group import Layout, grouped_connections, grouped_order
from lgconv.layers.learned_group_conv import LearnedGroupConvNd


class CondensedConvNd(nn.Module):
    """``index_select`` of the kept inputs, then a conv with ``groups=G``, then the original channel order.

    The gathered tensor has ``groups * kept_inputs`` channels: an input kept by several groups is
    gathered once per group. With the interleaved layout the grouped conv emits channels group by
    group, and ``restore`` puts them back where the masked layer had them. Subclasses name the
    torch conv (``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``) in ``conv_type``.
    """

    conv_type: ClassVar[type[nn.Module]]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any = 1,
        *,
        groups: int,
        kept_inputs: int,
        layout: Layout = "contiguous",
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.kept_inputs = kept_inputs
        self.layout = layout
        self.register_buffer("index", torch.arange(groups * kept_inputs, device=device) % in_channels)
        self.conv = self.conv_type(
            groups * kept_inputs,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        restore = grouped_order(out_channels, groups, layout).argsort().to(device)
        identity = layout == "contiguous" or groups == 1
        self.register_buffer("restore", None if identity else restore, persistent=False)

    @classmethod
    def from_learned(cls, layer: LearnedGroupConvNd) -> CondensedConvNd:
        """Build the inference layer computing exactly what ``layer`` computes with its current mask."""
        if not isinstance(layer, cls.conv_type):
            raise TypeError(
                f"{cls.__name__} is built from a {cls.conv_type.__name__}, not {type(layer).__name__}"
            )
        index = layer.gather_index()
        groups = layer.learned_groups
        kept = index.numel() // groups
        weight = layer.weight.detach()
        condensed = cls(
            layer.in_channels,
            layer.out_channels,
            groups=groups,
            kept_inputs=kept,
            layout=layer.layout,
            bias=layer.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
            **conv_geometry(layer),
        )
        rows, columns = grouped_connections(index, layer.out_channels, groups, layer.layout)
        with torch.no_grad():
            condensed.index.copy_(index)
            condensed.conv.weight.copy_(weight[rows[:, None], columns])
            if layer.bias is not None:
                condensed.conv.bias.copy_(layer.bias.detach()[rows])
        condensed.conv.weight.requires_grad_(layer.weight.requires_grad)
        return condensed.train(layer.training)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild this layer's structure; the index is a buffer."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "groups": self.groups,
            "kept_inputs": self.kept_inputs,
            "layout": self.layout,
            "bias": self.conv.bias is not None,
            **conv_geometry(self.conv),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CondensedConvNd:
        """A fresh layer of the structure ``config()`` described (load the state dict into it)."""
        return cls(**config)

    @property
    def weight(self) -> Tensor:
        """The grouped conv's weight, for model code that reads ``layer.weight.dtype`` (timm EdgeNeXt)."""
        return self.conv.weight

    @property
    def bias(self) -> Tensor | None:
        return self.conv.bias

    def forward(self, input: Tensor) -> Tensor:
        output = self.conv(input.index_select(1, self.index))
        if self.restore is not None:
            output = output.index_select(1, self.restore)
        return output

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, groups={self.groups}, "
            f"kept_inputs={self.kept_inputs}, layout={self.layout}"
        )


class CondensedConv1d(CondensedConvNd):
    """The inference form of a ``LearnedGroupConv1d``: gather + grouped ``Conv1d`` (+ order)."""

    conv_type = nn.Conv1d


class CondensedConv2d(CondensedConvNd):
    """The inference form of a ``LearnedGroupConv``: gather + grouped ``Conv2d`` (+ order)."""

    conv_type = nn.Conv2d


class CondensedConv3d(CondensedConvNd):
    """The inference form of a ``LearnedGroupConv3d``: gather + grouped ``Conv3d`` (+ order)."""

    conv_type = nn.Conv3d


def condensed_conv_type(layer: nn.Module) -> type[CondensedConvNd]:
    """The inference class for a learned group conv (or any conv) of ``layer``'s dimension."""
    for cls in (CondensedConv1d, CondensedConv2d, CondensedConv3d):
        if isinstance(layer, cls.conv_type):
            return cls
    raise TypeError(f"no condensed form for {type(layer).__name__}; it needs Conv1d, Conv2d or Conv3d")
