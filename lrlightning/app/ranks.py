"""What a job factorizes: the ``LowRankProjection`` its ``lowrank`` config builds (scheme, rank rule, objective,
selection, and the callback's own settings, one owner each) and the plans of its model's ``backbone`` (layers and
ranks, named relative to the backbone it exports)."""
from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Mapping, Sequence

from hydra.utils import instantiate
from torch import nn

from ..training.callback import LowRankProjection
from ..options import LowRankOptions
from ..training.passes import Passes
from ..plan import Plan, allocate_plan
from ..rules import FLAT_LATENCY, LATENCY_FIELDS, Budget, Latency

BACKBONE = "backbone"


def check_batch_sizes(value) -> None:
    """Raise a ValueError unless the job's ``latency_batch_sizes`` is a list that ``Latency.batch_sizes`` takes."""
    try:
        valid = isinstance(value, Sequence) and not isinstance(value, str) and bool(Latency(batch_sizes=tuple(value)))
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"`latency_batch_sizes` must be a list of distinct ints >= 1, such as [32] or [1,32], got "
                         f"{value!r}")


def with_budget_defaults(node: Mapping[str, Any], datamodule, latency_batch_sizes: Sequence[int]) -> dict[str, Any]:
    """A ``lowrank`` config as a dict whose ``Budget`` rule (its ``rank`` node) on MACs or latency is completed
    where it gives none: ``input_shape`` from the datamodule's images (C, H, W); for latency the job's
    ``latency_batch_sizes`` (their one owner: a rule naming others is refused) and the CPU as the ``Latency``
    device. A rule spelling its latency fields flat (``latency_batch_size``, ...) has them moved into ``latency``,
    with a DeprecationWarning."""
    node = dict(node)
    rule = node.get("rank")
    if isinstance(rule, Mapping) and rule.get("metric") in ("macs", "latency"):
        rule = dict(rule)
        if rule.get("input_shape") is None:
            rule["input_shape"] = [datamodule.in_channels, datamodule.image_size, datamodule.image_size]
        if rule["metric"] == "latency":
            latency = {key: value for key, value in dict(rule.get("latency") or {}).items() if key != "_target_"}
            flat = {key: rule.pop(key) for key in FLAT_LATENCY if key in rule}
            if flat:
                warnings.warn(f"`lowrank.rank` spells {', '.join(flat)} flat, which is deprecated: give them under "
                              f"`lowrank.rank.latency` ({', '.join(LATENCY_FIELDS)})", DeprecationWarning)
                latency.update({FLAT_LATENCY[key]: value for key, value in flat.items() if value is not None})
            sizes = latency.get("batch_sizes")
            if sizes is not None and list(Latency(batch_sizes=sizes).batch_sizes) != list(latency_batch_sizes):
                raise ValueError(f"`lowrank.rank.latency.batch_sizes`={sizes!r} differs from the job's "
                                 f"`latency_batch_sizes`={list(latency_batch_sizes)}: the job's setting owns the "
                                 f"latency batch sizes; set `latency_batch_sizes` only")
            latency["batch_sizes"] = list(latency_batch_sizes)
            if latency.get("device") is None:
                latency["device"] = "cpu"
            rule["latency"] = {"_target_": "lrlightning.Latency", **latency}
        node["rank"] = rule
    return node


def projection_of(node: Mapping[str, Any], datamodule, latency_batch_sizes: Sequence[int]) -> LowRankProjection:
    """The ``LowRankProjection`` a ``lowrank`` config (a ``_target_`` node with nested ``_target_`` nodes for the
    scheme, rule and objective) builds, completed by ``with_budget_defaults``."""
    projection = instantiate(with_budget_defaults(node, datamodule, latency_batch_sizes), _convert_="all")
    if not isinstance(projection, LowRankProjection):
        raise ValueError(f"`lowrank` must build a lrlightning.LowRankProjection (its `_target_`), got "
                         f"{type(projection).__name__}")
    return projection


def backbone_plan(model: nn.Module, options: LowRankOptions, ranks: dict[str, Any] | None = None,
                  passes: Passes | None = None, seed: int = 0) -> Plan:
    """The ``Plan`` of ``options`` on ``model``, named relative to ``model.backbone``: at ``ranks`` (named relative
    to ``model``, e.g. the ranks a callback saved in a checkpoint), else under the options' rank rule; a ``Budget``
    under ``objective="activation"`` is allocated from output errors on ``passes`` (``Activation.batches`` drawn
    with ``seed``), as the callback allocates it. The plan keeps ``options`` as asked (its rank rule, not
    ``ranks``)."""
    chosen = options if ranks is None else options.replace_rank(ranks)
    statistics = None
    if passes is not None and chosen.weighted and isinstance(chosen.rank, Budget):
        statistics = partial(passes.statistics, model, options=chosen, count=chosen.objective.batches, seed=seed)
    layers, skipped, allocation = allocate_plan(model, chosen, statistics=statistics)
    return Plan(options, layers, skipped, allocation).relative(BACKBONE)
