"""What a job factorizes: the low-rank options of its ``lowrank`` config and the plans of its model's ``backbone``
(layers and ranks, named relative to the backbone it exports)."""
from __future__ import annotations

import inspect
from typing import Any, Mapping

from torch import nn

from ..callback import LowRankProjection
from ..options import LowRankOptions, is_int
from ..plan import LayerPlan, plan_layers, relative_plans

BACKBONE = "backbone"


def with_budget_defaults(node: Mapping[str, Any], datamodule, latency_batch_size: int) -> dict[str, Any]:
    """A ``lowrank`` config as a dict, completed for a MAC or latency budget: ``input_shape`` from the datamodule's
    images (C, H, W), and for latency the job's ``latency_batch_size`` and the CPU as ``latency_device``, where the
    config gives none."""
    node = dict(node)
    if node.get("budget") is not None and node.get("budget_metric") in ("macs", "latency"):
        if node.get("input_shape") is None:
            node["input_shape"] = [datamodule.in_channels, datamodule.image_size, datamodule.image_size]
        if node["budget_metric"] == "latency":
            node.setdefault("latency_batch_size", latency_batch_size)
            if node.get("latency_device") is None:
                node["latency_device"] = "cpu"
    return node


def lowrank_options(node: Mapping[str, Any]) -> LowRankOptions:
    """The ``LowRankOptions`` of a ``lowrank`` config (``LowRankProjection``'s arguments: scheme, rank rule, layer
    selection); the callback's schedule and stabilizers are left out."""
    fields = LowRankOptions.__dataclass_fields__
    return LowRankOptions(**{key: value for key, value in node.items() if key in fields})


def callback_setting(node: Mapping[str, Any], name: str) -> Any:
    """The ``LowRankProjection`` argument ``name`` of a ``lowrank`` config (the callback's default when unset)."""
    return node.get(name, inspect.signature(LowRankProjection).parameters[name].default)


def recalibration_batches(node: Mapping[str, Any]) -> int:
    """``bn_recalibration_batches`` of a ``lowrank`` config (the callback's default when unset)."""
    count = callback_setting(node, "bn_recalibration_batches")
    if not (is_int(count) and count >= 0):
        raise ValueError(f"`lowrank.bn_recalibration_batches` must be an int >= 0, got {count!r}")
    return count


def backbone_plans(model: nn.Module, options: LowRankOptions, ranks: dict[str, Any] | None = None) -> list[LayerPlan]:
    """Plans named relative to ``model.backbone``: at ``ranks`` (named relative to ``model``, e.g. the ranks a
    callback saved in a checkpoint), else under the options' rank rule."""
    if ranks is not None:
        options = options.replace_rank(ranks)
    return relative_plans(plan_layers(model, options)[0], BACKBONE)
