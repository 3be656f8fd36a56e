"""The lgconv model file: weights in safetensors, and in its metadata a JSON spec to rebuild the structure.

The spec names where the architecture comes from (``timm:NAME``, ``lgconv:PRESET`` or an importable
builder ``package.module:function``, with its keyword arguments), every lgconv layer's qualified
name, type and constructor config, and the input size when known. Loading builds the base model,
puts a fresh lgconv layer at every recorded name and loads the weights strictly: no pickled code.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lgconv.flops import default_input_size
from lgconv.layers.learned_group import LearnedGroupMixin

FORMAT = "lgconv"
VERSION = 1
METADATA_KEY = "lgconv"
# Functions defined in these packages build models only; any other builder needs trust_builder=True,
# because the spec would otherwise let a file call any importable function.
TRUSTED_BUILDER_PACKAGES = ("timm.models", "torchvision.models", "lgconv.models")
# Builder arguments that download or read other weights: the file already holds them.
_DOWNLOADING_KWARGS = ("pretrained", "weights", "weights_backbone", "pretrained_backbone", "checkpoint_path")
_SAFETENSORS_MAX_HEADER = 100_000_000
_DATA_PARALLEL = ("DistributedDataParallel", "DataParallel")


@dataclass(frozen=True)
class LayerRecord:
    """One lgconv layer of a saved model: its qualified name(s), type, config and condensing state."""

    names: tuple[str, ...]
    type: str
    config: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)


def _checked_dtype(name: Any) -> str | None:
    """A floating torch dtype name from the spec, refusing anything else (never getattr an arbitrary name)."""
    if name is None:
        return None
    if not isinstance(name, str) or not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    if not getattr(torch, name).is_floating_point:
        raise ValueError(f"dtype {name!r} is not floating point")
    return name


@dataclass(frozen=True)
class ModelSpec:
    """What is needed besides the weights to rebuild a saved model."""

    arch: str
    arch_kwargs: dict[str, Any]
    layers: tuple[LayerRecord, ...]
    input_size: tuple[int, ...] | None = None
    training: bool = False
    dtype: str | None = None  # the floating dtype of every weight, when not float32
    # The state dict's per-module ``_metadata`` (versions some modules' loading depends on).
    state_metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": self.version,
                "arch": self.arch,
                "arch_kwargs": self.arch_kwargs,
                "input_size": list(self.input_size) if self.input_size else None,
                "training": self.training,
                "dtype": self.dtype,
                "state_metadata": self.state_metadata,
                "layers": [
                    {"names": list(r.names), "type": r.type, "config": r.config, "state": r.state}
                    for r in self.layers
                ],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "the file") -> ModelSpec:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError("no lgconv format tag")
            if int(data["version"]) > VERSION:
                raise ValueError(
                    f"{source} was written by a newer lgconv (format version {data['version']}, this "
                    f"lgconv reads up to {VERSION}); upgrade lgconv"
                )
            layers = tuple(
                LayerRecord(tuple(r["names"]), str(r["type"]), dict(r["config"]), dict(r.get("state", {})))
                for r in data["layers"]
            )
            size = data.get("input_size")
            return cls(
                arch=str(data["arch"]),
                arch_kwargs=dict(data.get("arch_kwargs") or {}),
                layers=layers,
                input_size=tuple(int(s) for s in size) if size else None,
                training=bool(data.get("training", False)),
                dtype=_checked_dtype(data.get("dtype")),
                state_metadata={str(k): dict(v) for k, v in (data.get("state_metadata") or {}).items()},
                version=int(data["version"]),
            )
        except ValueError as error:
            if "newer lgconv" in str(error):
                raise
            raise ValueError(f"{source} has a corrupt lgconv spec ({error}); re-save the model") from None
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{source} has a corrupt lgconv spec (bad {error}); re-save the model") from None


def layer_types() -> dict[str, type[nn.Module]]:
    """Layer classes a file may name: those exported by ``lgconv.layers`` with ``config``/``from_config``."""
    from lgconv import layers

    types = {}
    for name in layers.__all__:
        cls = getattr(layers, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config"):
            types[name] = cls
    return types


def _layer_state(module: nn.Module) -> dict[str, Any]:
    """Condensing state shown by ``lgconv inspect`` (informational; the buffers hold the truth)."""
    if isinstance(module, LearnedGroupMixin):
        return {
            "stage": int(module.stage),
            "max_stage": module.max_stage,
            "kept_inputs": int(module.kept_inputs),
            "inputs": int(module.weight.shape[1]),
            "density": module.density,
            "finalized": False,
        }
    state: dict[str, Any] = {"finalized": True}
    kept = getattr(module, "kept_inputs", None)
    inputs = getattr(module, "in_channels", getattr(module, "in_features", None))
    index = getattr(module, "index", None)
    if isinstance(kept, int) and isinstance(inputs, int):
        state.update(kept_inputs=kept, inputs=inputs, density=kept / inputs)
    if isinstance(index, Tensor):
        state["index_length"] = index.numel()
    return state


def layer_records(model: nn.Module) -> tuple[LayerRecord, ...]:
    """Every lgconv layer of ``model`` once, with all the names it is reachable under."""
    known = set(layer_types().values())
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in known:
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    return tuple(
        LayerRecord(tuple(names[key]), type(module).__name__, module.config(), _layer_state(module))
        for key, module in modules.items()
    )


def _split_arch(arch: str) -> tuple[str, str]:
    source, sep, name = arch.partition(":")
    if not sep or not source or not name:
        raise ValueError(
            f"architecture {arch!r} is not of the form timm:NAME, lgconv:PRESET or package.module:function"
        )
    return source, name


def _builder(arch: str, trust_builder: bool) -> Callable[..., nn.Module]:
    source, name = _split_arch(arch)
    if source == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm architecture {name!r}; pick a name from timm.list_models()")
        return lambda **kwargs: timm.create_model(name, pretrained=False, **kwargs)
    if source == "lgconv":
        try:
            from lgconv.models import create_model
        except ImportError:
            raise ValueError(
                f"lgconv presets are not available in this installation, so {arch!r} cannot be built; "
                "upgrade lgconv"
            ) from None
        return lambda **kwargs: create_model(name, **kwargs)
    package = next((p for p in TRUSTED_BUILDER_PACKAGES if source == p or source.startswith(p + ".")), None)
    untrusted = (
        f"builder {arch!r} is not a public model builder of {', '.join(TRUSTED_BUILDER_PACKAGES)}; pass "
        "trust_builder=True (CLI: --trust-builder) only if you trust the file, since it names code to run"
    )
    if not trust_builder and (package is None or "." in name or name.startswith("_")):
        raise ValueError(untrusted)
    try:
        target: Any = importlib.import_module(source)
        for part in name.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        raise ValueError(f"cannot import builder {arch!r}; install the package that provides it") from None
    if not trust_builder and not str(getattr(target, "__module__", "")).startswith(f"{package}."):
        raise ValueError(untrusted)  # a name the module merely imported from elsewhere
    if not callable(target):
        raise ValueError(f"builder {arch!r} is not callable; name a function that returns an nn.Module")
    return target


def build_arch(
    arch: str, kwargs: Mapping[str, Any] | None = None, *, trust_builder: bool = False
) -> nn.Module:
    """Build the base model named by ``arch`` (``timm:NAME``, ``lgconv:PRESET`` or ``module:function``).

    Never downloads weights: arguments asking for pretrained weights are refused.
    """
    kwargs = dict(kwargs or {})
    downloading = [k for k in _DOWNLOADING_KWARGS if kwargs.get(k) not in (None, False)]
    if downloading:
        raise ValueError(
            f"arch_kwargs ask {arch!r} to fetch other weights ({downloading[0]}={kwargs[downloading[0]]!r}); "
            "drop it, the weights come from the file"
        )
    model = _builder(arch, trust_builder)(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"builder {arch!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _infer_arch(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """Where ``model`` comes from: an lgconv preset's ``lgconv_arch`` or a timm model's pretrained cfg."""
    preset = getattr(model, "lgconv_arch", None)
    if isinstance(preset, Mapping) and "name" in preset:
        return f"lgconv:{preset['name']}", dict(preset.get("kwargs") or {})
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        return f"timm:{cfg['architecture']}", {"num_classes": int(model.num_classes)}
    raise ValueError(
        f"cannot tell where the architecture of {type(model).__name__} comes from; pass "
        "arch='timm:NAME', 'lgconv:PRESET' or 'package.module:function' (and arch_kwargs) to save"
    )


def _arch_name(arch: str | Callable[..., nn.Module]) -> str:
    if isinstance(arch, str):
        _split_arch(arch)
        return arch
    name = f"{arch.__module__}:{arch.__qualname__}"
    if "<" in name:
        raise ValueError(f"builder {name} is not importable by name; pass a module-level function")
    return name


def _replace_layers(model: nn.Module, records: Sequence[LayerRecord], source: str) -> nn.Module:
    types = layer_types()
    for record in records:
        cls = types.get(record.type)
        if cls is None:
            raise ValueError(
                f"{source} uses layer type {record.type!r}, unknown to this lgconv; upgrade lgconv"
            )
        try:
            layer = cls.from_config(record.config)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{source} has a bad config for {record.names[0]!r} ({error}); re-save the model"
            ) from None
        for name in record.names:
            if name == "":
                model = layer
                continue
            parent_name, _, child = name.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
            except AttributeError:
                raise ValueError(
                    f"{source} names layer {name!r}, which the base architecture does not have; "
                    "it was saved with another architecture or arch_kwargs"
                ) from None
            setattr(parent, child, layer)
    return model


def _difference(want: Mapping[str, Tensor], have: Mapping[str, Tensor]) -> str:
    """'' when both state dicts have the same keys and shapes, else one example of what differs."""
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    resized = [k for k in want if k in have and tuple(want[k].shape) != tuple(have[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]!r}")
    if resized:
        key = resized[0]
        problems.append(
            f"{len(resized)} of another shape, e.g. {key!r} {tuple(have[key].shape)} "
            f"instead of {tuple(want[key].shape)}"
        )
    return "; ".join(problems)


def load_weights(model: nn.Module, state: Mapping[str, Tensor], what: str) -> nn.Module:
    """``load_state_dict(strict=True)`` with one clear line when the keys or shapes do not fit."""
    difference = _difference(model.state_dict(), state)
    if difference:
        raise ValueError(f"the weights do not fit {what} ({difference})")
    model.load_state_dict(state, strict=True)
    return model


def _rebuild(spec: ModelSpec) -> nn.Module:
    """The structure of ``spec`` without weights: on the meta device when the builder allows it."""
    try:
        with torch.device("meta"):
            base = build_arch(spec.arch, spec.arch_kwargs, trust_builder=True)
    except (RuntimeError, NotImplementedError):  # some builders read tensor values while building
        base = build_arch(spec.arch, spec.arch_kwargs, trust_builder=True)
    return _replace_layers(base, spec.layers, "the spec")


def _structure_check(model: nn.Module, spec: ModelSpec) -> None:
    """Fail at save time, not at load time, when ``spec`` does not rebuild ``model``'s state dict."""
    difference = _difference(model.state_dict(), _rebuild(spec).state_dict())
    if difference:
        raise ValueError(
            f"{spec.arch} with arch_kwargs {spec.arch_kwargs} does not rebuild this {type(model).__name__} "
            f"({difference}); pass the arch= and arch_kwargs= the model was built with"
        )


