"""Native ops for lgconv's inference layers, with their PyTorch reference.

``lgconv::condensed_pointwise`` computes a condensed 1x1 conv (stride 1, no padding) in one pass:
each kept input is read once, clamped to its folded batch norm + ReLU bounds, multiplied by the
kept weights only, and written in the masked layer's channel order. ``load_native()`` builds and
loads the C++ kernel on first use; without it the op runs ``condensed_pointwise_reference``.
"""

from lgconv.kernels.build import DISABLE_VARIABLE, load_native, native_disabled
from lgconv.kernels.pointwise import OP_NAME, condensed_pointwise_reference

__all__ = ["DISABLE_VARIABLE", "OP_NAME", "condensed_pointwise_reference", "load_native", "native_disabled"]
