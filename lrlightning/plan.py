"""Which layers get which rank: layer selection, rank rules, the break-even guard. Pure torch."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Callable

import torch
from torch import nn

from .activations import LayerStatistics
from .budget import Allocation, budget_ranks
from .names import canonical_name, named_modules
from .options import LowRankOptions, coerced
from .rules import Budget, Compression, Energy, rule_label, rule_record
from .layers import is_conv
from .schemes import GroupedScheme, LoweredSVD, Rank, Scheme, SpatialSVD, Weighting, resolve_driver


Statistics = Callable[[list["LayerPlan"]], dict[str, LayerStatistics]]  # plans -> their layers' input statistics


class NonFiniteWeightError(FloatingPointError):
    """A selected weight holds NaN or Inf; ``layer`` names it."""

    def __init__(self, layer: str, message: str | None = None):
        super().__init__(message or f"weight of layer {layer!r} holds NaN or Inf values; it cannot be projected")
        self.layer = layer


@dataclass(frozen=True)
class LayerPlan:
    """One selected layer: its name in the model, scheme, weight shape (T, S / groups, *kernel) or (T, S), resolved
    rank (of every group), parameter counts, and the conv's ``groups`` (default 1).

    ``params_dense`` and ``params_factorized`` count weights only (the bias is the same either way).
    """

    name: str
    scheme: str
    shape: tuple[int, ...]
    rank: Rank
    params_dense: int
    params_factorized: int
    groups: int = 1

    @property
    def compression(self) -> float:
        return self.params_dense / self.params_factorized


@dataclass(frozen=True)
class SkippedLayer:
    name: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """A request resolved for one model: its ``options``, the ``layers`` to factorize (a ``LayerPlan`` each, in
    model order), the selected layers left dense (``skipped``, with the reason) and a ``Budget``'s ``allocation``
    (else None). ``make_plan`` builds it; ``factorize_planned``, ``project_planned_`` and ``finish`` take it."""

    options: LowRankOptions
    layers: tuple[LayerPlan, ...] = ()
    skipped: tuple[SkippedLayer, ...] = ()
    allocation: Allocation | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "skipped", tuple(self.skipped))

    @property
    def ranks(self) -> dict[str, Rank]:
        """``{layer name: rank}``, usable as ``rank=`` to reproduce the plan."""
        return frozen_ranks(list(self.layers))

    def relative(self, prefix: str) -> "Plan":
        """The plan named relative to the submodule ``prefix`` (``relative_plans``)."""
        return replace(self, layers=relative_plans(list(self.layers), prefix))


def make_plan(model: nn.Module, options: LowRankOptions, warn: bool = True,
              statistics: Statistics | None = None) -> Plan:
    """The ``Plan`` of ``options`` for ``model`` (``allocate_plan``)."""
    layers, skipped, allocation = allocate_plan(model, options, warn, statistics)
    return Plan(options, layers, skipped, allocation)


def unpacked(plans: Plan | list[LayerPlan], options: LowRankOptions | None) -> tuple[list[LayerPlan], LowRankOptions]:
    """The layer plans and options of a call taking ``plans``: a ``Plan`` carries its options (``options`` must then
    be None or the same); a list of ``LayerPlan`` needs ``options``."""
    if isinstance(plans, Plan):
        if options is not None and coerced("options", options, LowRankOptions) != plans.options:
            raise ValueError(f"`options`={options!r} differ from the `Plan`'s own options {plans.options!r}: "
                             "pass the Plan alone")
        return list(plans.layers), plans.options
    if options is None:
        raise ValueError("`options` is needed with a list of `LayerPlan`s (a `Plan` carries its own)")
    return list(plans), options


def conv_kind(module: nn.Module) -> str:
    """``"linear"``, or a conv's kind: ``"pointwise"`` (1×1), ``"depthwise"`` (groups > 1, one input channel per
    group), ``"grouped"`` or ``"dense"``, followed by its dimension (``"pointwise conv2d"``)."""
    if isinstance(module, nn.Linear):
        return "linear"
    dims = len(module.kernel_size)
    if module.groups > 1 and module.in_channels == module.groups:
        kind = "depthwise"
    elif math.prod(module.kernel_size) == 1:
        kind = "pointwise"
    else:
        kind = "grouped" if module.groups > 1 else "dense"
    return f"{kind} conv{dims}d"


FIXED_SCHEMES: dict[str, type[Scheme]] = {"linear": LoweredSVD, "pointwise": LoweredSVD, "depthwise2d": SpatialSVD}
"""The weight kinds (``weight_kind``) whose scheme is fixed, whatever the chosen one: Linear weights and pointwise
kernels are the same matrix problem under every scheme (``svd``); a depthwise 2-D kernel holds one input channel
per group, so lowering it gains nothing (``spatial_svd``). Every other kind takes the chosen scheme."""


def weight_kind(shape: tuple[int, ...], groups: int = 1) -> str:
    """``"linear"`` (2-D), ``"pointwise"`` (1×1… kernel), ``"depthwise2d"`` (2-D kernel, one input channel per
    group) or ``"conv"``, for a weight of ``shape`` (T, S / groups, *kernel) split into ``groups``."""
    if len(shape) == 2:
        return "linear"
    if math.prod(shape[2:]) == 1:
        return "pointwise"
    return "depthwise2d" if groups > 1 and shape[1] == 1 and len(shape) == 4 else "conv"


def group_scheme(shape: tuple[int, ...], options: LowRankOptions, groups: int = 1) -> Scheme:
    """The scheme of each group of a weight of ``shape``: ``FIXED_SCHEMES`` of its kind, else ``options.scheme``."""
    fixed = FIXED_SCHEMES.get(weight_kind(shape, groups))
    return fixed() if fixed is not None else options.scheme


def layer_scheme(layer: LayerPlan | nn.Module, options: LowRankOptions) -> Scheme:
    """The scheme a layer (its ``LayerPlan``, or the Conv/Linear module) uses: ``group_scheme``, applied group by
    group (``GroupedScheme``) when the conv has ``groups`` > 1."""
    if isinstance(layer, LayerPlan):
        shape, groups = layer.shape, layer.groups
    else:
        shape, groups = tuple(layer.weight.shape), getattr(layer, "groups", 1)
    scheme = group_scheme(shape, options, groups)
    return GroupedScheme(scheme, groups) if groups > 1 else scheme


def layer_refusal(module: nn.Module, options: LowRankOptions) -> str | None:
    """Why a selectable layer stays dense (the scheme does not apply to its kind, or no rank makes it smaller), or
    None."""
    shape, groups = tuple(module.weight.shape), getattr(module, "groups", 1)
    refusal = group_scheme(shape, options, groups).refusal(shape, groups) if len(shape) > 2 else None
    if refusal is not None:
        return f"{conv_kind(module)}: {refusal}"
    scheme = layer_scheme(module, options)
    smallest = scheme.clamp(shape, 1)
    factorized, dense = scheme.factorized_params(shape, smallest), math.prod(shape)
    if factorized >= dense:
        return (f"{conv_kind(module)}: no rank makes it smaller (rank {smallest} under {scheme.name!r} gives "
                f"{factorized} >= {dense} dense params)")
    return None


def candidate_layers(model: nn.Module, options: LowRankOptions) -> tuple[list[tuple[str, nn.Module]], list[SkippedLayer]]:
    """Layers eligible under the options (canonical names, see ``lrlightning.names``): every Conv1d, Conv2d and
    Conv3d whose factorized form can be smaller (pointwise, grouped and depthwise ones too), Linear layers when
    selected; and the ones left out for a reason worth telling."""
    chosen, skipped = [], []
    selection = options.layers
    modules = named_modules(model)
    first_conv = next((name for name, m in modules.items() if is_conv(m)), None)
    for name, module in modules.items():
        if not (is_conv(module) or isinstance(module, nn.Linear)):
            continue
        if selection.include and not any(fnmatchcase(name, p) for p in selection.include):
            continue
        if isinstance(module, nn.Linear) and not selection.linear:
            continue
        if any(fnmatchcase(name, p) for p in selection.exclude):
            skipped.append(SkippedLayer(name, "excluded by `exclude`"))
        elif name == first_conv and selection.skip_first_conv and not selection.include:
            skipped.append(SkippedLayer(name, "first conv (`Selection.skip_first_conv=True`)"))
        elif (refusal := layer_refusal(module, options)) is not None:
            skipped.append(SkippedLayer(name, refusal))
        else:
            chosen.append((name, module))
    return chosen, skipped


def resolve_rank(name: str, module: nn.Module, scheme: Scheme, options: LowRankOptions,
                 unreachable: list[str]) -> Rank:
    """The rank of one layer under the options' rule, clamped to what the layer allows (with a warning). A layer
    that cannot reach a ``Compression`` rule gets its smallest rank and its name appended to ``unreachable`` (for
    one warning about them all)."""
    shape = tuple(module.weight.shape)
    rank = options.rank
    if isinstance(rank, dict):
        rank = rank[name]
    if isinstance(rank, float):
        return scheme.rank_from_fraction(shape, rank)
    if not isinstance(rank, (Energy, Compression)):
        if isinstance(scheme, LoweredSVD) and isinstance(rank, tuple):
            rank = min(rank)
        clamped = scheme.clamp(shape, rank)
        wanted = (rank, rank) if scheme.pair_rank and isinstance(rank, int) else rank
        if clamped != wanted:
            warnings.warn(f"rank {rank} of layer {name!r} exceeds its full rank {scheme.full_rank(shape)} "
                          f"under scheme {scheme.name!r}; clamped to {clamped}", stacklevel=3)
        return clamped
    if isinstance(rank, Energy):
        with torch.no_grad():
            return scheme.energy_rank(module.weight.detach().float(), rank.fraction)
    dense = math.prod(shape)
    candidates = list(scheme.rank_candidates(shape))
    for candidate in candidates:
        if dense >= rank.factor * scheme.factorized_params(shape, candidate):
            return candidate
    unreachable.append(name)
    return candidates[-1]


def plan_layers(model: nn.Module, options: LowRankOptions, warn: bool = True,
                statistics: Statistics | None = None) -> tuple[list[LayerPlan], list[SkippedLayer]]:
    """Resolve every selected layer's rank; layers that would not shrink stay dense (break-even guard).

    A ``rank`` mapping selects exactly the layers it names. Raises ``NonFiniteWeightError`` naming the first
    selected layer whose weight holds NaN or Inf, and ValueError when nothing is selected, listing the candidates.
    """
    plans, skipped, _ = allocate_plan(model, options, warn, statistics)
    return plans, skipped


def allocate_plan(model: nn.Module, options: LowRankOptions, warn: bool = True,
                  statistics: Statistics | None = None) -> tuple[list[LayerPlan], list[SkippedLayer], Allocation | None]:
    """``plan_layers``, with the ``Allocation`` a ``Budget`` made (per-layer and whole-model costs; else None).
    Under ``objective="activation"`` a ``Budget`` allocates from output errors when ``statistics`` is given: a
    function from the candidate layers' plans (at full rank) to their input statistics ({name: LayerStatistics})."""
    chosen, skipped = candidate_layers(model, options)
    if isinstance(options.rank, dict):
        selectable = [name for name, _ in chosen]
        unknown = sorted(set(options.rank) - set(selectable))
        if unknown:
            prefix = unknown[0].split(".")[0]
            hint = ""
            if all(name.startswith(prefix + ".") and name[len(prefix) + 1:] in selectable for name in unknown):
                hint = (f". HINT: these are named from a module holding this one as `{prefix}`: pass "
                        f"`rank=relative_ranks(ranks, {prefix!r})`")
            raise ValueError(f"`rank` mapping names layers that are not selectable: {unknown}; selectable: "
                             f"{selectable}{hint}")
        chosen = [(name, module) for name, module in chosen if name in options.rank]
    for name, module in chosen:
        if not bool(torch.isfinite(module.weight).all()):
            raise NonFiniteWeightError(name)
    if not chosen:
        refuse_empty_selection(model, options, skipped)
    allocated, allocation = {}, None
    budget = options.rank if isinstance(options.rank, Budget) else None
    decomposed_on = chosen[0][1].weight.device if options.solver.device is None else options.solver.device
    driver = resolve_driver(options.solver.driver, decomposed_on)
    if budget is not None:
        layers = [(name, module, layer_scheme(module, options)) for name, module in chosen]
        weightings = None
        if statistics is not None and options.weighted:
            weightings = output_weightings(layers, options, statistics)
        allocation = budget_ranks(model, layers, budget, driver, options.solver.device, weightings)
        allocated = allocation.ranks
    plans, unreachable = [], []
    for name, module in chosen:
        shape = tuple(module.weight.shape)
        scheme = layer_scheme(module, options)
        if budget is not None and allocated[name] is None:
            skipped.append(SkippedLayer(name, f"kept dense by {rule_label(rule_record(budget))}"))
            continue
        rank = allocated[name] if budget is not None else resolve_rank(name, module, scheme, options, unreachable)
        dense, factorized = math.prod(shape), scheme.factorized_params(shape, rank)
        if factorized >= dense:
            reason = f"break-even: rank {rank} gives {factorized} >= {dense} dense params"
            skipped.append(SkippedLayer(name, reason))
            if warn:
                warnings.warn(f"layer {name!r} stays dense ({reason})", stacklevel=2)
            continue
        plans.append(LayerPlan(name, scheme.name, shape, rank, dense, factorized, getattr(module, "groups", 1)))
    if unreachable:
        what = f"layer {unreachable[0]!r}" if len(unreachable) == 1 else f"{len(unreachable)} layers {unreachable}"
        warnings.warn(f"{what} cannot reach {options.rank} under their schemes; each takes its smallest rank",
                      stacklevel=2)
    if not plans:
        refuse_empty_selection(model, options, skipped, allocation)
    return plans, skipped, allocation