def _json_metadata(metadata: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The JSON-representable part of a state dict's ``_metadata`` (module versions)."""
    kept: dict[str, dict[str, Any]] = {}
    for prefix, entries in (metadata or {}).items():
        values = {k: v for k, v in entries.items() if isinstance(v, (int, float, str, bool))}
        if values:
            kept[prefix] = values
    return kept


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state dict as contiguous CPU tensors, tied tensors copied (safetensors refuses shared memory)."""
    seen: set[int] = set()
    tensors = {}
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        tensors[key] = tensor
    return tensors


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, sync it, then rename it over ``path``."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{target} is a directory; give a file name to write the model to")
    if not target.parent.is_dir():
        raise ValueError(f"folder {target.parent} does not exist; create it or write elsewhere")
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return target


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP, DataParallel or torch.compile wrappers (which prefix every state-dict key)."""
    while True:
        inner = model._modules.get("module") if type(model).__name__ in _DATA_PARALLEL else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str | Callable[..., nn.Module] | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    input_size: Sequence[int] | None = None,
) -> Path:
    """Save ``model`` (masked, partly or fully finalized) as one safetensors file with an lgconv spec.

    ``arch`` defaults to what the model says about itself (lgconv presets, timm models); the spec is
    checked at save time by rebuilding it on the meta device, so a file that saves also loads.
    The write is atomic: on any error nothing is left at ``path``.
    """
    from safetensors.torch import save as serialize

    if not isinstance(model, nn.Module):
        raise TypeError(f"save needs an nn.Module, got {type(model).__name__}")
    model = _unwrapped(model)
    if arch is None:
        name, inferred = _infer_arch(model)
    else:
        name, inferred = _arch_name(arch), {}
    kwargs = {**inferred, **dict(arch_kwargs or {})}
    for key in _DOWNLOADING_KWARGS:
        kwargs.pop(key, None)
    try:
        json.dumps(kwargs)
    except TypeError:
        raise ValueError(
            f"arch_kwargs must be JSON values (numbers, strings, lists, dicts), got {kwargs}"
        ) from None
    size = tuple(int(s) for s in input_size) if input_size is not None else default_input_size(model)
    state = model.state_dict()
    floating = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = str(floating.pop()).removeprefix("torch.") if len(floating) == 1 else None
    spec = ModelSpec(
        name,
        kwargs,
        layer_records(model),
        size,
        training=model.training,
        dtype=None if dtype == "float32" else dtype,
        state_metadata=_json_metadata(getattr(state, "_metadata", None)),
    )
    _structure_check(model, spec)
    data = serialize(_tensors(model), metadata={"format": "pt", METADATA_KEY: spec.to_json()})
    return write_atomic(path, data)


