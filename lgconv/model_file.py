"""The lgconv model file: weights in safetensors, and in its metadata a JSON spec to rebuild the structure.

The spec names where the architecture comes from (``timm:NAME``, ``lgconv:PRESET`` or an importable
builder ``package.module:function``, with its keyword arguments), every lgconv layer's qualified
name, type and constructor config, and the input size when known. Loading checks before it
allocates: the header and spec are parsed with bounds, the model is built as a skeleton (large
tensors on the meta device, see ``lgconv.skeleton``), its state-dict names, shapes and dtypes are
compared with the header, and only then is the file's data mapped (once) and assigned to the model,
so nothing is randomly initialised and nothing is pickled. See docs/security.md.
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

from lgconv import safetensors_io
from lgconv.flops import default_input_size
from lgconv.layers.learned_group import LearnedGroupMixin
from lgconv.skeleton import Skeleton, TooManyTensors, meta_tensors

FORMAT = "lgconv"
VERSION = 1
METADATA_KEY = "lgconv"
# Functions defined in these packages build models only; any other builder needs trust_builder=True,
# because the spec would otherwise let a file call any importable function.
TRUSTED_BUILDER_PACKAGES = ("timm.models", "torchvision.models", "lgconv.models")
# Builder arguments that download or read other weights: the file already holds them.
_DOWNLOADING_KWARGS = ("pretrained", "weights", "weights_backbone", "pretrained_backbone", "checkpoint_path")
_DATA_PARALLEL = ("DistributedDataParallel", "DataParallel")
# Bounds on what a spec may declare; a real spec is a few kB to a few hundred kB.
_MAX_SPEC_BYTES = 4_000_000
_MAX_SPEC_DEPTH = 12
_MAX_LAYERS = 100_000
_MAX_NAME = 1000
_MAX_INPUT_ELEMENTS = 2**22  # the recorded input size is run through the model by ``lgconv flops``
# Builder arguments are numbers like num_classes, depth, img_size: larger ones are no real model,
# and a builder may make a Python list of that length before any tensor.
_MAX_ARCH_INT = 2**22
# What a hostile builder argument or layer config can make a builder raise.
_BUILD_ERRORS = (
    TypeError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    OverflowError,
    ZeroDivisionError,
    IndexError,
    KeyError,
    AttributeError,
    AssertionError,
)
_STATE_INTS = ("stage", "max_stage", "kept_inputs", "inputs", "index_length")


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
        """Parse and validate a spec: bounded JSON, every field of the expected type and range."""
        try:
            data = safetensors_io.parse_json(text, max_bytes=_MAX_SPEC_BYTES)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError("no lgconv format tag")
            version = data.get("version")
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError(f"version {version!r} is not a positive integer")
            if version > VERSION:
                raise _NewerFormat(
                    f"{source} was written by a newer lgconv (format version {version}, this "
                    f"lgconv reads up to {VERSION}); upgrade lgconv"
                )
            return cls(
                arch=_text(data.get("arch"), "arch", 300),
                arch_kwargs=_arch_kwargs(data.get("arch_kwargs")),
                layers=_records(data.get("layers")),
                input_size=_input_size(data.get("input_size")),
                training=_flag(data.get("training", False), "training"),
                dtype=_checked_dtype(data.get("dtype")),
                state_metadata=_state_metadata(data.get("state_metadata")),
                version=version,
            )
        except _NewerFormat:
            raise
        except ValueError as error:
            raise ValueError(f"{source} has a corrupt lgconv spec ({error}); re-save the model") from None


class _NewerFormat(ValueError):
    """The file's format version is newer than this lgconv reads."""


def _text(value: Any, what: str, longest: int) -> str:
    if not isinstance(value, str) or not value or len(value) > longest:
        raise ValueError(
            f"{what} must be a non-empty string of up to {longest} characters, got {value!r:.80}"
        )
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r:.80}")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object, got {type(value).__name__}")
    return value