def output_weightings(layers: list[tuple[str, nn.Module, Scheme]], options: LowRankOptions,
                       statistics: Statistics) -> dict[str, Weighting]:
    """{layer: the ``Weighting`` of its output error}, from the input statistics ``statistics`` gives the candidate
    layers (at full rank); raises ValueError naming a layer without any."""
    candidates = []
    for name, module, scheme in layers:
        shape = tuple(module.weight.shape)
        dense = math.prod(shape)
        candidates.append(LayerPlan(name, scheme.name, shape, scheme.full_rank(shape), dense, dense,
                                    getattr(module, "groups", 1)))
    gathered = statistics(candidates)
    missing = [plan.name for plan in candidates if plan.name not in gathered]
    if missing:
        raise ValueError(f"`objective`={options.objective} allocates the budget from output errors, but the input "
                         f"statistics miss layer {missing[0]!r}: its forward pass does not run it")
    objective = options.objective
    weightings = {}
    for plan in candidates:
        layer = gathered[plan.name]
        scale = None
        if objective.bn_weighting:
            scale = layer.output_scale if layer.output_scale is not None else torch.ones(
                plan.shape[0], dtype=torch.float64, device=layer.moment_sum.device)
            scale = scale.unsqueeze(0)
        weightings[plan.name] = Weighting(layer.input_metric.unsqueeze(0), scale, objective.ridge)
    return weightings


