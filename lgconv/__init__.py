"""lgconv: CondenseNet's learned group convolution as a structured-pruning plugin for PyTorch."""

from lgconv.batch_norm import recalibrate_batch_norm
from lgconv.condensify import CondensePlan, LayerDecision, condensify, plan
from lgconv.export import ExportReport, export_onnx
from lgconv.finalize import finalize
from lgconv.flops import FlopReport, count_flops
from lgconv.inference import optimize_for_inference
from lgconv.layers import (
    CondensedConv1d,
    CondensedConv2d,
    CondensedConv3d,
    CondensedLinear,
    LearnedGroupConv,
    LearnedGroupConv1d,
    LearnedGroupConv3d,
    LearnedGroupLinear,
)
from lgconv.model_file import load, save
from lgconv.scheduler import CondensationScheduler, copy_masks

__version__ = "0.1.0"

__all__ = [
    "CondensationScheduler",
    "CondensePlan",
    "CondensedConv1d",
    "CondensedConv2d",
    "CondensedConv3d",
    "CondensedLinear",
    "ExportReport",
    "FlopReport",
    "LayerDecision",
    "LearnedGroupConv",
    "LearnedGroupConv1d",
    "LearnedGroupConv3d",
    "LearnedGroupLinear",
    "condensify",
    "copy_masks",
    "count_flops",
    "export_onnx",
    "finalize",
    "load",
    "optimize_for_inference",
    "plan",
    "recalibrate_batch_norm",
    "save",
]
from lgconv import models  # noqa: E402, F401  (last: the presets are built with the passes above)
