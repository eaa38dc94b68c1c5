"""Layer names that do not depend on ``torch.compile``: a compiled module holds the original under ``_orig_mod``, so
its layers are named ``net._orig_mod.conv2``; the canonical name ``net.conv2`` drops that segment. Plans, ranks and
saved files use canonical names, so they apply to plain and compiled models alike. Pure torch."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

COMPILED_SEGMENT = "_orig_mod"


def canonical_name(name: str) -> str:
    """``name`` without ``_orig_mod`` segments (``"net._orig_mod.conv2"`` -> ``"net.conv2"``)."""
    return ".".join(part for part in name.split(".") if part != COMPILED_SEGMENT)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{canonical name: module}`` of every module of ``model``; a compiled wrapper's name maps to the module it
    wraps (the wrapper comes first in ``named_modules`` and the wrapped module overwrites it)."""
    return {canonical_name(name): module for name, module in model.named_modules()}


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module named ``name`` (canonical or not); raises ``KeyError`` naming it."""
    modules = named_modules(model)
    key = canonical_name(name)
    if key not in modules:
        raise KeyError(f"`{name}` names no module of {type(model).__name__}")
    return modules[key]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module named ``name`` (canonical or not) by ``module``, inside a compiled wrapper if any."""
    parent_name, _, child = canonical_name(name).rpartition(".")
    setattr(get_module(model, parent_name), child, module)


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` keyed by canonical names."""
    return {canonical_name(key): value for key, value in model.state_dict().items()}


def load_canonical_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` where ``state_dict`` may use canonical names."""
    actual = {canonical_name(key): key for key in model.state_dict()}
    model.load_state_dict({actual.get(key, key): value for key, value in state_dict.items()}, strict=True)
