"""Open any model file the command line accepts, recognised by its content, not its name.

lgconv files (``lgconv.save``), TorchScript archives, ``torch.export`` programs (``.pt2``), plain
state dicts (``torch.save`` or safetensors, with an architecture to build), and whole pickled
modules, which load only when the caller trusts the file, because unpickling runs its code.
Zip archives are checked (CRC of every member, declared sizes) before torch reads them, and state
dicts are checked against the architecture's skeleton before any weight is assigned.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lgconv import model_file, safetensors_io
from lgconv.model_file import ModelSpec, Shapes

LGCONV = "lgconv file"
TORCHSCRIPT = "TorchScript archive"
EXPORTED = "torch.export program"
STATE_DICT = "state dict"
PICKLED_MODULE = "pickled nn.Module"
TORCH_SAVE = "torch.save file"

_STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_ZIP_SLACK_BYTES = 64 * 2**20  # uncompressed bytes an archive may declare beyond twice its size


@dataclass
class OpenedModel:
    """A model read from a file, with what the file said about itself."""

    module: nn.Module
    format: str
    spec: ModelSpec | None = None
    input_shape: tuple[int, ...] | None = None  # full shape with batch, for programs that fix it


def sniff(path: str | os.PathLike[str]) -> str:
    """The format of ``path`` from its first bytes and, for zip archives, their member names."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist; check the path")
    if file.is_dir():
        raise ValueError(f"{file} is a directory, not a model file; give the file inside it")
    with open(file, "rb") as handle:
        head = handle.read(16)
    if not head:
        raise ValueError(f"{file} is empty; the write that made it failed, save the model again")
    if head.startswith(b"PK\x03\x04"):
        names = _checked_zip(file)
        if any(n.endswith("/archive_format") for n in names):
            return EXPORTED
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return TORCHSCRIPT
        if any(n.endswith("data.pkl") for n in names):
            return TORCH_SAVE
        raise ValueError(f"{file} is a zip archive but not one PyTorch wrote; give a model file")
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return TORCH_SAVE
    if model_file.safetensors_metadata(file) is not None:
        return "safetensors"
    raise ValueError(
        f"{file} is not a model file lgconv reads; give an lgconv file (lgconv.save), a TorchScript "
        "archive, a torch.export .pt2, or a state dict with --arch"
    )


def _checked_zip(file: Path) -> list[str]:
    """Member names of a zip archive whose every member reads back intact (CRC) and is not a zip bomb."""
    corrupt = f"{file} is a corrupt or truncated zip archive (torch.save / TorchScript / .pt2)"
    try:
        with zipfile.ZipFile(file) as archive:
            members = archive.infolist()
            declared = sum(member.file_size for member in members)
            if declared > 2 * file.stat().st_size + _ZIP_SLACK_BYTES:
                raise ValueError(
                    f"{file} declares {declared:,} bytes uncompressed in a {file.stat().st_size:,}-byte "
                    "archive; PyTorch never writes that, refusing to unpack it"
                )
            damaged = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, RuntimeError):
        raise ValueError(corrupt) from None
    except ValueError as error:
        if "refusing to unpack" in str(error):
            raise
        raise ValueError(corrupt) from None
    if damaged is not None:
        raise ValueError(f"{file} is a corrupt zip archive (member {damaged!r} fails its checksum)")
    return names


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _as_state_dict(obj: Any) -> dict[str, Tensor] | None:
    """A state dict found in ``obj``: itself, or under a checkpoint's usual keys."""
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            found = _as_state_dict(obj.get(key))
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class _Arch:
    """How to build the model a plain state dict belongs to."""

    name: str | None
    kwargs: dict[str, Any]
    trust_builder: bool


def _with_arch(shapes: Shapes, read: Callable[[], dict[str, Tensor]], path: Path, arch: _Arch) -> nn.Module:
    """The model of ``arch`` holding a plain state dict: checked on its skeleton first, then assigned."""
    if arch.name is None:
        raise ValueError(
            f"{path} is a plain state dict, which does not say its architecture; pass --arch timm:NAME "
            "or --arch lgconv:PRESET (or save the model with lgconv.save)"
        )
    kwargs = {**_num_classes_kwargs(arch.name, shapes), **arch.kwargs}
    what = f"{arch.name} {json.dumps(kwargs)}"
    if any(k.endswith(".mask") for k in shapes):
        hint = " (it has lgconv masks: save such models with lgconv.save)"
    else:
        hint = "; --arch-kwargs '{\"num_classes\": N}' fits another head"
    model = model_file.skeleton(arch.name, kwargs, trust_builder=arch.trust_builder, tensors=len(shapes))
    try:
        model_file.check_fits(model, shapes, what)
    except ValueError as error:
        raise ValueError(f"{error}{hint}") from None
    return model_file.assign_weights(model, read(), what)


