"""A global budget: the ranks of all selected layers chosen together, so that the whole model is ``budget`` times
smaller in parameters or MACs, spending rank where it lowers the approximation error most. Lagrangian rank
selection (Idelbayev & Carreira-Perpiñán, CVPR 2020): for a price λ every layer takes the candidate minimizing
normalized error + λ·cost, "stay dense" included; λ is bisected until the model meets the budget. Pure torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .counting import count_macs, count_params
from .schemes import Rank, Scheme
from .speed import layer_inputs

MAX_CANDIDATES = 32  # ranks tried per layer, evenly spread from the largest that shrinks to 1


@dataclass(frozen=True)
class LayerChoices:
    """One layer's candidates: ``ranks`` (None keeps it dense), their normalized squared weight error
    ||W − W_r||² / ||W||² and their cost (parameters or MACs per sample, of the weight only)."""

    name: str
    ranks: tuple[Rank | None, ...]
    errors: tuple[float, ...]
    costs: tuple[float, ...]


def spread(candidates: Sequence[Rank], count: int) -> list[Rank]:
    """At most ``count`` of ``candidates`` (largest first), evenly spaced, the first and last kept."""
    if len(candidates) <= count:
        return list(candidates)
    step = (len(candidates) - 1) / (count - 1)
    return [candidates[round(i * step)] for i in range(count)]


def layer_choices(name: str, module: nn.Module, scheme: Scheme, metric: str, input_shape: tuple[int, ...] | None,
                  driver: str) -> LayerChoices:
    """The candidates of one layer: every rank whose factorized form is smaller than the dense one (at most
    ``MAX_CANDIDATES``), and dense. ``input_shape`` is the layer's own input (C, H, W) for ``metric="macs"``."""
    weight = module.weight.detach().float()
    shape = tuple(weight.shape)
    dense_params = math.prod(shape)
    shrinking = [r for r in scheme.rank_candidates(shape) if scheme.factorized_params(shape, r) < dense_params]
    ranks = spread(shrinking, MAX_CANDIDATES)
    errors = []
    if ranks:
        with torch.no_grad():
            approx = scheme.project(weight.unsqueeze(0).expand(len(ranks), *shape).contiguous(), ranks, driver)
        errors = ((approx - weight).flatten(1).pow(2).sum(1) / weight.pow(2).sum().clamp_min(1e-30)).tolist()
    if metric == "params":
        costs = [scheme.factorized_params(shape, r) for r in ranks] + [dense_params]
    else:
        layer_macs = count_macs(module, input_shape)
        costs = [count_macs(scheme.factorized_layer(module, r), input_shape) for r in ranks] + [layer_macs]
    return LayerChoices(name, (*ranks, None), (*errors, 0.0), tuple(float(c) for c in costs))


def allocate(layers: Sequence[LayerChoices], fixed: float, target: float) -> dict[str, Rank | None]:
    """``{layer name: rank or None}`` minimizing the summed errors subject to ``fixed`` + the chosen costs <=
    ``target``: bisection on λ (100 steps), then the budget λ leaves unspent goes, step by step, to the upgrade
    removing the most error per unit of cost. Raises ValueError naming the smallest total reachable."""
    def choose(price: float) -> list[int]:
        return [min(range(len(c.ranks)), key=lambda i: c.errors[i] + price * c.costs[i]) for c in layers]

    def total(choice: list[int]) -> float:
        return fixed + sum(c.costs[i] for c, i in zip(layers, choice))

    smallest = fixed + sum(min(c.costs) for c in layers)
    if smallest > target:
        raise ValueError(f"smallest reachable size {smallest:.0f} exceeds the budget's {target:.0f}")
    scale = 1.0 / max(min((cost for c in layers for cost in c.costs if cost > 0), default=1.0), 1e-30)
    low, high = 0.0, scale
    while total(choose(high)) > target:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        low, high = (low, middle) if total(choose(middle)) <= target else (middle, high)
    choice = choose(high)
    while True:
        spare = target - total(choice)
        upgrades = [((c.errors[i] - c.errors[j]) / max(c.costs[j] - c.costs[i], 1e-30), k, j)
                    for k, (c, i) in enumerate(zip(layers, choice)) for j in range(len(c.ranks))
                    if c.errors[j] < c.errors[i] and c.costs[j] - c.costs[i] <= spare]
        if not upgrades:
            return {c.name: c.ranks[i] for c, i in zip(layers, choice)}
        _, k, j = max(upgrades)
        choice[k] = j


def budget_ranks(model: nn.Module, layers: list[tuple[str, nn.Module, Scheme]], budget: float, metric: str,
                 input_shape: tuple[int, ...] | None, driver: str) -> dict[str, Rank | None]:
    """Ranks of ``layers`` (name, module, scheme) making ``model`` ``budget`` times smaller in ``metric`` over the
    whole model (layers not listed count at their dense size); None keeps a layer dense."""
    names = [name for name, _, _ in layers]
    if metric == "params":
        whole = count_params(model)
        inputs = dict.fromkeys(names)
    else:
        whole = count_macs(model, input_shape)
        parameter = next(model.parameters())
        example = torch.zeros((1, *input_shape), device=parameter.device, dtype=parameter.dtype)
        inputs = {name: tuple(x.shape[1:]) for name, x in layer_inputs(model, names, example).items()}
    choices = [layer_choices(name, module, scheme, metric, inputs[name], driver) for name, module, scheme in layers]
    fixed = whole - sum(c.costs[-1] for c in choices)
    try:
        return allocate(choices, fixed, whole / budget)
    except ValueError:
        best = whole / (fixed + sum(min(c.costs) for c in choices))
        raise ValueError(f"`budget`={budget} is out of reach: with the selected layers at their smallest ranks the "
                         f"model is at most {best:.2f}x smaller in {metric} (layers left dense by the selection "
                         "cap it); ask for less, or select more layers") from None
