"""The sliding window of a ``Conv1d`` / ``Conv2d`` / ``Conv3d`` (kernel, stride, padding, dilation,
padding mode) as keywords."""

from typing import Any

from torch import nn


def conv_geometry(conv: nn.Module) -> dict[str, Any]:
    """JSON-ready constructor keywords that give a new conv the same window as ``conv``."""
    return {
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
        "dilation": list(conv.dilation),
        "padding_mode": conv.padding_mode,
    }