def _num_classes_kwargs(arch: str, shapes: Shapes) -> dict[str, Any]:
    """For timm models, the class count read off the classifier's bias so the head fits."""
    import timm

    if not arch.startswith("timm:") or not timm.is_model(arch.split(":", 1)[1]):
        return {}  # build_arch names the problem

    with torch.device("meta"):
        probe = timm.create_model(arch.split(":", 1)[1], pretrained=False, num_classes=1)
    head = probe.get_classifier()
    bias_key = next((k for k, m in probe.named_modules() if m is head), None)
    bias = shapes.get(f"{bias_key}.bias") if bias_key else None
    return {"num_classes": int(bias[0][0])} if bias is not None and len(bias[0]) == 1 else {}


def _load_torch_save(path: Path, arch: _Arch, trust_pickle: bool) -> OpenedModel:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # not code to run: a damaged pickle stream
            raise ValueError(f"{path} is a corrupt torch.save file (its pickle stream is damaged)") from None
        if not trust_pickle:
            raise ValueError(
                f"{path} is a pickled object (a whole nn.Module?) and unpickling runs code from the file; "
                "pass --trust-pickle only if you trust its source, or re-save it with lgconv.save"
            ) from None
        obj = _unpickle(path)
    except Exception as error:  # a damaged archive or pickle can fail anywhere in torch.load
        raise ValueError(f"{path} is a corrupt or truncated torch.save file ({_first_line(error)})") from None
    if isinstance(obj, nn.Module):
        return OpenedModel(obj, PICKLED_MODULE)
    state = _as_state_dict(obj)
    if state is None:
        raise ValueError(f"{path} holds a {type(obj).__name__} without a state dict; give a model file")
    return OpenedModel(_with_arch(model_file.shapes_of(state), lambda: state, path, arch), STATE_DICT)


def _unpickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"{path} needs code that is not installed to unpickle ({_first_line(error)}); install it"
        ) from None
    except Exception as error:
        raise ValueError(f"{path} could not be unpickled ({_first_line(error)})") from None


def _load_exported(path: Path) -> OpenedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(path)
    except Exception as error:
        raise ValueError(f"{path} is a corrupt torch.export program ({_first_line(error)})") from None
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = [
        tuple(node.meta["val"].shape)
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in user_inputs and "val" in node.meta
    ]
    return OpenedModel(program.module(), EXPORTED, input_shape=shapes[0] if len(shapes) == 1 else None)


def _load_torchscript(path: Path) -> OpenedModel:
    try:
        return OpenedModel(torch.jit.load(path, map_location="cpu"), TORCHSCRIPT)
    except Exception as error:
        raise ValueError(f"{path} is a corrupt TorchScript archive ({_first_line(error)})") from None


def open_model(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_builder: bool = False,
) -> OpenedModel:
    """Read the model in ``path``, whatever its format (see the module docstring).

    ``arch`` and ``arch_kwargs`` build the model a plain state dict belongs to.
    """
    file = Path(path)
    build = _Arch(arch, dict(arch_kwargs or {}), trust_builder)
    kind = sniff(file)
    if kind == "safetensors":
        header = safetensors_io.read_header(file)
        if header is not None and model_file.METADATA_KEY not in header.metadata:
            shapes = {name: (entry.shape, entry.dtype) for name, entry in header.tensors.items()}
            module = _with_arch(shapes, lambda: safetensors_io.read_data(file, header), file, build)
            return OpenedModel(module, STATE_DICT)
        if arch is not None or arch_kwargs:
            raise ValueError(f"{file} records its architecture; drop --arch / --arch-kwargs")
        module, spec = model_file.load_with_spec(file, trust_builder=trust_builder)
        return OpenedModel(module, LGCONV, spec=spec)
    if (arch is not None or arch_kwargs) and kind != TORCH_SAVE:
        raise ValueError(f"--arch is for plain state dicts, and {file} is a {kind}; drop --arch")
    if kind == EXPORTED:
        return _load_exported(file)
    if kind == TORCHSCRIPT:
        return _load_torchscript(file)
    return _load_torch_save(file, build, trust_pickle)