def is_lgconv_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a safetensors file carrying an lgconv spec."""
    try:
        return read_spec(path) is not None
    except (ValueError, OSError):
        return False


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a safetensors file, None when the file is not safetensors at all."""
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            return None
        length = int.from_bytes(head, "little")
        if not 2 <= length <= _SAFETENSORS_MAX_HEADER or file.read(1) != b"{":
            return None
        try:
            header = json.loads(b"{" + file.read(length - 1))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is a corrupt or truncated safetensors file; re-save it") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is a corrupt safetensors file (header is not an object); re-save it")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise ValueError(f"{path} is a corrupt safetensors file (bad tensor entry); re-save it") from None
    if path.stat().st_size < 8 + length + end:
        raise ValueError(f"{path} is a corrupt or truncated safetensors file (data cut short); re-save it")
    return dict(header.get("__metadata__") or {})


def read_spec(path: str | os.PathLike[str]) -> ModelSpec | None:
    """The spec of an lgconv file without loading weights; None for a safetensors file without one.

    Raises ``ValueError`` for a file that is not safetensors at all.
    """
    file = _existing(path)
    metadata = safetensors_metadata(file)
    if metadata is None:
        raise ValueError(
            f"{file} is not an lgconv model file (not safetensors); save models with lgconv.save"
        )
    text = metadata.get(METADATA_KEY)
    return None if text is None else ModelSpec.from_json(text, str(file))


