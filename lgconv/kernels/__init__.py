"""Native ops for lgconv's inference layers, with their PyTorch reference.

``lgconv::condensed_pointwise`` computes a condensed 1x1 conv (stride 1, no padding) in one pass:
each kept input is read once, clamped to its folded batch norm + ReLU bounds, multiplied by the
kept weights only, and written in the masked layer's channel order. ``load_native()`` builds and
loads the C++ kernels on first use; without them the op runs ``condensed_pointwise_reference``.
``lgconv::grouped_conv3x3`` computes a grouped 3x3 conv (stride 1, padding 1) on pixel planes, where
oneDNN is slow for the few channels per group of CondenseNet's dense layers, and
``lgconv::avg_pool2x2`` a 2x2 average pooling on planes, where ATen's is slow. ``lgconv::dense_block``
runs a CondenseNet dense block of served layers (condensed 1x1, ReLU, grouped 3x3) in one call.
"""

from lgconv.kernels.avg_pool import AVG_POOL_OP, avg_pool2x2_reference
from lgconv.kernels.build import DISABLE_VARIABLE, load_native, native_disabled, native_loaded
from lgconv.kernels.dense_block import DENSE_BLOCK_OP, dense_block_reference
from lgconv.kernels.grouped_conv import GROUPED_CONV_OP, grouped_conv3x3_reference
from lgconv.kernels.pointwise import OP_NAME, condensed_pointwise_reference

__all__ = [
    "AVG_POOL_OP",
    "DENSE_BLOCK_OP",
    "DISABLE_VARIABLE",
    "GROUPED_CONV_OP",
    "OP_NAME",
    "avg_pool2x2_reference",
    "condensed_pointwise_reference",
    "dense_block_reference",
    "grouped_conv3x3_reference",
    "load_native",
    "native_disabled",
    "native_loaded",
]
