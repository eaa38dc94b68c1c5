"""In-place projection of a model's selected weights onto their low-rank sets. Pure torch."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .activations import LayerStatistics, input_statistics
from .names import named_modules
from .objectives import WEIGHT, Activation, Objective
from .options import LowRankOptions, Selection, Solver, requested
from .rules import DEFAULT_RULE, Budget, RankRule
from .plan import LayerPlan, NonFiniteWeightError, Plan, layer_scheme, plan_layers, unpacked
from .schemes import Scheme, Weighting, resolve_driver
from .transfer import host_lists, moved


@dataclass(frozen=True)
class LayerStats:
    """Result of projecting one layer: rank kept, ``rel_error`` = ||W - W'||_F / ||W||_F and
    ``energy`` = ||W'||_F² / ||W||_F² (both 0..1; they add up in squares for the orthogonal projection of
    ``objective="weight"``) and, when input statistics were given, ``output_rel_error`` = sqrt(E‖D(W − W')x‖² /
    E‖D·W·x‖²) over the layer's inputs x (centred when a BatchNorm normalizes the output; D: the BatchNorm scales
    under ``Activation.bn_weighting``, else I)."""

    name: str
    rank: int | tuple[int, int]
    rel_error: float
    energy: float
    output_rel_error: float | None = None


def check_statistics(plans: list[LayerPlan], statistics: dict[str, LayerStatistics] | None,
                     options: LowRankOptions) -> None:
    """Under ``objective="activation"``, raise naming the first planned layer without input statistics."""
    missing = [p.name for p in plans if statistics is None or p.name not in statistics]
    if options.weighted and missing:
        raise ValueError(f"`objective`={options.objective} needs the input statistics of layer {missing[0]!r}: pass batches "
                         "whose forward pass runs it (`calibration=` of project_ and factorize, `Activation.batches` "
                         "of the callback, `statistics=gather_statistics(...)` of finish)")


def placed_weightings(groups: list[list[LayerPlan]], devices: list[torch.device],
                      statistics: dict[str, LayerStatistics] | None,
                      options: LowRankOptions) -> list[Weighting | None]:
    """The ``Weighting`` of each group of layers on its device of ``devices`` (None unless every layer of the
    group has statistics); the statistics travel with one copy per device and dtype (``moved``)."""
    usable = [statistics is not None and all(p.name in statistics for p in group) for group in groups]
    members = [(plan, device) for group, device, use in zip(groups, devices, usable) if use for plan in group]
    bn_weighting = options.weighted and options.objective.bn_weighting
    ridge = options.objective.ridge if options.weighted else Activation().ridge
    tensors = [statistics[plan.name].input_metric for plan, _ in members]
    if bn_weighting:
        tensors += [statistics[plan.name].output_scale if statistics[plan.name].output_scale is not None
                    else torch.ones(plan.shape[0], dtype=torch.float64, device=device) for plan, device in members]
    placed = moved(tensors, [device for _, device in members] * (2 if bn_weighting else 1))
    metrics, scales = placed[:len(members)], placed[len(members):]
    weightings, start = [], 0
    for group, use in zip(groups, usable):
        if not use:
            weightings.append(None)
            continue
        end = start + len(group)
        weightings.append(Weighting(torch.stack(metrics[start:end]),
                                    torch.stack(scales[start:end]) if bn_weighting else None, ridge))
        start = end
    return weightings


def project_planned_(model: nn.Module, plans: Plan | list[LayerPlan], options: LowRankOptions | None = None,
                     statistics: dict[str, LayerStatistics] | None = None) -> list[LayerStats]:
    """Overwrite each planned layer's weight (a ``Plan``, or layer plans with their ``options``) by its low-rank
    projection, in place, under ``torch.no_grad``.

    Layers of equal shape, dtype and device share one batched decomposition, on ``options.solver.device``
    (default: their own device). The host waits for the device once per device for the finite check and once
    for the statistics, plus whatever the decompositions themselves wait (on CUDA ``torch.linalg.svd``/``eigh``
    check their convergence on the host: once per group); on another projection device, the weights travel there
    in one copy per device and back without waiting. The decomposition runs in float32 whatever the weight's
    dtype (bf16/fp16 are cast back); parameters keep their identity, dtype and device.
    Raises ``NonFiniteWeightError`` naming the first layer holding NaN/Inf, before anything is written.
    ``statistics`` (``lrlightning.activations.input_statistics``, by layer name): needed by ``objective=
    "activation"``; with them every layer's ``output_rel_error`` is measured, under either objective.
    """
    plans, options = unpacked(plans, options)
    check_statistics(plans, statistics, options)
    modules = named_modules(model)
    grouped: dict[tuple, list[LayerPlan]] = defaultdict(list)
    for plan in plans:
        weight = modules[plan.name].weight
        grouped[(plan.scheme, plan.shape, plan.groups, weight.dtype, weight.device)].append(plan)
    groups = list(grouped.values())
    with torch.no_grad():
        weights = [[modules[p.name].weight for p in group] for group in groups]
        stacked = [torch.stack([w.detach().float() for w in group]) for group in weights]
        if options.solver.device is not None:
            stacked = moved(stacked, options.solver.device)
        devices = [tensor.device for tensor in stacked]
        finite = host_lists([torch.isfinite(tensor.flatten(1)).all(1) for tensor in stacked])
        for group, flags in zip(groups, finite):
            if not all(flags):
                raise NonFiniteWeightError(group[flags.index(False)].name)
        weightings = placed_weightings(groups, devices, statistics, options)
        measured, projected = [], []
        for group, original, weighting in zip(groups, stacked, weightings):
            scheme = layer_scheme(group[0], options)
            driver = resolve_driver(options.solver.driver, original.device)
            ranks = [p.rank for p in group]
            if options.weighted:
                approx = scheme.project_weighted(original, ranks, driver, weighting)
            else:
                approx = scheme.project(original, ranks, driver)
            projected.append(approx)
            norms = original.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            errors = (original - approx).flatten(1).norm(dim=1) / norms
            outputs = scheme.output_error(original, approx, weighting).float() if weighting is not None \
                else torch.full_like(errors, float("nan"))
            measured.append(torch.cat([errors, (approx.flatten(1).norm(dim=1) / norms).pow(2), outputs]))
        projected = moved(projected, [group[0].device for group in weights], non_blocking=True)
        for group, approx in zip(weights, projected):
            for weight, new in zip(group, approx):
                weight.copy_(new.to(weight.dtype))
    stats = {}
    for group, values in zip(groups, host_lists(measured)):
        count = len(group)
        for plan, error, energy, output in zip(group, values[:count], values[count:2 * count], values[2 * count:]):
            stats[plan.name] = LayerStats(plan.name, plan.rank, error, min(energy, 1.0),
                                          None if output != output else output)
    return [stats[p.name] for p in plans]


def gather_statistics(model: nn.Module, plans: list[LayerPlan], options: LowRankOptions, batches: Iterable[Any],
                      forward: Callable[[nn.Module, Any], Any] | None = None,
                      seed: int | None = None) -> dict[str, LayerStatistics]:
    """``input_statistics`` of the planned layers over ``batches``, each of the kind its scheme weights by
    (``Scheme.input_statistic``)."""
    channels = {p.name for p in plans if weights_channels(p, options)}
    return input_statistics(model, [p.name for p in plans], batches, forward, seed, channels)


def weights_channels(plan: LayerPlan, options: LowRankOptions) -> bool:
    """Whether ``plan``'s conv gathers its input pixels' channel moments rather than im2col moments."""
    return len(plan.shape) > 2 and layer_scheme(plan, options).input_statistic == "channels"


def empty_statistics(plan: LayerPlan, options: LowRankOptions, device: torch.device) -> LayerStatistics:
    """Zero statistics of the size ``gather_statistics`` gives ``plan``'s layer (a DDP rank whose passes did not
    run it)."""
    n = plan.shape[1] if weights_channels(plan, options) or len(plan.shape) == 2 else math.prod(plan.shape[1:])
    groups = (plan.groups,) if plan.groups > 1 else ()
    zeros = torch.zeros(*groups, n, n, dtype=torch.float64, device=device)
    return LayerStatistics(zeros, zeros.new_zeros(*groups, n), zeros.new_zeros(()))


def calibration_statistics(model: nn.Module, plans: list[LayerPlan], options: LowRankOptions,
                           calibration: Iterable[Any] | None,
                           forward: Callable[[nn.Module, Any], Any] | None) -> dict[str, LayerStatistics] | None:
    """Input statistics of the planned layers over ``calibration`` batches (``forward(model, batch)``, default
    ``model(batch)``; rows drawn with seed 0, so the same batches give the same statistics), or None without batches;
    ``objective="activation"`` requires them."""
    if calibration is None:
        if options.weighted:
            raise ValueError(f"`objective`={options.objective} needs `calibration`: an iterable of input batches (e.g. a few "
                             "training batches; `forward(model, batch)` runs one, default `model(batch)`), got None")
        return None
    return gather_statistics(model, plans, options, calibration, forward, seed=0)


def planned_with_statistics(model: nn.Module, options: LowRankOptions, calibration: Iterable[Any] | None,
                            forward: Callable[[nn.Module, Any], Any] | None) -> tuple[
        list[LayerPlan], dict[str, LayerStatistics] | None]:
    """The plans of ``model`` and the ``calibration`` statistics of their layers; under ``objective="activation"``
    a ``Budget`` is allocated from output errors, its statistics gathered once over every candidate layer."""
    if not (options.weighted and isinstance(options.rank, Budget) and calibration is not None):
        plans = plan_layers(model, options)[0]
        return plans, calibration_statistics(model, plans, options, calibration, forward)
    gathered: dict[str, LayerStatistics] = {}

    def gather(candidates: list[LayerPlan]) -> dict[str, LayerStatistics]:
        gathered.update(calibration_statistics(model, candidates, options, calibration, forward))
        return gathered

    return plan_layers(model, options, statistics=gather)[0], gathered


def project_(model: nn.Module, scheme: Scheme | str = "svd", rank: RankRule = DEFAULT_RULE, *,
             objective: Objective = WEIGHT, layers: Selection | None = None, solver: Solver | None = None,
             options: LowRankOptions | None = None, calibration: Iterable[Any] | None = None,
             forward: Callable[[nn.Module, Any], Any] | None = None) -> list[LayerStats]:
    """Project the selected layers of ``model`` in place; ``scheme``, ``rank``, ``objective``, ``layers`` and
    ``solver`` as in ``LowRankOptions``, or all of them in one ``options=LowRankOptions(...)``.

    ``calibration``/``forward``: batches whose forward passes (``forward(model, batch)``, default ``model(batch)``)
    give the input statistics of an ``Activation`` objective; optional otherwise (then ``output_rel_error`` is
    measured). Returns one ``LayerStats`` per projected layer, in model order.
    """
    opts = requested(options, scheme, rank, objective, layers, solver)
    plans, statistics = planned_with_statistics(model, opts, calibration, forward)
    return project_planned_(model, plans, opts, statistics)
