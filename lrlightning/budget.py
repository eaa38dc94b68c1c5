"""A global budget: the ranks of all selected layers chosen together, so that the whole model is ``budget`` times
smaller in parameters or MACs, or ``budget`` times faster in measured latency. By default (``"max"``) every layer
takes its cheapest candidate under one normalized-error threshold, bisected until the model meets the budget, so no
layer is starved; ``"sum"`` is the Lagrangian rank selection of the LC algorithm (Idelbayev & Carreira-Perpiñán, CVPR
2020): for a price λ every layer takes the candidate minimizing normalized error + λ·cost, λ bisected. "Stay dense"
is always a candidate. Candidate ranks are multiples of ``rank_multiple`` where a layer is wide enough. Pure torch."""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn

from .counting import count_macs, count_params
from .speed.latency import LatencyTable
from .names import set_module
from .rules import Budget
from .schemes import Rank, Scheme, Weighting
from .speed.measure import layer_inputs
from .speed.speedup_check import OutOfReach, SpeedupCheck, checked_ranks
from .speed.timing import Spread

MAX_CANDIDATES = 32  # ranks tried per layer, evenly spread from the largest that shrinks to the smallest
LATENCY_CANDIDATES = 16  # fewer when each one is timed
SAME = Spread(1.0, 1.0, 1.0, 1)  # the ratio of the dense layer to itself
UNITS = {"params": "parameters", "macs": "MACs per sample", "latency": "ms per batch"}


@dataclass(frozen=True)
class LayerChoices:
    """One layer's candidates: ``ranks`` (None keeps it dense), their normalized squared weight error
    ||W − W_r||² / ||W||² (or output error, under ``objective="activation"``) and their cost (parameters or MACs per sample of the weight only, or measured ms)."""

    name: str
    ranks: tuple[Rank | None, ...]
    errors: tuple[float, ...]
    costs: tuple[float, ...]


@dataclass(frozen=True)
class Allocation:
    """What a budget allocated: ``ranks`` ({layer: rank, or None for dense}), ``costs`` ({layer: (dense,
    allocated)}) and the whole model's ``dense`` and ``allocated`` totals, in ``metric`` units (parameters, MACs per
    sample, or milliseconds per batch of ``batch_size`` on ``device`` for latency). A latency budget over several
    batch sizes gives its costs at the first, and the predicted totals at each in ``predicted``."""

    budget: float
    metric: str
    ranks: dict[str, Rank | None]
    costs: dict[str, tuple[float, float]]
    dense: float
    allocated: float
    device: str | None = None
    batch_size: int | None = None
    check: SpeedupCheck | None = None
    table: dict | None = None
    errors: str = "weight"  # what the candidates' errors measure: "weight", or "output" (input statistics)
    objective: str = "max"  # how they were traded: the largest ("max") or the summed ("sum") normalized error
    predicted: dict[int, tuple[float, float]] = field(default_factory=dict)  # {batch size: (dense, allocated) ms}

    @property
    def achieved(self) -> float:
        """Dense / allocated over the whole model, as predicted from the costs (latency: see ``check`` for the
        speedup measured on the allocated model; ``table``: where its timings came from, ``LatencyTable.facts``)."""
        return self.dense / self.allocated

    @property
    def unit(self) -> str:
        return UNITS[self.metric]


class Unreachable(ValueError):
    """No allocation of the candidates meets the budget (before any model is timed)."""


def layer_multiple(full: int, multiple: int) -> int:
    """The step of a rank whose full value is ``full``: ``multiple`` when ``full >= 16·multiple``, else the largest
    power of two <= full / 16 (at least 1), so narrow layers keep fine-grained candidates."""
    if full >= 16 * multiple:
        return multiple
    return 2 ** int(math.log2(max(full / 16, 1)))


def rounded_rank(rank: Rank, full: Rank, multiple: int) -> Rank:
    """``rank`` rounded down to a multiple of its ``layer_multiple``, or below one step to a power of two (so rank
    1 stays reachable); a full rank stays full; pairs per mode."""
    if isinstance(rank, tuple):
        return tuple(rounded_rank(r, f, multiple) for r, f in zip(rank, full))
    step = layer_multiple(full, multiple)
    if rank >= full:
        return rank
    return rank // step * step if rank >= step else 2 ** int(math.log2(rank))


