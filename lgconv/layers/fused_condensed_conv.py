"""Inference layers made by ``optimize_for_inference``: a condensed conv with its neighbours folded in.

``FusedCondensedConv2d`` computes ``[gather] -> [clamp] -> conv -> [reorder]``: the clamp stands for
a folded batch norm + ReLU before the conv (its scale and shift live in the conv's weight and bias),
a batch norm after the conv is folded into the weight too. ``Folded`` stands where such a batch
norm (and its ReLU) used to be, so the model keeps its module names and its file can be rebuilt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lgconv.layers.conv_geometry import conv_geometry

KERNELS: tuple[str, ...] = ("grouped", "dense", "dense_kept")


class FusedCondensedConv2d(nn.Module):
    """``index_select`` (optional) -> per-channel ``clamp`` (optional) -> ``Conv2d`` -> reorder (optional).

    ``kernel`` says how the condensed connections are computed: ``grouped`` (gather each group's
    inputs, grouped conv, restore the channel order), ``dense`` (a plain conv over all inputs with
    the dropped connections' weights set to zero: no gather, no reorder) or ``dense_kept`` (the
    same over only the inputs some group keeps). All three compute the same function.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        *,
        kernel: str = "dense",
        groups: int = 1,
        gathered: int | None = None,
        clamp: bool = False,
        reorder: bool = False,
        stride: int | tuple[int, int] = 1,
        padding: Any = 0,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        conv_inputs = in_channels if gathered is None else gathered
        index = None if gathered is None else torch.arange(gathered, device=device) % in_channels
        self.register_buffer("index", index)
        bound_shape = (1, conv_inputs, 1, 1)
        low = torch.full(bound_shape, -torch.inf, device=device, dtype=dtype) if clamp else None
        high = torch.full(bound_shape, torch.inf, device=device, dtype=dtype) if clamp else None
        self.register_buffer("low", low)
        self.register_buffer("high", high)
        self.register_buffer("order", torch.arange(out_channels, device=device) if reorder else None)
        self.conv = nn.Conv2d(
            conv_inputs,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=True,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild this layer's structure; values are in buffers."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel": self.kernel,
            "groups": self.conv.groups,
            "gathered": None if self.index is None else self.index.numel(),
            "clamp": self.low is not None,
            "reorder": self.order is not None,
            **conv_geometry(self.conv),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FusedCondensedConv2d:
        """A fresh layer of the structure ``config()`` described (load the state dict into it)."""
        return cls(**config)

    def forward(self, input: Tensor) -> Tensor:
        if self.index is not None:
            input = input.index_select(1, self.index)
        if self.low is not None:
            input = torch.clamp(input, self.low, self.high)
        output = self.conv(input)
        if self.order is not None:
            output = output.index_select(1, self.order)
        return output

    def extra_repr(self) -> str:
        gathered = "all" if self.index is None else self.index.numel()
        return (
            f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}, inputs={gathered}, "
            f"clamp={self.low is not None}, reorder={self.order is not None}"
        )


class Folded(nn.Module):
    """Stands where a batch norm was folded into a neighbouring conv: identity, or ReLU if one stayed."""

    def __init__(self, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu

    def config(self) -> dict[str, Any]:
        return {"relu": self.relu}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Folded:
        return cls(**config)

    def forward(self, input: Tensor) -> Tensor:
        return torch.relu(input) if self.relu else input

    def extra_repr(self) -> str:
        return "relu" if self.relu else ""


class DenseGroupedConv2d(nn.Conv2d):
    """A grouped ``Conv2d`` stored as a plain one with the cross-group weights at zero.

    Same function, ``groups`` times the multiply-adds, but on CPU the plain kernel is often faster
    than the grouped one for few channels per group. ``folded_groups`` records the original groups.
    """

    def __init__(self, *args: Any, folded_groups: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.folded_groups = folded_groups

    @classmethod
    def from_grouped(cls, conv: nn.Conv2d) -> DenseGroupedConv2d:
        """The plain conv computing what the grouped ``conv`` computes."""
        groups = conv.groups
        dense = cls(
            conv.in_channels,
            conv.out_channels,
            bias=conv.bias is not None,
            folded_groups=groups,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **conv_geometry(conv),
        )
        outputs, inputs = conv.out_channels // groups, conv.in_channels // groups
        with torch.no_grad():
            dense.weight.zero_()
            for group in range(groups):
                rows, columns = (
                    slice(group * outputs, (group + 1) * outputs),
                    slice(group * inputs, (group + 1) * inputs),
                )
                dense.weight[rows, columns] = conv.weight[rows]
            if conv.bias is not None:
                dense.bias.copy_(conv.bias)
        return dense.train(conv.training)

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "bias": self.bias is not None,
            "folded_groups": self.folded_groups,
            **conv_geometry(self),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DenseGroupedConv2d:
        return cls(**config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded_groups={self.folded_groups}"
