"""Which layers of a trained model a job factorizes, and at which ranks, keyed relative to its ``backbone``."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..options import LowRankOptions
from ..plan import frozen_ranks, plan_layers

PREFIX = "backbone."


def backbone_ranks(ranks: dict[str, Any]) -> dict[str, Any]:
    """Layer ranks keyed relative to the LightningModule -> keyed relative to its ``backbone``."""
    outside = [name for name in ranks if not name.startswith(PREFIX)]
    if outside:
        raise ValueError(f"low-rank layers outside `backbone` cannot be exported: {outside}")
    return {name[len(PREFIX):]: rank for name, rank in ranks.items()}


def export_ranks(model: nn.Module, options: LowRankOptions, ranks: dict[str, Any] | None = None) -> dict[str, Any]:
    """The backbone's layers to factorize and their ranks: ``ranks`` keyed relative to ``model`` (a callback's or a
    checkpoint's, e.g. ``{"backbone.conv1": 8}``), else the plan of ``options`` on ``model``."""
    if ranks is None:
        ranks = frozen_ranks(plan_layers(model, options)[0])
    return backbone_ranks(ranks)


def factorize_args(options: LowRankOptions, ranks: dict[str, Any]) -> dict[str, Any]:
    """``factorize``/``project_`` arguments that reproduce a plan on the backbone exactly."""
    return dict(scheme=options.scheme, rank=ranks, tile_shape=options.tile_shape, include=list(ranks),
                linear=options.linear, hooi_iters=options.hooi_iters, svd_driver=options.svd_driver)