def rank_choices(scheme: Scheme, shape: tuple[int, ...], multiple: int, count: int,
                 keep: Callable[[Rank], bool] | None = None) -> list[Rank]:
    """At most ``count`` distinct candidate ranks of a weight of ``shape``, largest first, rounded to multiples
    (``rounded_rank``), each giving a factorized layer with fewer parameters than the dense one (and for which
    ``keep``, when given, holds)."""
    full, dense = scheme.full_rank(shape), math.prod(shape)
    ranks = dict.fromkeys(rounded_rank(r, full, multiple) for r in scheme.rank_candidates(shape))
    return spread([r for r in ranks if scheme.factorized_params(shape, r) < dense and (keep is None or keep(r))],
                  count)


def latency_ranks(module: nn.Module, scheme: Scheme, input_shape: tuple[int, ...], multiple: int) -> list[Rank]:
    """The ranks of ``module`` a latency budget times (``rank_choices``, at most ``LATENCY_CANDIDATES``): only
    those whose factorized layer does fewer MACs than the dense one on ``input_shape`` (C, *size), since a
    factorized layer doing as much work in more kernels never runs faster."""
    dense = count_macs(module, input_shape)
    return rank_choices(scheme, tuple(module.weight.shape), multiple, LATENCY_CANDIDATES,
                        lambda r: count_macs(layer_structure(module, scheme, r), input_shape) < dense)


def spread(candidates: Sequence[Rank], count: int) -> list[Rank]:
    """At most ``count`` of ``candidates`` (largest first), evenly spaced, the first and last kept."""
    if len(candidates) <= count:
        return list(candidates)
    step = (len(candidates) - 1) / (count - 1)
    return [candidates[round(i * step)] for i in range(count)]


def candidate_label(scheme: Scheme, rank: Rank) -> str:
    """A candidate's name in latency tables: scheme, its structural options, rank."""
    tile = getattr(scheme, "tile_shape", None)
    return f"{scheme.name}{'' if tile is None else f'@{tile[0]}x{tile[1]}'}:{rank}".replace(" ", "")


def layer_structure(module: nn.Module, scheme: Scheme, rank: Rank) -> nn.Module:
    """The factorized layer of ``module`` at ``rank`` on the meta device (its structure, no decomposition run);
    built from the real weights when the scheme cannot work on meta tensors."""
    try:
        return scheme.factorized_layer(copy.deepcopy(module).to("meta"), rank)
    except (NotImplementedError, RuntimeError):
        return scheme.factorized_layer(module, rank).to("meta")


def timing_layer(module: nn.Module, scheme: Scheme, rank: Rank) -> nn.Module:
    """A layer with the structure of ``module`` factorized at ``rank`` and random weights, for timing."""
    layer = layer_structure(module, scheme, rank).to_empty(device=module.weight.device)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0.0, 0.05)
    return layer.to(module.weight.dtype)


