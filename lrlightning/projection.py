"""In-place projection of a model's selected weights onto their low-rank sets. Pure torch."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .names import named_modules
from .options import LowRankOptions
from .plan import LayerPlan, NonFiniteWeightError, plan_layers, scheme_for
from .schemes import resolve_driver


@dataclass(frozen=True)
class LayerStats:
    """Result of projecting one layer: rank kept, ``rel_error`` = ||W - W'||_F / ||W||_F and
    ``energy`` = ||W'||_F² / ||W||_F² (both 0..1; the projection is orthogonal, so they add up in squares)."""

    name: str
    rank: int | tuple[int, int]
    rel_error: float
    energy: float


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


def project_planned_(model: nn.Module, plans: list[LayerPlan], options: LowRankOptions) -> list[LayerStats]:
    """Overwrite each planned layer's weight by its low-rank projection, in place, under ``torch.no_grad``.

    Layers of equal shape, dtype and device share one batched decomposition, and the host waits for the device
    twice per device (finite check, statistics), not per layer. The decomposition runs in float32 whatever the
    weight's dtype (bf16/fp16 are cast back); parameters keep their identity, dtype and device.
    Raises ``NonFiniteWeightError`` naming the first layer holding NaN/Inf, before anything is written.
    """
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
            approx = scheme.project(stacked, [p.rank for p in group], driver)
            for weight, new in zip(weights, approx):
                weight.copy_(new.to(weight.dtype))
            norms = stacked.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            errors = (stacked - approx).flatten(1).norm(dim=1) / norms
            measured.append(torch.cat([errors, (approx.flatten(1).norm(dim=1) / norms).pow(2)]))
    stats = {}
    for (group, _, _), values in zip(batches, host_lists(measured)):
        for plan, error, energy in zip(group, values[:len(group)], values[len(group):]):
            stats[plan.name] = LayerStats(plan.name, plan.rank, error, min(energy, 1.0))
    return [stats[p.name] for p in plans]


def project_(model: nn.Module, scheme: str = "svd", rank=None, **options) -> list[LayerStats]:
    """Project the selected layers of ``model`` in place (see ``LowRankOptions`` for every option).

    Returns one ``LayerStats`` per projected layer, in model order.
    """
    opts = LowRankOptions(scheme=scheme, rank=rank, **options)
    plans, _ = plan_layers(model, opts)
    return project_planned_(model, plans, opts)