def _arch_kwargs(value: Any) -> dict[str, Any]:
    kwargs = _object(value, "arch_kwargs")
    stack = [(key, item, 1) for key, item in kwargs.items()]
    while stack:
        key, item, depth = stack.pop()
        if depth > _MAX_SPEC_DEPTH:
            raise ValueError(f"arch_kwargs {key} is nested deeper than {_MAX_SPEC_DEPTH} levels")
        if isinstance(item, (int, float)) and not isinstance(item, bool) and abs(item) > _MAX_ARCH_INT:
            raise ValueError(f"arch_kwargs {key}={item!r} is absurdly large (over {_MAX_ARCH_INT:,})")
        if isinstance(item, dict):
            stack.extend((key, v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((key, v, depth + 1) for v in item)
    return kwargs


def _count(value: Any, what: str, lowest: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{what} must be an integer >= {lowest}, got {value!r:.80}")
    return value


def _input_size(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= 8:
        raise ValueError(f"input_size must be a list of 1 to 8 sizes, got {value!r:.80}")
    size = tuple(_count(s, "every input_size entry", 1) for s in value)
    elements = 1
    for s in size:
        elements *= s
        if elements > _MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"input_size {list(size)} is absurdly large (over {_MAX_INPUT_ELEMENTS:,} values)"
            )
    return size


def _layer_name(name: Any) -> str:
    if not isinstance(name, str) or len(name) > _MAX_NAME or (name and "" in name.split(".")):
        raise ValueError(f"layer name {name!r:.80} is not a dotted module name")
    return name


def _scalar_or_list(key: str, value: Any) -> Any:
    if isinstance(value, list):
        if len(value) > 8 or not all(v is None or isinstance(v, (int, float, str, bool)) for v in value):
            raise ValueError(f"config value {key!r} is not a short list of numbers")
    elif not (value is None or isinstance(value, (int, float, str, bool))):
        raise ValueError(f"config value {key!r} is a {type(value).__name__}, not a number, string or list")
    return value


_GEOMETRY_MINIMUM = {"kernel_size": 1, "stride": 1, "dilation": 1, "padding": 0}


def _checked_geometry(key: str, value: Any) -> Any:
    """A conv window field is a whole number (or a list of them) at its minimum or above, or for
    ``padding`` ``"same"`` / ``"valid"``: torch's constructors accept anything and only forward fails."""
    minimum = _GEOMETRY_MINIMUM.get(key)
    if minimum is None or (key == "padding" and value in ("same", "valid")):
        return value
    numbers = value if isinstance(value, list) and value else [value]
    if not all(type(n) is int and n >= minimum for n in numbers):
        raise ValueError(f"config value {key!r} is {value!r:.60}, not whole numbers >= {minimum}")
    return value


def _checked_state(value: Any) -> dict[str, Any]:
    state = _object(value, "a layer's state")
    for key in _STATE_INTS:
        if key in state:
            _count(state[key], f"state {key}")
    if "density" in state and (
        isinstance(state["density"], bool) or not isinstance(state["density"], (int, float))
    ):
        raise ValueError(f"state density must be a number, got {state['density']!r:.80}")
    if "finalized" in state:
        _flag(state["finalized"], "state finalized")
    return state


def _records(value: Any) -> tuple[LayerRecord, ...]:
    if not isinstance(value, list) or len(value) > _MAX_LAYERS:
        raise ValueError(f"layers must be a list of up to {_MAX_LAYERS:,} records")
    records, seen = [], set()
    for item in value:
        if not isinstance(item, dict):
            raise ValueError("a layer record is not an object")
        names = item.get("names")
        if not isinstance(names, list) or not names:
            raise ValueError("a layer record has no names")
        for name in map(_layer_name, names):
            if name in seen:
                raise ValueError(f"layer {name!r} is recorded twice")
            seen.add(name)
        config = _object(item.get("config"), "a layer's config")
        records.append(
            LayerRecord(
                tuple(names),
                _text(item.get("type"), "a layer's type", 100),
                {key: _checked_geometry(key, _scalar_or_list(key, v)) for key, v in config.items()},
                _checked_state(item.get("state")),
            )
        )
    return tuple(records)


def _state_metadata(value: Any) -> dict[str, dict[str, Any]]:
    metadata = _object(value, "state_metadata")
    for key, entries in metadata.items():
        if not isinstance(entries, dict) or not all(
            isinstance(v, (int, float, str, bool)) for v in entries.values()
        ):
            raise ValueError(f"state_metadata entry {key!r:.80} is not an object of numbers and strings")
    return metadata


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


class UntrustedBuilder(ValueError):
    """The spec names a builder outside the trusted packages and the caller did not trust it."""


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
        raise UntrustedBuilder(untrusted)
    try:
        target: Any = importlib.import_module(source)
        for part in name.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        raise ValueError(f"cannot import builder {arch!r}; install the package that provides it") from None
    if not trust_builder and not str(getattr(target, "__module__", "")).startswith(f"{package}."):
        raise UntrustedBuilder(untrusted)  # a name the module merely imported from elsewhere
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
    builder = _builder(arch, trust_builder)
    try:
        model = builder(**kwargs)
    except TooManyTensors:
        raise
    except _BUILD_ERRORS as error:
        raise ValueError(
            f"building {arch} with arch_kwargs {json.dumps(kwargs)[:200]} failed "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from None
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
        except TooManyTensors:
            raise
        except _BUILD_ERRORS as error:
            raise ValueError(
                f"{source} has a bad config for {record.names[0]!r} ({_first_line(error)}); re-save the model"
            ) from None
        for name in record.names:
            if name == "":
                model = layer
                continue
            parent_name, _, child = name.rpartition(".")
            try:
                parent = model.get_submodule(parent_name)
                if child not in parent._modules:
                    raise AttributeError(child)
            except AttributeError:
                raise ValueError(
                    f"{source} names layer {name!r}, which the base architecture does not have; "
                    "it was saved with another architecture or arch_kwargs"
                ) from None
            setattr(parent, child, layer)
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


Shapes = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def shapes_of(tensors: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of a state dict, the form :func:`check_fits` compares."""
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _difference(want: Shapes, have: Shapes) -> str:
    """'' when both have the same names, shapes and compatible dtypes, else the first of each difference.

    Floating tensors may be stored in another floating dtype (they are cast, as ``load_state_dict``
    would); any other dtype must match exactly.
    """
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    resized = [k for k in want if k in have and tuple(want[k][0]) != tuple(have[k][0])]
    retyped = [
        k
        for k in want
        if k in have
        and want[k][1] != have[k][1]
        and not (want[k][1].is_floating_point and have[k][1].is_floating_point)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0][:200]!r}")
    if resized:
        key = resized[0]
        problems.append(
            f"{len(resized)} of another shape, e.g. {key!r} {tuple(have[key][0])} "
            f"instead of {tuple(want[key][0])}"
        )
    if retyped:
        key = retyped[0]
        problems.append(
            f"{len(retyped)} of another dtype, e.g. {key!r} {_dtype_name(have[key][1])} "
            f"instead of {_dtype_name(want[key][1])}"
        )
    return "; ".join(problems)


def check_fits(model: nn.Module, shapes: Shapes, what: str) -> None:
    """Refuse, in one line naming the first difference, tensors that do not fit ``model``'s state dict."""
    difference = _difference(shapes_of(model.state_dict()), shapes)
    if difference:
        raise ValueError(f"the weights do not fit {what} ({difference})")


def _set_tensor(model: nn.Module, name: str, tensor: Tensor) -> None:
    owner, _, attribute = name.rpartition(".")
    module = model.get_submodule(owner)
    if attribute in module._parameters:
        module._parameters[attribute] = tensor  # type: ignore[assignment]
    else:
        module._buffers[attribute] = tensor


def assign_weights(
    model: nn.Module,
    tensors: Mapping[str, Tensor],
    what: str,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    allow_meta: bool = False,
) -> nn.Module:
    """Make ``tensors`` the model's parameters and buffers (no copy, no init), after :func:`check_fits`.

    Floating tensors of another floating dtype are cast to the model's; tensors the model ties
    (one tensor under several names) stay tied. Refuses a model left with tensors on the meta device
    (a non-persistent buffer too large to have been computed while building) unless ``allow_meta``.
    """
    expected = model.state_dict(keep_vars=True)
    check_fits(model, shapes_of(tensors), what)
    state: OrderedDict[str, Tensor] = OrderedDict()
    for key, target in expected.items():
        tensor = tensors[key]
        state[key] = tensor if tensor.dtype == target.dtype else tensor.to(target.dtype)
    state._metadata = dict(metadata or {})  # type: ignore[attr-defined]
    ties: dict[int, list[str]] = {}
    for key, target in expected.items():
        ties.setdefault(id(target), []).append(key)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except _BUILD_ERRORS as error:
        raise ValueError(f"the weights do not load into {what} ({_first_line(error)})") from None
    for names in ties.values():
        if len(names) > 1:
            first = model.state_dict(keep_vars=True)[names[0]]
            for name in names[1:]:
                _set_tensor(model, name, first)
    left = meta_tensors(model)
    if left and not allow_meta:
        raise ValueError(_meta_left(what, left[0]))
    return model


def _meta_left(what: str, name: str) -> str:
    return (
        f"{what} computes {name!r} while building, a buffer too large for lgconv to compute before "
        "checking the file (and not stored in it); build the model yourself and load_state_dict"
    )


def skeleton(
    arch: str,
    kwargs: Mapping[str, Any] | None,
    *,
    trust_builder: bool,
    tensors: int,
    layers: Sequence[LayerRecord] = (),
    dtype: str | None = None,
    source: str = "the spec",
    thrifty: bool = False,
) -> nn.Module:
    """``arch`` built with ``layers`` in place, weights on the meta device (see ``lgconv.skeleton``).

    ``tensors`` is how many tensors the file holds: a build making far more stops with a ValueError.
    ``thrifty`` keeps large constant fills on meta too (see :class:`lgconv.skeleton.Skeleton`).
    """
    limit = 8 * tensors + 10_000
    try:
        with Skeleton(limit, thrifty=thrifty):
            model = _replace_layers(build_arch(arch, kwargs, trust_builder=trust_builder), layers, source)
            if dtype is not None:
                model = model.to(getattr(torch, dtype))
    except TooManyTensors:
        raise ValueError(
            f"{source}: {arch} with arch_kwargs {json.dumps(dict(kwargs or {}))[:200]} makes more than "
            f"{limit:,} tensors while the file holds {tensors:,}; the arguments do not fit the file"
        ) from None
    return model


def _structure_check(model: nn.Module, spec: ModelSpec) -> None:
    """Fail at save time, not at load time, when ``spec`` does not rebuild ``model``'s state dict."""
    state = model.state_dict()
    rebuilt = skeleton(
        spec.arch,
        spec.arch_kwargs,
        trust_builder=True,
        tensors=len(state),
        layers=spec.layers,
        dtype=spec.dtype,
    )
    difference = _difference(shapes_of(rebuilt.state_dict()), shapes_of(state))
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


def write_atomic(path: str | os.PathLike[str], data: bytes, *more: bytes | memoryview) -> Path:
    """Write ``data`` and ``more`` to a temporary file beside ``path``, sync it, rename it over ``path``."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{target} is a directory; give a file name to write the model to")
    if not target.parent.is_dir():
        raise ValueError(f"folder {target.parent} does not exist; create it or write elsewhere")
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            for chunk in (data, *more):
                file.write(chunk)
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
    return write_atomic(path, *safetensors_io.aligned(data))


def is_lgconv_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a safetensors file carrying a well-formed lgconv spec (nothing is built)."""
    try:
        return _read(_existing(path))[1] is not None
    except (ValueError, OSError):
        return False


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The metadata of a safetensors file (header validated), None when the file is not safetensors at all."""
    header = safetensors_io.read_header(path)
    return None if header is None else header.metadata


def _read(file: Path) -> tuple[safetensors_io.Header, ModelSpec | None]:
    """The validated header and parsed spec of ``file``; ValueError when it is not safetensors."""
    header = safetensors_io.read_header(file)
    if header is None:
        raise ValueError(
            f"{file} is not an lgconv model file (not safetensors); save models with lgconv.save"
        )
    text = header.metadata.get(METADATA_KEY)
    return header, None if text is None else ModelSpec.from_json(text, str(file))


def _checked_skeleton(
    file: Path, header: safetensors_io.Header, spec: ModelSpec, trust_builder: bool, thrifty: bool = False
) -> nn.Module:
    """The spec's model as a skeleton, refused unless its state dict matches the header exactly.

    A thrifty build that fails is retried as a plain skeleton (see :class:`lgconv.skeleton.Skeleton`).
    """
    options = dict(
        trust_builder=trust_builder,
        tensors=len(header.tensors),
        layers=spec.layers,
        dtype=spec.dtype,
        source=str(file),
    )
    try:
        model = skeleton(spec.arch, spec.arch_kwargs, thrifty=thrifty, **options)
    except UntrustedBuilder:
        raise
    except ValueError:
        if not thrifty:
            raise
        model = skeleton(spec.arch, spec.arch_kwargs, **options)
    shapes = {name: (entry.shape, entry.dtype) for name, entry in header.tensors.items()}
    check_fits(model, shapes, f"{spec.arch} as recorded in {file}")
    return model


def read_spec(path: str | os.PathLike[str], *, trust_builder: bool = False) -> ModelSpec | None:
    """The spec of an lgconv file, checked against its header without reading any weights.

    None for a safetensors file without a spec. The check builds the architecture as a skeleton
    (nothing allocated for the weights) and compares its state dict with the header; a builder that
    needs ``trust_builder=True`` and did not get it is not run, so such a spec is returned unchecked.
    Raises ``ValueError`` for a file that is not safetensors, is corrupt, or does not fit its spec.
    """
    file = _existing(path)
    header, spec = _read(file)
    if spec is not None:
        try:
            _checked_skeleton(file, header, spec, trust_builder)
        except UntrustedBuilder:
            pass
    return spec


def _existing(path: str | os.PathLike[str]) -> Path:
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist; check the path")
    if file.is_dir():
        raise ValueError(f"{file} is a directory, not a model file; give the file inside it")
    return file


def read_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """All tensors of a safetensors file (header validated first), read in one pass."""
    file = _existing(path)
    header = safetensors_io.read_header(file)
    if header is None:
        raise ValueError(f"{file} is not a safetensors file; give a model file")
    return safetensors_io.read_data(file, header)


def _check_values(model: nn.Module, source: str) -> None:
    """Refuse condensing state and gather indices outside their range (a forward would fail or misread)."""
    known = tuple(layer_types().values())
    for name, module in model.named_modules():
        if not isinstance(module, known):
            continue
        where = name or "(model)"
        if isinstance(module, LearnedGroupMixin):
            inputs = module.weight.shape[1]
            if not 0 <= int(module.stage) <= module.max_stage or not 1 <= int(module.kept_inputs) <= inputs:
                raise ValueError(
                    f"{source} gives {where!r} stage {int(module.stage)} of {module.max_stage} keeping "
                    f"{int(module.kept_inputs)} of {inputs} inputs, which no condensing reaches; "
                    "re-save the model"
                )
        for buffer, bound in (("index", "in_channels"), ("index", "in_features"), ("order", "out_channels")):
            tensor, size = getattr(module, buffer, None), getattr(module, bound, None)
            if isinstance(tensor, Tensor) and isinstance(size, int) and tensor.numel():
                if int(tensor.min()) < 0 or int(tensor.max()) >= size:
                    raise ValueError(
                        f"{source} gives {where!r} a {buffer} outside 0..{size - 1}; re-save the model"
                    )


def load_with_spec(
    path: str | os.PathLike[str], *, trust_builder: bool = False
) -> tuple[nn.Module, ModelSpec]:
    """:func:`load`, also returning the file's spec (read once)."""
    file = _existing(path)
    header, spec = _read(file)
    if spec is None:
        raise ValueError(
            f"{path} holds plain weights without an lgconv spec; build the model yourself and "
            "load_state_dict(safetensors.torch.load_file(path)), or pass --arch on the command line"
        )
    what = f"{spec.arch} as recorded in {path}"
    model = _checked_skeleton(file, header, spec, trust_builder, thrifty=True)
    tensors = safetensors_io.read_data(file, header)
    assign_weights(model, tensors, what, spec.state_metadata, allow_meta=True)
    if meta_tensors(model):  # the thrifty build left a buffer uncomputed: build it in full
        model = _checked_skeleton(file, header, spec, trust_builder)
        assign_weights(model, tensors, what, spec.state_metadata)
    _check_values(model, str(file))
    if spec.input_size is not None:
        model.default_input_size = spec.input_size
    return model.train(spec.training), spec


def load(path: str | os.PathLike[str], *, trust_builder: bool = False) -> nn.Module:
    """Rebuild the model saved by :func:`save`: checked against the file before allocating, then assigned.

    The architecture and its lgconv layers are built as a skeleton (weights on the meta device), its
    state-dict names, shapes and dtypes are compared with the file's header, and only then are the
    weights read and made the model's tensors: no random init, nothing unpickled. A builder from a
    package outside ``TRUSTED_BUILDER_PACKAGES`` is called only with ``trust_builder=True``. The
    model comes back in the train/eval mode it was saved in, with ``default_input_size`` set when
    the file records it.
    """
    return load_with_spec(path, trust_builder=trust_builder)[0]