def layer_choices(name: str, module: nn.Module, scheme: Scheme, metric: str, input_shape: tuple[int, ...] | None,
                  driver: str, multiple: int = 1, tables: Sequence[LatencyTable] = (),
                  device: str | torch.device | None = None, weighting: Weighting | None = None,
                  ranks: Sequence[Rank] | None = None) -> list[LayerChoices]:
    """The candidates of one layer: ``ranks`` (default: those whose factorized form has fewer parameters,
    ``rank_choices``; for latency, fewer MACs too: ``latency_ranks``), and dense; one ``LayerChoices`` per latency
    table (one per batch size, the same ranks in each), else one. ``input_shape`` is the layer's own input
    (C, *size) for ``metric="macs"`` and ``"latency"``. With ``"latency"`` a candidate costs ``latency_costs`` in
    each of ``tables``, and is kept only where it is worth its error (``faster_frontier``) in all of them. The
    errors are computed on ``device`` (default: the weight's), with ``driver``: of the weight, or with a
    ``weighting`` of the layer's output (``Scheme.output_rank_errors``)."""
    weight = module.weight.detach().float()
    shape = tuple(weight.shape)
    if ranks is None:
        ranks = latency_ranks(module, scheme, input_shape, multiple) if metric == "latency" else \
            rank_choices(scheme, shape, multiple, MAX_CANDIDATES)
    if metric == "params":
        costs = [([scheme.factorized_params(shape, r) for r in ranks], math.prod(shape))]
    elif metric == "macs":
        costs = [([count_macs(layer_structure(module, scheme, r), input_shape) for r in ranks],
                  count_macs(module, input_shape))]
    else:
        timed = [latency_costs(module, scheme, ranks, input_shape, table) for table in tables]
        ranks = [r for r in ranks if all(r in faster for faster, _ in timed)]
        costs = [([faster[r] for r in ranks], dense) for faster, dense in timed]
    on = weight.device if device is None else torch.device(device)
    with torch.no_grad():
        if weighting is None:
            errors = scheme.rank_errors(weight.to(on), ranks, driver)
        else:
            outputs = weighting.outputs.to(on) if weighting.outputs is not None else None
            errors = scheme.output_rank_errors(weight.to(on), ranks, driver,
                                               Weighting(weighting.inputs.to(on), outputs, weighting.ridge))
    return [LayerChoices(name, (*ranks, None), (*errors, 0.0), tuple(float(c) for c in (*candidates, dense)))
            for candidates, dense in costs]


def latency_costs(module: nn.Module, scheme: Scheme, ranks: Sequence[Rank], input_shape: tuple[int, ...],
                  table: LatencyTable) -> tuple[dict[Rank, float], float]:
    """({rank: ms} of the candidates worth their error (``faster_frontier``), ms of the layer left dense) of one
    layer at ``table``'s batch: ``table``'s dense ms times each candidate's measured ratio to dense (median over
    rounds, paired per round). In an int8 table the layer left dense runs in int8 too (``LayerTimes.dense_int8``)."""
    candidates = timing_candidates(module, scheme, ranks)
    times = table.layer_times(module, input_shape, candidates)
    left = SAME if times.dense_int8 is None else times.dense_int8  # the layer left dense, as it would run
    frontier = faster_frontier(ranks, [times.ratios[label] for label in candidates], left)
    dense = times.dense.median
    return {r: dense * ratio for r, ratio in frontier.items()}, dense * left.median


def faster_frontier(ranks: Sequence[Rank], ratios: Sequence[Spread], left: Spread = SAME) -> dict[Rank, float]:
    """{rank: median ratio to dense} of the candidates worth their error, from ``ranks`` (largest first) and their
    measured ``ratios``: walking down from the largest rank (the smallest error), a candidate is kept only when it
    runs faster than the last one kept, starting from the layer left dense (``left``), beyond the noise: its
    interquartile range lies wholly below that one's. A candidate that only noise makes look faster is dropped, so a
    tie goes to the larger rank and repeated measurements give the same choices; a candidate that runs faster than
    a smaller rank (kernels favour some channel counts) is kept, and the smaller one dropped when no faster."""
    kept, frontier = left, {}
    for rank, ratio in zip(ranks, ratios):
        if ratio.high < kept.low:
            frontier[rank], kept = ratio.median, ratio
    return frontier


def timing_candidates(module: nn.Module, scheme: Scheme, ranks: Sequence[Rank]) -> dict[str, Callable[[], nn.Module]]:
    """``{latency-table label: a function building the candidate for timing}`` of ``module`` at each of ``ranks``."""
    return {candidate_label(scheme, r): partial(timing_layer, module, scheme, r) for r in ranks}


