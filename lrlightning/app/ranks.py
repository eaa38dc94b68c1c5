"""What a job factorizes: the ``LowRankProjection`` its ``lowrank`` config builds (scheme, rank rule, objective,
selection, and the callback's own settings, one owner each) and the plans of its model's ``backbone`` (layers and
ranks, named relative to the backbone it exports)."""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping

from hydra.utils import instantiate
from torch import nn

from ..training.callback import LowRankProjection
from ..options import LowRankOptions
from ..training.passes import Passes
from ..plan import LayerPlan, plan_layers, relative_plans
from ..rules import Budget

BACKBONE = "backbone"


def with_budget_defaults(node: Mapping[str, Any], datamodule, latency_batch_size: int) -> dict[str, Any]:
    """A ``lowrank`` config as a dict whose ``Budget`` rule (its ``rank`` node) on MACs or latency is completed
    where it gives none: ``input_shape`` from the datamodule's images (C, H, W), and for latency the job's
    ``latency_batch_size`` and the CPU as ``latency_device``."""
    node = dict(node)
    rule = node.get("rank")
    if isinstance(rule, Mapping) and rule.get("metric") in ("macs", "latency"):
        rule = dict(rule)
        if rule.get("input_shape") is None:
            rule["input_shape"] = [datamodule.in_channels, datamodule.image_size, datamodule.image_size]
        if rule["metric"] == "latency":
            rule.setdefault("latency_batch_size", latency_batch_size)
            if rule.get("latency_device") is None:
                rule["latency_device"] = "cpu"
        node["rank"] = rule
    return node


def projection_of(node: Mapping[str, Any], datamodule, latency_batch_size: int) -> LowRankProjection:
    """The ``LowRankProjection`` a ``lowrank`` config (a ``_target_`` node with nested ``_target_`` nodes for the
    scheme, rule and objective) builds, completed by ``with_budget_defaults``."""
    projection = instantiate(with_budget_defaults(node, datamodule, latency_batch_size), _convert_="all")
    if not isinstance(projection, LowRankProjection):
        raise ValueError(f"`lowrank` must build a lrlightning.LowRankProjection (its `_target_`), got "
                         f"{type(projection).__name__}")
    return projection


def backbone_plans(model: nn.Module, options: LowRankOptions, ranks: dict[str, Any] | None = None,
                   passes: Passes | None = None, seed: int = 0) -> list[LayerPlan]:
    """Plans named relative to ``model.backbone``: at ``ranks`` (named relative to ``model``, e.g. the ranks a
    callback saved in a checkpoint), else under the options' rank rule; a ``Budget`` under ``objective=
    "activation"`` is allocated from output errors on ``passes`` (``Activation.batches`` drawn with ``seed``), as
    the callback allocates it."""
    if ranks is not None:
        options = options.replace_rank(ranks)
    statistics = None
    if passes is not None and options.weighted and isinstance(options.rank, Budget):
        statistics = partial(passes.statistics, model, options=options, count=options.objective.batches, seed=seed)
    return relative_plans(plan_layers(model, options, statistics=statistics)[0], BACKBONE)