def _existing(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist; check the path")
    if file.is_dir():
        raise ValueError(f"{file} is a directory, not a model file; give the file inside it")
    return file


def read_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """All tensors of a safetensors file, with one clear error when the file is corrupt or truncated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = _existing(path)
    try:
        return load_file(file)
    except (SafetensorError, RuntimeError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{file} is a corrupt or truncated safetensors file ({reason}); re-save it"
        ) from None


def load(path: str | os.PathLike[str], *, trust_builder: bool = False) -> nn.Module:
    """Rebuild the model saved by :func:`save`: base architecture, lgconv layers, weights (strict).

    Nothing is unpickled. A builder from a package outside ``TRUSTED_BUILDER_PACKAGES`` is called
    only with ``trust_builder=True``. The model comes back in the train/eval mode it was saved in,
    with ``default_input_size`` set when the file records it.
    """
    spec = read_spec(path)
    if spec is None:
        raise ValueError(
            f"{path} holds plain weights without an lgconv spec; build the model yourself and "
            "load_state_dict(safetensors.torch.load_file(path)), or pass --arch on the command line"
        )
    tensors = read_tensors(path)
    model = _replace_layers(
        build_arch(spec.arch, spec.arch_kwargs, trust_builder=trust_builder), spec.layers, str(path)
    )
    if spec.dtype is not None:
        model = model.to(getattr(torch, spec.dtype))
    state = OrderedDict(tensors)
    state._metadata = spec.state_metadata  # type: ignore[attr-defined]
    load_weights(model, state, f"{spec.arch} as recorded in {path}")
    if spec.input_size is not None:
        model.default_input_size = spec.input_size
    return model.train(spec.training)
