"""Build models by name: builders register themselves with ``@register_model`` (timm style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Builder) -> Builder:
    """Make ``builder`` available to :func:`create_model` under its function name."""
    name = builder.__name__
    if name in _BUILDERS and _BUILDERS[name] is not builder:
        raise ValueError(f"a model named {name!r} is already registered; give the builder another name")
    _BUILDERS[name] = builder
    return builder


def list_models() -> list[str]:
    """Names of all registered presets, sorted."""
    return sorted(_BUILDERS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the preset ``name`` with ``kwargs`` (e.g. ``num_classes=100``)."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; pick one of {', '.join(list_models())}")
    return builder(**kwargs)
