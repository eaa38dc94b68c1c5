"""Re-estimate BatchNorm running statistics for the current weights (e.g. right after a projection). Pure torch."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, BATCHNORMS) and m.track_running_stats]


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{qualified name: buffer}`` of every tracked BatchNorm's running statistics."""
    return {f"{name}.{key}": buffer for name, module in model.named_modules()
            if isinstance(module, BATCHNORMS) and module.track_running_stats
            for key, buffer in module.named_buffers(recurse=False)}


@contextlib.contextmanager
def seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """Inside the block torch's CPU generator and that of ``device`` (when CUDA) are seeded with ``seed`` (None:
    left as they are); both are restored after it."""
    device = torch.device(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
        yield


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Every submodule's train/eval mode is as it was after the block (a frozen submodule in eval mode stays so)."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def kept_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """Every tracked BatchNorm's running statistics are as they were after the block (passes in train mode)."""
    saved = [(buffer, buffer.detach().clone()) for buffer in batchnorm_buffers(model).values()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def recalibrate_batchnorm_(model: nn.Module, inputs: Iterable[Any],
                           forward: Callable[[nn.Module, Any], object] | None = None, seed: int | None = None) -> int:
    """Reset every tracked BatchNorm's running mean/var and recompute them as the plain average over ``inputs``
    (``forward(model, item)``, default ``model(item)``; train mode, no grad; momentum restored afterwards).
    Weights are untouched and every submodule's train/eval mode is restored (a frozen submodule left in eval mode
    stays so). With ``seed``, torch's CPU generator and
    that of the model's CUDA device are seeded for the passes (dropout, random transforms) and restored after,
    so the statistics are reproducible.
    Returns the number of batches used (0 leaves the statistics as they were).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    used = 0
    try:
        with kept_modes(model):
            for m in layers:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            with torch.no_grad(), seeded(layers[0].running_mean.device, seed):
                for item in inputs:
                    (forward or (lambda module, batch: module(batch)))(model, item)
                    used += 1
    finally:
        for m, momentum, mean, var, count in saved:
            m.momentum = momentum
            if used == 0:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
    return used
