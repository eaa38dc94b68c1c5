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
from .options import LowRankOptions
from .plan import LayerPlan, NonFiniteWeightError, plan_layers, scheme_for
from .schemes import Weighting, output_error, resolve_driver


@dataclass(frozen=True)
class LayerStats:
    """Result of projecting one layer: rank kept, ``rel_error`` = ||W - W'||_F / ||W||_F and
    ``energy`` = ||W'||_F² / ||W||_F² (both 0..1; they add up in squares for the orthogonal projection of
    ``objective="weight"``) and, when input statistics were given, ``output_rel_error`` = sqrt(E‖D(W − W')x‖² /
    E‖D·W·x‖²) over the layer's inputs x (centred when a BatchNorm normalizes the output; D: the BatchNorm scales
    under ``bn_weighting``, else I)."""

    name: str
    rank: int | tuple[int, int]
    rel_error: float
    energy: float
    output_rel_error: float | None = None


def host_lists(tensors: list[torch.Tensor]) -> list[list]:
    """Each 1-D tensor's values as a Python list, with one device-to-host transfer per device (not per tensor)."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        by_device[tensor.device].append(index)
    lists: list[list] = [[] for _ in tensors]
    for indices in by_device.values():
        values = torch.cat([tensors[i] for i in indices]).tolist()
        for i in indices:
            lists[i], values = values[:tensors[i].numel()], values[tensors[i].numel():]
    return lists


def check_statistics(plans: list[LayerPlan], statistics: dict[str, LayerStatistics] | None,
                     options: LowRankOptions) -> None:
    """Under ``objective="activation"``, raise naming the first planned layer without input statistics."""
    missing = [p.name for p in plans if statistics is None or p.name not in statistics]
    if options.weighted and missing:
        raise ValueError(f"`objective`='activation' needs the input statistics of layer {missing[0]!r}: pass batches "
                         "whose forward pass runs it (`calibration=` of project_ and factorize, `activation_batches` "
                         "of the callback, `statistics=gather_statistics(...)` of finish)")


def group_weighting(group: list[LayerPlan], statistics: dict[str, LayerStatistics] | None, options: LowRankOptions,
                    device: torch.device) -> Weighting | None:
    """The ``Weighting`` of a group of layers, None unless every one has statistics."""
    if statistics is None or any(p.name not in statistics for p in group):
        return None
    layers = [statistics[p.name] for p in group]
    scales = None
    if options.bn_weighting:
        scales = torch.stack([s.output_scale.to(device) if s.output_scale is not None
                              else torch.ones(p.shape[0], dtype=torch.float64, device=device)
                              for p, s in zip(group, layers)])
    return Weighting(torch.stack([s.input_metric.to(device) for s in layers]), scales, options.activation_ridge)


def project_planned_(model: nn.Module, plans: list[LayerPlan], options: LowRankOptions,
                     statistics: dict[str, LayerStatistics] | None = None) -> list[LayerStats]:
    """Overwrite each planned layer's weight by its low-rank projection, in place, under ``torch.no_grad``.

    Layers of equal shape, dtype and device share one batched decomposition, and the host waits for the device
    twice per device (finite check, statistics), not per layer. The decomposition runs in float32 whatever the
    weight's dtype (bf16/fp16 are cast back); parameters keep their identity, dtype and device.
    Raises ``NonFiniteWeightError`` naming the first layer holding NaN/Inf, before anything is written.
    ``statistics`` (``lrlightning.activations.input_statistics``, by layer name): needed by ``objective=
    "activation"``; with them every layer's ``output_rel_error`` is measured, under either objective.
    """
    check_statistics(plans, statistics, options)
    modules = named_modules(model)
    groups: dict[tuple, list[LayerPlan]] = defaultdict(list)
    for plan in plans:
        weight = modules[plan.name].weight
        groups[(plan.scheme, plan.shape, weight.dtype, weight.device)].append(plan)
    with torch.no_grad():
        batches = []
        for group in groups.values():
            weights = [modules[p.name].weight for p in group]
            batches.append((group, weights, torch.stack([w.detach().float() for w in weights])))
        finite = host_lists([torch.isfinite(stacked.flatten(1)).all(1) for _, _, stacked in batches])
        for (group, _, _), flags in zip(batches, finite):
            if not all(flags):
                raise NonFiniteWeightError(group[flags.index(False)].name)
        measured = []
        for group, weights, stacked in batches:
            scheme = scheme_for(group[0].shape, options)
            driver = resolve_driver(options.svd_driver, stacked.device)
            ranks = [p.rank for p in group]
            weighting = group_weighting(group, statistics, options, stacked.device)
            if options.weighted:
                approx = scheme.project_weighted(stacked, ranks, driver, weighting)
            else:
                approx = scheme.project(stacked, ranks, driver)
            for weight, new in zip(weights, approx):
                weight.copy_(new.to(weight.dtype))
            norms = stacked.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            errors = (stacked - approx).flatten(1).norm(dim=1) / norms
            outputs = output_error(stacked, approx, weighting).float() if weighting is not None \
                else torch.full_like(errors, float("nan"))
            measured.append(torch.cat([errors, (approx.flatten(1).norm(dim=1) / norms).pow(2), outputs]))
    stats = {}
    for (group, _, _), values in zip(batches, host_lists(measured)):
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
    return len(plan.shape) > 2 and scheme_for(plan.shape, options).input_statistic == "channels"


def empty_statistics(plan: LayerPlan, options: LowRankOptions, device: torch.device) -> LayerStatistics:
    """Zero statistics of the size ``gather_statistics`` gives ``plan``'s layer (a DDP rank whose passes did not
    run it)."""
    n = plan.shape[1] if weights_channels(plan, options) or len(plan.shape) == 2 else math.prod(plan.shape[1:])
    zeros = torch.zeros(n, n, dtype=torch.float64, device=device)
    return LayerStatistics(zeros, zeros.new_zeros(n), zeros.new_zeros(()))


def calibration_statistics(model: nn.Module, plans: list[LayerPlan], options: LowRankOptions,
                           calibration: Iterable[Any] | None,
                           forward: Callable[[nn.Module, Any], Any] | None) -> dict[str, LayerStatistics] | None:
    """Input statistics of the planned layers over ``calibration`` batches (``forward(model, batch)``, default
    ``model(batch)``), or None without batches; ``objective="activation"`` requires them."""
    if calibration is None:
        if options.weighted:
            raise ValueError("`objective`='activation' needs `calibration`: an iterable of input batches (e.g. a few "
                             "training batches; `forward(model, batch)` runs one, default `model(batch)`), got None")
        return None
    return gather_statistics(model, plans, options, calibration, forward)


def project_(model: nn.Module, scheme: str = "svd", rank=None, *, calibration: Iterable[Any] | None = None,
             forward: Callable[[nn.Module, Any], Any] | None = None, **options) -> list[LayerStats]:
    """Project the selected layers of ``model`` in place (see ``LowRankOptions`` for every option).

    ``calibration``/``forward``: batches whose forward passes give the input statistics of ``objective=
    "activation"`` (see ``calibration_statistics``); optional otherwise (then ``output_rel_error`` is measured).
    Returns one ``LayerStats`` per projected layer, in model order.
    """
    opts = LowRankOptions(scheme=scheme, rank=rank, **options)
    plans, _ = plan_layers(model, opts)
    return project_planned_(model, plans, opts, calibration_statistics(model, plans, opts, calibration, forward))
