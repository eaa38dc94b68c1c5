"""Re-estimate BatchNorm running statistics for the current weights (e.g. right after a projection). Pure torch."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified name: buffer}`` of every tracked BatchNorm's running statistics."""
    return {f"{name}.{key}": buffer for name, module in model.named_modules()
            if isinstance(module, BATCHNORMS) and module.track_running_stats
            for key, buffer in module.named_buffers(recurse=False)}


def recalibrate_batchnorm_(model: nn.Module, inputs: Iterable[torch.Tensor],
                           forward: Callable[[nn.Module, torch.Tensor], object] | None = None) -> int:
    """Reset every tracked BatchNorm's running mean/var and recompute them as the plain average over ``inputs``
    (forward passes in train mode, no grad; momentum restored afterwards). Weights are untouched and the
    model's train/eval mode is restored. Returns the number of batches used (0 leaves the statistics as they were).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    was_training = model.training
    used = 0
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for x in inputs:
                (forward or (lambda module, batch: module(batch)))(model, x)
                used += 1
    finally:
        for m, momentum, mean, var, count in saved:
            m.momentum = momentum
            if used == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        model.train(was_training)
    return used
