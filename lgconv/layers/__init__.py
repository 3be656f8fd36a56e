"""Torch modules of lgconv: the masked training layers and their finalized inference forms."""

from lgconv.layers.condensed_conv import CondensedConv1d, CondensedConv2d, CondensedConv3d
from lgconv.layers.condensed_linear import CondensedLinear
from lgconv.layers.fused_condensed_conv import DenseGroupedConv2d, Folded, FusedCondensedConv2d
from lgconv.layers.learned_group import LearnedGroupMixin
from lgconv.layers.learned_group_conv import LearnedGroupConv, LearnedGroupConv1d, LearnedGroupConv3d
from lgconv.layers.learned_group_linear import LearnedGroupLinear
from lgconv.layers.native_avg_pool import NativeAvgPool2d
from lgconv.layers.native_grouped_conv import NativeGroupedConv2d

__all__ = [
    "CondensedConv1d",
    "CondensedConv2d",
    "CondensedConv3d",
    "CondensedLinear",
    "DenseGroupedConv2d",
    "Folded",
    "FusedCondensedConv2d",
    "LearnedGroupConv",
    "LearnedGroupConv1d",
    "LearnedGroupConv3d",
    "LearnedGroupLinear",
    "LearnedGroupMixin",
    "NativeAvgPool2d",
    "NativeGroupedConv2d",
]
