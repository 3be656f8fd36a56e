"""Walking a module tree and swapping submodules in place, shared modules included."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn


def walk(
    root: nn.Module, stop: Callable[[nn.Module], bool], prefix: str = ""
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(qualified name, module)`` for every module once, not descending below ``stop``."""
    seen: set[int] = set()
    stack = [(prefix, root)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if stop(module):
            continue
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def replace(root: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Replace every reference to ``module`` (keyed by ``id``) below ``root``; return the new root."""
    if id(root) in replacements:
        return replacements[id(root)]
    for parent in list(root.modules()):
        # _modules, not named_children(): the latter yields a module registered twice only once
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return root