def refuse_empty_selection(model: nn.Module, options: LowRankOptions, skipped: list[SkippedLayer],
                           allocation: Allocation | None = None) -> None:
    """Raise the ValueError of a plan without layers: the selection options, the skipped layers and the candidates
    (first, where a latency budget's allocation kept every layer dense and met the budget, that it did)."""
    what = rule_label(rule_record(options.rank)) if isinstance(options.rank, Budget) else "low-rank"
    candidates = [n for n, m in named_modules(model).items() if is_conv(m) or isinstance(m, nn.Linear)]
    met = ""
    if allocation is not None and allocation.check is not None and allocation.check.verdict == "met":
        int8 = (allocation.table or {}).get("precision") == "int8"
        met = (f"the dense model{' in int8' if int8 else ''} already meets {what} ({allocation.check.text()}): "
               "nothing needs factorizing; ")
    raise ValueError(f"{met}no layer selected for {what} ({options.layers}); skipped: "
                     f"{[(s.name, s.reason) for s in skipped]}. HINT: candidate layers are {candidates}")


def relative_names(names: list[str], prefix: str, argument: str = "ranks") -> list[str]:
    """``names`` of layers under the submodule ``prefix`` (e.g. ``"net"``) made relative to it; raises ValueError
    naming the layers outside ``prefix``."""
    if not (isinstance(prefix, str) and canonical_name(prefix).strip(".")):
        raise ValueError(f"`prefix` must name a submodule, such as 'net', got {prefix!r}")
    head = canonical_name(prefix).strip(".") + "."
    outside = [name for name in names if not name.startswith(head)]
    if outside:
        raise ValueError(f"`{argument}` name layers outside `{prefix}`: {outside}")
    return [name[len(head):] for name in names]


