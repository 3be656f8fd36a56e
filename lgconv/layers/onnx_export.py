"""Whether an ONNX exporter is tracing: layers that call lgconv's native ops record a plain form then."""

import torch


def exporting_onnx() -> bool:
    """True while ``torch.onnx.export`` traces the model (ONNX has no lgconv ops); False in TorchScript."""
    if torch.jit.is_scripting():
        return False
    return torch.onnx.is_in_onnx_export()
