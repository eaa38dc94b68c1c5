"""Optimizer state of projected weights. Pure torch."""
from __future__ import annotations

from typing import Iterable

import torch

FIRST_MOMENT_KEYS = ("momentum_buffer", "exp_avg")  # SGD momentum, Adam/AdamW first moment


def zero_first_moments(optimizers: Iterable[torch.optim.Optimizer], weights: Iterable[torch.Tensor]) -> None:
    """Zero the first-moment buffers (``FIRST_MOMENT_KEYS``) of ``weights`` in every optimizer; second moments
    are kept."""
    weights = set(weights)
    for optimizer in optimizers:
        for weight in weights & optimizer.state.keys():
            for key in FIRST_MOMENT_KEYS:
                buffer = optimizer.state[weight].get(key)
                if isinstance(buffer, torch.Tensor):
                    buffer.zero_()
