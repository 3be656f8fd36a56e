"""Reference networks built on lgconv, created by name with :func:`create_model`."""

from lgconv.models.condensenet import (
    CondenseNet,
    condensenet50,
    condensenet74,
    condensenet74_imagenet,
    condensenet86,
    condensenet98,
    condensenet110,
    condensenet122,
    condensenet182,
)
from lgconv.models.registry import create_model, list_models, register_model

__all__ = [
    "CondenseNet",
    "condensenet50",
    "condensenet74",
    "condensenet74_imagenet",
    "condensenet86",
    "condensenet98",
    "condensenet110",
    "condensenet122",
    "condensenet182",
    "create_model",
    "list_models",
    "register_model",
]
