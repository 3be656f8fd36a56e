"""lgconv: CondenseNet's learned group convolution as a structured-pruning plugin for PyTorch."""

from lgconv.condensify import CondensePlan, LayerDecision, condensify, plan
from lgconv.finalize import finalize
from lgconv.layers import (
    CondensedConv2d,
    CondensedLinear,
    LearnedGroupConv,
    LearnedGroupLinear,
)
from lgconv.scheduler import CondensationScheduler, copy_masks

__version__ = "0.1.0"

__all__ = [
    "CondensationScheduler",
    "CondensePlan",
    "CondensedConv2d",
    "CondensedLinear",
    "LayerDecision",
    "LearnedGroupConv",
    "LearnedGroupLinear",
    "condensify",
    "copy_masks",
    "finalize",
    "plan",
]
