"""What the callback shares between the processes of a distributed fit."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..names import named_modules


def broadcast_weights(module: nn.Module, plans: list) -> None:
    """Under torch.distributed, every rank takes rank 0's projected weights of the planned layers (SVDs may differ
    in the last bits); a no-op on one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        modules = named_modules(module)
        for plan in plans:
            torch.distributed.broadcast(modules[plan.name].weight.data, src=0)


def made_on_rank_zero(strategy: Any, is_global_zero: bool, make: Callable[[], Any]) -> Any:
    """``make()`` run on global rank zero and broadcast by the Lightning ``strategy``; an error there is raised on
    every rank (a ValueError as itself, others as RuntimeError), instead of the others waiting forever."""
    made, failure = None, None
    if is_global_zero:
        try:
            made = make()
        except Exception as error:
            failure = (type(error), str(error))
    made, failure = strategy.broadcast((made, failure), src=0)
    if failure is not None:
        kind, message = failure
        raise (kind if issubclass(kind, ValueError) else RuntimeError)(message)
    return made
