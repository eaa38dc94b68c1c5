"""The end of low-rank training, one path for the callback, export and the decompose-then-fine-tune baseline:
project the planned weights, re-estimate BatchNorm statistics for them, factorize a copy. Pure torch."""
from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn

from .batchnorm import recalibrate_batchnorm_
from .export import factorize_planned
from .options import LowRankOptions
from .activations import LayerStatistics
from .plan import LayerPlan, Plan
from .projection import LayerStats, project_planned_


def finish_(model: nn.Module, plans: Plan | list[LayerPlan], options: LowRankOptions | None = None,
            batches: Iterable[Any] = (), forward: Callable[[nn.Module, Any], Any] | None = None, seed: int = 0,
            synchronize: Callable[[nn.Module], None] | None = None,
            statistics: dict[str, LayerStatistics] | None = None) -> list[LayerStats]:
    """Project ``model``'s planned weights (a ``Plan``, or layer plans with their ``options``) in place
    (``statistics``: the layers' input statistics, needed by an ``Activation`` objective), call
    ``synchronize(model)`` if given (e.g. to share one process's weights under DDP), then re-estimate its BatchNorm statistics over ``batches`` (``forward(model,
    batch)``, default ``model(batch)``; torch's generators seeded with ``seed``; no batches: statistics kept).
    Returns the projection's ``LayerStats``."""
    stats = project_planned_(model, plans, options, statistics)
    if synchronize is not None:
        synchronize(model)
    recalibrate_batchnorm_(model, batches, forward, seed=seed)
    return stats


def finish(model: nn.Module, plans: Plan | list[LayerPlan], options: LowRankOptions | None = None,
           batches: Iterable[Any] = (), forward: Callable[[nn.Module, Any], Any] | None = None, seed: int = 0,
           synchronize: Callable[[nn.Module], None] | None = None,
           statistics: dict[str, LayerStatistics] | None = None) -> nn.Module:
    """``finish_`` (in place), then the factorized copy of ``model`` at ``plans``: its outputs are the projected
    model's, BatchNorm statistics included."""
    finish_(model, plans, options, batches, forward, seed, synchronize, statistics)
    return factorize_planned(model, plans, options)