def timing_model(model: nn.Module, layers: Sequence[tuple[str, nn.Module, Scheme]], ranks: dict[str, Rank | None]) -> nn.Module:
    """A copy of ``model`` with each of ``layers`` whose rank is not None replaced by its factorized structure at
    that rank, with random weights (``timing_layer``): what the allocated model costs, without decomposing."""
    timed = copy.deepcopy(model)
    for name, module, scheme in layers:
        if ranks.get(name) is not None:
            set_module(timed, name, timing_layer(module, scheme, ranks[name]))
    return timed


def in_model_costs(choices: Sequence[LayerChoices], in_model: dict[str, float]) -> list[LayerChoices]:
    """The layers' measured costs rescaled by one factor, so that their dense layers cost what they took together
    inside the model's own pass (``in_model``: ms by layer name): a layer timed alone on a random input runs with
    warmer caches than among its neighbours. One factor over all layers, since each layer's time inside a single
    pass is noisy."""
    scale = sum(in_model[c.name] for c in choices) / max(sum(c.costs[-1] for c in choices), 1e-12)
    return [LayerChoices(c.name, c.ranks, c.errors, tuple(cost * scale for cost in c.costs)) for c in choices]


def allocate(layers: Sequence[LayerChoices], fixed: float, target: float, objective: str = "sum") -> dict[
        str, Rank | None]:
    """``{layer name: rank or None}`` within ``fixed`` + the chosen costs <= ``target``, minimizing the summed
    errors (``objective="sum"``: bisection on λ, 100 steps) or the largest error (``"max"``: bisection on an error
    threshold, each layer taking its cheapest candidate under it); then the budget left unspent goes, step by step,
    to the upgrade removing the most error per unit of cost. Raises ValueError naming the smallest total reachable."""
    def total(choice: list[int]) -> float:
        return fixed + sum(c.costs[i] for c, i in zip(layers, choice))

    smallest = fixed + sum(min(c.costs) for c in layers)
    if smallest > target:
        raise Unreachable(f"smallest reachable size {smallest:.0f} exceeds the budget's {target:.0f}")
    choice = (lowest_max_error if objective == "max" else lowest_summed_error)(layers, total, target)
    while True:
        spare = target - total(choice)
        upgrades = [((c.errors[i] - c.errors[j]) / max(c.costs[j] - c.costs[i], 1e-30), k, j)
                    for k, (c, i) in enumerate(zip(layers, choice)) for j in range(len(c.ranks))
                    if c.errors[j] < c.errors[i] and c.costs[j] - c.costs[i] <= spare]
        if not upgrades:
            return {c.name: c.ranks[i] for c, i in zip(layers, choice)}
        _, k, j = max(upgrades)
        choice[k] = j


def lowest_summed_error(layers: Sequence[LayerChoices], total, target: float) -> list[int]:
    """Candidate indices minimizing error + λ·cost per layer, λ bisected to the smallest meeting ``target``."""
    def choose(price: float) -> list[int]:
        return [min(range(len(c.ranks)), key=lambda i: c.errors[i] + price * c.costs[i]) for c in layers]

    scale = 1.0 / max(min((cost for c in layers for cost in c.costs if cost > 0), default=1.0), 1e-30)
    low, high = 0.0, scale
    while total(choose(high)) > target:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        low, high = (low, middle) if total(choose(middle)) <= target else (middle, high)
    return choose(high)


def lowest_max_error(layers: Sequence[LayerChoices], total, target: float) -> list[int]:
    """Candidate indices of the smallest error threshold meeting ``target``: each layer its cheapest candidate
    with an error at or under the threshold."""
    def choose(threshold: float) -> list[int]:
        return [min((i for i in range(len(c.ranks)) if c.errors[i] <= threshold), key=lambda i: c.costs[i])
                for c in layers]

    thresholds = sorted({error for c in layers for error in c.errors})
    low, high = 0, len(thresholds) - 1
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if total(choose(thresholds[middle])) <= target else (middle + 1, high)
    return choose(thresholds[low])


