"""Build a model's structure without allocating its weights: large tensors on meta, small ones real.

``torch.device("meta")`` alone breaks builders that read small tensors while building (timm's
drop-path schedules call ``.item()`` on a ``linspace``) and leaves buffers that no file holds
(non-persistent ones, e.g. a condensed layer's output order) without values. Under
:class:`Skeleton` every tensor factory runs on the meta device first; results up to
``SMALL_TENSOR_BYTES`` (within a total budget) are made for real, everything larger stays on meta.
Writes into parameters are skipped (the file supplies every parameter, so random init is wasted
work), the number of tensors made is capped and iterating over a huge tensor is refused, so
a builder argument such as ``depth=10**8`` stops with a ``ValueError`` instead of running out of
memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

SMALL_TENSOR_BYTES = 16 * 2**20
# In thrifty mode, any tensor larger than this stays on meta too: real ones cost allocations and
# page faults (a ResNet-152 skeleton: 180 ms against 60 ms) and are almost always weights, masks or
# statistics that the file overwrites.
THRIFTY_BYTES = 64 * 2**10
REAL_BUDGET_BYTES = 256 * 2**20

_FACTORIES = frozenset(
    {
        torch.empty,
        torch.empty_strided,
        torch.empty_permuted,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.arange,
        torch.range,
        torch.linspace,
        torch.logspace,
        torch.eye,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.tensor,
        torch.scalar_tensor,
        torch.tril_indices,
        torch.triu_indices,
        Tensor.new_empty,
        Tensor.new_zeros,
        Tensor.new_ones,
        Tensor.new_full,
        Tensor.new_tensor,
    }
)
_NOT_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_"})
_SPLITS = frozenset({Tensor.__iter__, Tensor.unbind, torch.unbind})
_MAX_SPLIT = 65_536  # iterating over a tensor builds one Python object per row


class TooManyTensors(ValueError):
    """The builder made more tensors than the checked file can account for."""


def _writes_parameter(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True for an in-place op or ``torch.nn.init`` function whose target is a parameter."""
    target = args[0] if args else kwargs.get("tensor")  # nn.init functions pass it by keyword
    if not isinstance(target, nn.Parameter):
        return False
    name = getattr(func, "__name__", "")
    if not name.endswith("_") or name.startswith("__") or name in _NOT_WRITES:
        return False
    return True


class Skeleton(TorchFunctionMode):
    """While active: factories make small tensors for real and large ones on meta; params are not written.

    ``max_tensors`` caps the factory calls (a ``TooManyTensors`` beyond it). ``thrifty`` keeps
    every tensor over ``THRIFTY_BYTES`` on meta. A value computed from a meta tensor is meta
    (or an error), never a wrong number, so a thrifty build is either right or visibly incomplete:
    a non-persistent buffer left on meta, or a builder error; build again without ``thrifty`` then.
    """

    def __init__(self, max_tensors: int, *, thrifty: bool = False) -> None:
        super().__init__()
        self.max_tensors = max_tensors
        self.thrifty = thrifty
        self.made = 0
        self.real_bytes = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES:
            self.made += 1
            if self.made > self.max_tensors:
                raise TooManyTensors(f"the builder made more than {self.max_tensors:,} tensors")
            meta = func(*args, **{**kwargs, "device": "meta"})
            if not isinstance(meta, Tensor) or str(kwargs.get("device")) == "meta":
                return meta
            size = meta.numel() * meta.element_size()
            small = THRIFTY_BYTES if self.thrifty else SMALL_TENSOR_BYTES
            if size > small or self.real_bytes + size > REAL_BUDGET_BYTES:
                return meta
            self.real_bytes += size
            return func(*args, **{**kwargs, "device": "cpu"})
        if func in _SPLITS and args and isinstance(args[0], Tensor) and args[0].dim():
            if args[0].shape[0] > _MAX_SPLIT:
                raise ValueError(
                    f"the builder iterates over a tensor of {args[0].shape[0]:,} rows, more than any "
                    "model's structure has (a builder argument is absurd)"
                )
        if _writes_parameter(func, args, kwargs):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``model`` still on the meta device."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named if tensor.is_meta]
