"""Inference layers made by ``optimize_for_inference``: a condensed conv with its neighbours folded in.

``FusedCondensedConv2d`` computes ``[gather] -> [clamp] -> conv -> [reorder]``: the clamp stands for
a folded batch norm + ReLU before the conv (its scale and shift live in the conv's weight and bias),
a batch norm after the conv is folded into the weight too. ``Folded`` stands where such a batch
norm (and its ReLU) used to be, so the model keeps its module names and its file can be rebuilt.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lgconv import kernels
from lgconv.layers.conv_geometry import conv_geometry
from lgconv.layers.onnx_export import exporting_onnx

KERNELS: tuple[str, ...] = ("grouped", "dense", "dense_kept", "matmul", "native")
CLAMPS: tuple[str | None, ...] = (None, "low", "high", "both")  # which per-channel bounds the input gets
POINTWISE_KERNELS: tuple[str, ...] = ("matmul", "native")  # only for 1x1 convs with stride 1 and no padding


class FusedCondensedConv2d(nn.Module):
    """``index_select`` (optional) -> per-channel ``clamp`` (optional) -> ``Conv2d`` -> reorder (optional).

    ``kernel`` says how the condensed connections are computed: ``grouped`` (gather each group's
    inputs, grouped conv, restore the channel order), ``dense`` (a plain conv over all inputs with
    the dropped connections' weights set to zero: no gather, no reorder), ``dense_kept`` (the
    same over only the inputs some group keeps) or ``matmul`` (the dense weights as one matrix
    product over the pixels, skipping the conv primitive's per-call cost; 1x1 convs only) or
    ``native`` (the ``grouped`` structure computed in one pass by the ``lgconv::condensed_pointwise``
    op: gather, clamp, kept connections only, outputs in order; 1x1 convs only; its PyTorch
    reference runs where the C++ kernel is not built, and in ONNX export). All five compute the
    same function.
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
        clamp: str | None = None,
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
        if clamp not in CLAMPS:
            raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
        pointwise = is_pointwise(kernel_size, stride, padding)
        if kernel == "matmul" and not (pointwise and gathered is None and groups == 1):
            raise ValueError(
                f"kernel={kernel!r} computes 1x1 convs with stride 1, no padding, no gather and no groups; "
                f"got kernel_size={kernel_size}, stride={stride}, padding={padding}: use kernel='dense'"
            )
        if kernel == "native" and not (pointwise and gathered is not None and padding_mode == "zeros"):
            raise ValueError(
                f"kernel='native' computes gathered 1x1 convs with stride 1 and no padding; got "
                f"kernel_size={kernel_size}, stride={stride}, padding={padding}, gathered={gathered}: "
                "use kernel='grouped'"
            )
        if kernel == "native":
            kernels.load_native()  # builds the C++ kernel on first use; the reference runs without it
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        conv_inputs = in_channels if gathered is None else gathered
        index = None if gathered is None else torch.arange(gathered, device=device) % in_channels
        self.register_buffer("index", index)
        bound_shape = (1, conv_inputs, 1, 1)
        low = high = None
        if clamp in ("low", "both"):
            low = torch.full(bound_shape, -torch.inf, device=device, dtype=dtype)
        if clamp in ("high", "both"):
            high = torch.full(bound_shape, torch.inf, device=device, dtype=dtype)
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

    @property
    def clamp(self) -> str | None:
        """Which per-channel bounds the input is clamped to: None, ``"low"``, ``"high"`` or ``"both"``."""
        if self.low is None:
            return None if self.high is None else "high"
        return "low" if self.high is None else "both"

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild this layer's structure; values are in buffers."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel": self.kernel,
            "groups": self.conv.groups,
            "gathered": None if self.index is None else self.index.numel(),
            "clamp": self.clamp,
            "reorder": self.order is not None,
            **conv_geometry(self.conv),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FusedCondensedConv2d:
        """A fresh layer of the structure ``config()`` described (load the state dict into it).

        Files written by lgconv 0.1.0 stored ``clamp`` as a bool with both bounds in the state dict.
        """
        config = dict(config)
        if isinstance(config.get("clamp"), bool):
            config["clamp"] = "both" if config["clamp"] else None
        return cls(**config)

    __jit_ignored_attributes__ = ["_bound"]  # eager-only cache, not part of a scripted module

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_bound", None)  # a submodule or setting may have changed: bind again
        super().__setattr__(name, value)

    @torch.jit.unused
    def _bound_native(self) -> tuple[Any, ...]:
        """The dicts that hold the op's tensors (read fresh on every call) and the groups, bound once;
        empty if not native. Module attribute lookups of the ten arguments cost about as much
        Python time as the op itself on a batch-1 CondenseNet layer; dict reads cost little."""
        bound = self.__dict__.get("_bound")
        if bound is None:
            native = self.kernel == "native" and self.index is not None
            bound = (self._buffers, self.conv._parameters, self.conv.groups) if native else ()
            self.__dict__["_bound"] = bound
        return bound

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and not exporting_onnx():
            bound = self._bound_native()
            if bound:
                buffers, parameters, groups = bound
                return torch.ops.lgconv.condensed_pointwise(
                    input,
                    buffers["index"],
                    parameters["weight"],
                    parameters.get("bias"),
                    buffers.get("low"),
                    buffers.get("high"),
                    buffers.get("order"),
                    groups,
                )
        # TorchScript calls the op here (eager did above); ONNX has no such op: its exporters record
        # the grouped form below (same function).
        if torch.jit.is_scripting() and self.kernel == "native" and self.index is not None:
            return torch.ops.lgconv.condensed_pointwise(
                input,
                self.index,
                self.conv.weight,
                self.conv.bias,
                self.low,
                self.high,
                self.order,
                self.conv.groups,
            )
        if self.index is not None:
            input = input.index_select(1, self.index)
        low, high = self.low, self.high
        if low is not None and high is not None:
            input = torch.clamp(input, low, high)
        elif low is not None:  # one-sided: a binary maximum runs about twice as fast as a clamp
            input = torch.maximum(input, low)
        elif high is not None:
            input = torch.minimum(input, high)
        if self.kernel == "matmul":
            return _pointwise_matmul(input, self.conv.weight, self.conv.bias)
        output = self.conv(input)
        if self.order is not None:
            output = output.index_select(1, self.order)
        return output

    def extra_repr(self) -> str:
        gathered = "all" if self.index is None else self.index.numel()
        return (
            f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}, inputs={gathered}, "
            f"clamp={self.clamp}, reorder={self.order is not None}"
        )


def _pair(value: Any) -> Any:
    return (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, list) else value


def is_pointwise(kernel_size: Any, stride: Any, padding: Any) -> bool:
    """A 1x1 window with stride 1 and no padding: the conv is a plain matrix product over the pixels."""
    return _pair(kernel_size) == (1, 1) and _pair(stride) == (1, 1) and _pair(padding) in ((0, 0), "valid")


def _pointwise_matmul(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # noqa: UP045
    """A 1x1 conv as one matrix product in the input's own memory format (no copy, no conv primitive)."""
    matrix = weight.flatten(1)
    if input.shape[1] > 1 and input.stride(1) == 1:  # channels-last: pixels x channels
        return nn.functional.linear(input.permute(0, 2, 3, 1), matrix, bias).permute(0, 3, 1, 2)
    batch, channels, height, width = input.shape
    pixels = input.reshape(batch, channels, height * width)
    if bias is None:
        output = torch.matmul(matrix, pixels)
    else:
        output = torch.baddbmm(bias.view(1, -1, 1), matrix.expand(batch, -1, -1), pixels)
    return output.view(batch, -1, height, width)


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