def relative_ranks(ranks: dict[str, Rank], prefix: str) -> dict[str, Rank]:
    """``ranks`` keyed relative to the submodule ``prefix``, so that
    ``factorize(model.net, rank=relative_ranks(callback.ranks, "net"))`` reproduces the callback's plan."""
    return dict(zip(relative_names(list(ranks), prefix), ranks.values()))


def relative_plans(plans: list[LayerPlan], prefix: str) -> list[LayerPlan]:
    """``plans`` named relative to the submodule ``prefix`` (for ``factorize_planned`` and ``finish`` on it)."""
    names = relative_names([p.name for p in plans], prefix, "plans")
    return [replace(plan, name=name) for plan, name in zip(plans, names)]


def frozen_ranks(plans: list[LayerPlan]) -> dict[str, Rank]:
    """``{layer name: rank}`` of a plan, usable as ``rank=`` to reproduce it exactly (e.g. at export)."""
    return {p.name: p.rank for p in plans}


def annealed_plans(plans: list[LayerPlan], options: LowRankOptions, index: int, warmup: int) -> list[LayerPlan]:
    """Plans of the ``index``-th projection (0-based) of a rank warm-up over ``warmup`` projections: ranks annealed
    from full down to the target on a cubic schedule; the plans themselves from the ``warmup``-th on."""
    if index >= warmup:
        return plans
    remaining = (1.0 - (index + 1) / (warmup + 1)) ** 3
    annealed = []
    for plan in plans:
        scheme = layer_scheme(plan, options)
        full, target = scheme.full_rank(plan.shape), plan.rank
        if isinstance(target, tuple):
            rank = tuple(t + math.floor((f - t) * remaining) for t, f in zip(target, full))
        else:
            rank = target + math.floor((full - target) * remaining)
        annealed.append(replace(plan, rank=rank, params_factorized=scheme.factorized_params(plan.shape, rank)))
    return annealed


def plans_within(plans: list[LayerPlan], model: nn.Module, trained: nn.Module | None = None) -> list[LayerPlan]:
    """``plans`` (named in ``trained``) for ``model``: as they are when ``model`` holds layers of those names and
    shapes, named relative to ``model`` when it is a submodule of ``trained``; a ValueError otherwise."""
    if not plans:
        raise ValueError("no plans yet: fit with the callback first, or load a checkpoint's state into it")
    modules = named_modules(model)
    if all(p.name in modules and tuple(modules[p.name].weight.shape) == p.shape for p in plans):
        return plans
    for name, module in (named_modules(trained) if trained is not None else {}).items():
        if module is model and name:
            return relative_plans(plans, name)
    raise ValueError(f"`model` ({type(model).__name__}) does not hold the planned layers "
                     f"{[p.name for p in plans][:4]}: pass the module the callback trained or a submodule of it")
