"""CondensedLinear: the inference form of a LearnedGroupLinear (gather, grouped matmul, order)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgconv import kernels
from lgconv.layers.learned_group import Layout, grouped_connections, grouped_order
from lgconv.layers.learned_group_linear import LearnedGroupLinear
from lgconv.layers.onnx_export import exporting_onnx

LINEAR_KERNELS = ("grouped", "native")


class CondensedLinear(nn.Module):
    """Gather the kept input features, multiply each group by its own block, restore the order.

    ``weight`` is (out, kept_inputs) with rows listed group by group; ``bias`` keeps the original
    output order. Works on any leading dims, like ``nn.Linear`` (channels-last tokens included).
    ``kernel="grouped"`` computes it with ATen (gather, ``einsum``, gather); ``"native"`` runs
    lgconv's fused C++ op on the tokens seen as a channels-last 1x1 conv (no copy), which
    ``optimize_for_inference`` picks where it times faster. Both compute the same function.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        groups: int,
        kept_inputs: int,
        layout: Layout = "contiguous",
        bias: bool = True,
        kernel: str = "grouped",
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel not in LINEAR_KERNELS:
            raise ValueError(f"kernel must be one of {LINEAR_KERNELS}, got {kernel!r}")
        if kernel == "native":
            kernels.load_native()  # builds the C++ kernel on first use; the reference runs without it
        self.kernel = kernel
        self.in_features = in_features
        self.out_features = out_features
        self.groups = groups
        self.kept_inputs = kept_inputs
        self.layout = layout
        self.register_buffer("index", torch.arange(groups * kept_inputs, device=device) % in_features)
        self.weight = nn.Parameter(torch.empty(out_features, kept_inputs, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        rows = grouped_order(out_features, groups, layout).to(device)
        identity = layout == "contiguous" or groups == 1
        self.register_buffer("restore", None if identity else rows.argsort(), persistent=False)
        self.register_buffer("rows", None if identity else rows, persistent=False)  # grouped row -> output

    @classmethod
    def from_learned(cls, layer: LearnedGroupLinear) -> CondensedLinear:
        """Build the inference layer computing exactly what ``layer`` computes with its current mask."""
        index = layer.gather_index()
        groups = layer.learned_groups
        kept = index.numel() // groups
        weight = layer.weight.detach()
        condensed = cls(
            layer.in_features,
            layer.out_features,
            groups=groups,
            kept_inputs=kept,
            layout=layer.layout,
            bias=layer.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        rows, columns = grouped_connections(index, layer.out_features, groups, layer.layout)
        with torch.no_grad():
            condensed.index.copy_(index)
            condensed.weight.copy_(weight[rows[:, None], columns])
            if layer.bias is not None:
                condensed.bias.copy_(layer.bias.detach())
        condensed.weight.requires_grad_(layer.weight.requires_grad)
        return condensed.train(layer.training)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild this layer's structure; the index is a buffer."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "groups": self.groups,
            "kept_inputs": self.kept_inputs,
            "layout": self.layout,
            "bias": self.bias is not None,
            "kernel": self.kernel,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CondensedLinear:
        """A fresh layer of the structure ``config()`` described (load the state dict into it)."""
        return cls(**config)

    def with_kernel(self, kernel: str) -> CondensedLinear:
        """A copy computing the same function with ``kernel`` (sharing nothing with this layer)."""
        copy = type(self)(
            **{**self.config(), "kernel": kernel}, device=self.weight.device, dtype=self.weight.dtype
        )
        copy.load_state_dict(self.state_dict())
        return copy.train(self.training)

    def forward(self, input: Tensor) -> Tensor:
        if self.kernel == "native" and not torch.jit.is_scripting() and not exporting_onnx():
            return self._native(input)
        gathered = input.index_select(-1, self.index)
        if self.groups == 1:
            return F.linear(gathered, self.weight, self.bias)
        blocks = gathered.unflatten(-1, (self.groups, self.kept_inputs))
        weight = self.weight.view(self.groups, -1, self.kept_inputs)
        output = torch.einsum("...gi,goi->...go", blocks, weight).flatten(-2)
        if self.restore is not None:
            output = output.index_select(-1, self.restore)
        return output if self.bias is None else output + self.bias

    @torch.jit.unused
    def _native(self, input: Tensor) -> Tensor:
        """The fused op on the tokens as a (1, in, 1, tokens) channels-last image: a view, no copy."""
        tokens = input.reshape(-1, self.in_features).t()[None, :, None, :]
        bias = self.bias
        if bias is not None and self.rows is not None:
            bias = bias.index_select(0, self.rows)  # the op adds the bias per grouped row
        output = torch.ops.lgconv.condensed_pointwise(
            tokens, self.index, self.weight, bias, None, None, self.restore, self.groups
        )
        return output[0, :, 0, :].t().reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = "" if self.kernel == "grouped" else f", kernel={self.kernel}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"groups={self.groups}, kept_inputs={self.kept_inputs}, layout={self.layout}{kernel}"
        )