def budget_ranks(model: nn.Module, layers: list[tuple[str, nn.Module, Scheme]], rule: Budget, driver: str,
                 projection_device: str | None = None, weightings: dict[str, Weighting] | None = None) -> Allocation:
    """Allocate the ``rule``'s budget over ``layers`` (name, module, scheme) of ``model``: layers not listed count
    at their dense cost; errors are computed where projections decompose (``projection_device``, default the
    weights' device) with ``driver``, as output errors under ``weightings`` ({layer: one layer's Weighting}) when
    given, else as weight errors. A latency budget checks a cached table for staleness first
    (``LatencyTable.check``), allocates on each batch size's share of its dense model time (so every batch size
    served weighs alike), and times its result against dense at every batch size afterwards
    (``lrlightning.speed.speedup_check``: the slowest must meet the budget). Raises ValueError naming the best
    reachable ratio (for latency: measured, with its spread, and the batch size it falls short at)."""
    budget, metric, input_shape = rule.factor, rule.metric, rule.input_shape
    names = [name for name, _, _ in layers]
    tables, inputs, timed_ranks = [], dict.fromkeys(names), dict.fromkeys(names)
    if metric != "params":
        parameter = next(model.parameters())
        example = torch.zeros((1, *input_shape), device=parameter.device, dtype=parameter.dtype)
        try:
            inputs = {name: tuple(x.shape[1:]) for name, x in layer_inputs(model, names, example).items()}
        except (RuntimeError, ValueError, IndexError, TypeError) as error:
            raise ValueError(f"`Budget.input_shape`={input_shape} does not fit {type(model).__name__}: its forward pass "
                             f"on a batch of one zero sample of that shape fails ({type(error).__name__}: {error}). "
                             "It must be one sample's shape without the batch dimension: (C, H, W), (C, L) for Conv1d or "
                             "(C, D, H, W) for Conv3d models") from None
        unused = [name for name in names if name not in inputs]
        if unused:
            raise ValueError(f"`Budget.metric`={metric!r} needs every selected layer to run in the model's forward "
                             f"pass; these do not: {unused}. HINT: leave them out with `Selection.exclude`")
    if metric == "params":
        wholes = [count_params(model)]
    elif metric == "macs":
        wholes = [count_macs(model, input_shape)]
    else:
        latency = rule.latency
        device = latency.device or ("cpu" if latency.backend == "onnxruntime" else next(model.parameters()).device)
        timed_ranks = {name: latency_ranks(module, scheme, inputs[name], rule.rank_multiple)
                       for name, module, scheme in layers}
        requests = [(module, inputs[name], timing_candidates(module, scheme, timed_ranks[name]))
                    for name, module, scheme in layers]
        wholes, in_models, references = [], [], []  # references: the dense model's ms as it is compared (fp32)
        for batch_size in latency.batch_sizes:
            table = LatencyTable(device, batch_size, latency.cache, latency.remeasure, latency.backend,
                                 latency.memory_format, latency.precision)
            table.check(requests)
            whole, in_model = table.model_ms(model, input_shape, names)
            references.append(whole)
            if latency.precision == "int8":  # what is left of the model runs in int8 too
                whole = table.model_ms(model, input_shape, names, int8=True)[0]
            tables.append(table)
            wholes.append(whole)
            in_models.append(in_model)
    objective = rule.objective or ("sum" if weightings else "max")
    per_layer = [layer_choices(name, module, scheme, metric, inputs[name], driver, rule.rank_multiple, tables,
                               projection_device, (weightings or {}).get(name), timed_ranks[name])
                 for name, module, scheme in layers]
    by_batch = [[choices[b] for choices in per_layer] for b in range(len(wholes))]  # [batch][layer]
    if tables:
        by_batch = [in_model_costs(choices, in_model) if in_model else choices
                    for choices, in_model in zip(by_batch, in_models)]
    fixeds = [max(0.0, whole - sum(c.costs[-1] for c in choices)) for whole, choices in zip(wholes, by_batch)]
    denses = [fixed + sum(c.costs[-1] for c in choices) for fixed, choices in zip(fixeds, by_batch)]
    if not (tables and tables[0].precision == "int8"):
        references = denses  # fp32: the dense model is the all-dense allocation
    choices, fixed = shares(by_batch, fixeds, references) if len(by_batch) > 1 else (by_batch[0], fixeds[0])
    dense = 1.0 if len(by_batch) > 1 else references[0]  # what the budget divides
    fastest = fixed + sum(min(c.costs) for c in choices)

    def choose(target: float) -> tuple[dict[str, Rank | None], float]:
        ranks = allocate(choices, fixed, target, objective)
        return ranks, fixed + sum(c.costs[c.ranks.index(ranks[c.name])] for c in choices)

    check = None
    try:
        if tables and fastest >= dense:
            raise Unreachable("no candidate of any selected layer runs faster than dense")
        if not tables:
            ranks, _ = choose(dense / budget)
        else:
            def measure(ranks: dict[str, Rank | None]) -> dict[int, Spread]:
                timed = timing_model(model, layers, ranks)
                return {table.batch_size: table.speedup(model, timed, input_shape) for table in tables}

            ranks, check = checked_ranks(choose, measure, budget, dense, fastest)
    except (OutOfReach, Unreachable) as error:
        if isinstance(error, OutOfReach):
            best = f"{error}, with every selected layer at its fastest candidate"
        else:
            best = f"{dense / fastest:.2f}x {'faster (predicted)' if tables else f'smaller in {metric}'}"
        text = (f"`Budget.factor`={budget} ({metric}) is out of reach: with the selected layers at their smallest "
                f"ranks the model is at most {best} (layers left dense by the selection cap it"
                f"{'; so do layers no candidate of which runs faster than dense' if tables else ''})")
        # "closest" keeps the fastest allocation as measured (latency) or the smallest (params, MACs); a latency
        # budget no layer of which has a faster candidate leaves nothing to keep
        closest = rule.out_of_reach == "closest" and (isinstance(error, OutOfReach) or not tables)
        if not closest:
            hint = " (or `Budget.out_of_reach`='closest' to keep the closest allocation)" \
                if rule.out_of_reach == "raise" else ""
            raise ValueError(f"{text}; ask for less, or select more layers{hint}") from None
        ranks, check = (error.ranks, error.check(budget)) if isinstance(error, OutOfReach) else (choose(fastest)[0],
                                                                                               None)
        warnings.warn(f"{text}; kept the closest allocation (`Budget.out_of_reach`='closest')", stacklevel=3)
    if check is not None and check.verdict not in ("met", "short"):
        warnings.warn(f"Budget({budget}, metric='latency'): {check.text()}", stacklevel=3)
    predicted = {}
    for table, layer_costs, fixed_ms, dense_ms in zip(tables, by_batch, fixeds, references):
        allocated_ms = fixed_ms + sum(c.costs[c.ranks.index(ranks[c.name])] for c in layer_costs)
        predicted[table.batch_size] = (dense_ms, allocated_ms)
    first = by_batch[0]
    costs = {c.name: (c.costs[-1], c.costs[c.ranks.index(ranks[c.name])]) for c in first}
    allocated = fixeds[0] + sum(cost for _, cost in costs.values())
    return Allocation(budget, metric, ranks, costs, references[0] if tables else denses[0], allocated,
                      device=str(tables[0].device) if tables else None,
                      batch_size=tables[0].batch_size if tables else None, check=check,
                      table=tables[0].facts() if tables else None, errors="output" if weightings else "weight",
                      objective=objective, predicted=predicted if len(predicted) > 1 else {})


def shares(by_batch: Sequence[Sequence[LayerChoices]], fixeds: Sequence[float], denses: Sequence[float]) -> tuple[
        list[LayerChoices], float]:
    """(the layers' candidates, the fixed cost) over several batch sizes as one cost: at each batch size a cost's
    share of that batch's dense model time, averaged over the batch sizes (the dense model costs 1.0)."""
    count = len(denses)
    merged = [LayerChoices(layer[0].name, layer[0].ranks, layer[0].errors,
                           tuple(sum(c.costs[i] / d for c, d in zip(layer, denses)) / count
                                 for i in range(len(layer[0].costs))))
              for layer in zip(*by_batch)]
    return merged, sum(f / d for f, d in zip(fixeds, denses)) / count
