"""LearnedGroupLinear: a dense linear layer trained under a learned-group mask (the training form)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgconv.layers.learned_group import Layout, LearnedGroupMixin


class LearnedGroupLinear(LearnedGroupMixin, nn.Linear):
    """An ``nn.Linear`` whose weight is multiplied by a learned-group mask; acts on the last dim.

    With ``learned_groups=1`` and ``condense_factor=2`` it is the paper's classifier condensing:
    keep the half of the input features with the largest weight L1 norm.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        learned_groups: int = 4,
        condense_factor: int | None = None,
        layout: Layout = "contiguous",
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        factor = learned_groups if condense_factor is None else condense_factor
        self._init_condensing(learned_groups, factor, layout)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        learned_groups: int = 4,
        condense_factor: int | None = None,
        layout: Layout = "contiguous",
    ) -> LearnedGroupLinear:
        """Wrap ``linear`` (sharing its parameters); the result computes the same until condensed."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            learned_groups=learned_groups,
            condense_factor=condense_factor,
            layout=layout,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_condensing(layer.learned_groups, layer.condense_factor, layout)
        return layer.train(linear.training)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-ready) that rebuild this layer's structure; state is in buffers."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "learned_groups": self.learned_groups,
            "condense_factor": self.condense_factor,
            "layout": self.layout,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LearnedGroupLinear:
        """A fresh layer of the structure ``config()`` described (load the state dict into it)."""
        return cls(**config)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.condensing_repr()}"
