"""What a plan is made from, one owner per option: the scheme (``lrlightning.schemes``), the rank rule
(``lrlightning.rules``), the objective (``lrlightning.objectives``), the layer ``Selection`` and the ``Solver``;
shared by ``LowRankProjection``, ``factorize``, ``project_`` and ``finish``."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from .devices import check_device
from .objectives import Activation, Objective, WEIGHT, objective_of
from .rules import DEFAULT_RULE, RankRule, rank_rule
from .schemes import SVD_DRIVERS, Scheme, scheme_of


def check_patterns(argument: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"`{argument}` must be a glob pattern or a list of glob patterns on module names, got {value!r}")


@dataclass(frozen=True)
class Selection:
    """Which layers are projected: every Conv1d, Conv2d and Conv3d whose factorized form can be smaller (pointwise,
    grouped and depthwise ones too; see ``lrlightning.plan.FIXED_SCHEMES`` for the kinds whose scheme is fixed), except
    the first conv of the model (``skip_first_conv``, default True), plus every Linear when ``linear`` (default
    False; Linear layers always use ``svd``; ConvNeXt-style blocks hold their pointwise layers as Linear).
    ``include``/``exclude``: glob patterns on module names (a pattern or a list); ``include`` keeps only the layers
    it matches, the first conv too."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    linear: bool = False
    skip_first_conv: bool = True

    def __post_init__(self):
        object.__setattr__(self, "include", check_patterns("Selection.include", self.include))
        object.__setattr__(self, "exclude", check_patterns("Selection.exclude", self.exclude))
        for argument in ("linear", "skip_first_conv"):
            if not isinstance(getattr(self, argument), bool):
                raise ValueError(f"`Selection.{argument}` must be a bool, got {getattr(self, argument)!r}")


@dataclass(frozen=True)
class Solver:
    """How and where projections decompose.

    ``driver``: ``"auto"`` (default: the fastest measured on the decomposing device, ``"gram"`` on the CPU,
    ``"exact"`` elsewhere), ``"exact"`` (``torch.linalg.svd``), ``"randomized"`` (``torch.svd_lowrank``), ``"gram"``
    (``eigh`` of the float64 Gram matrix of each matrix's shorter side) or, on CUDA only, a cuSOLVER method of
    ``torch.linalg.svd``: ``"gesvd"``, ``"gesvdj"``, ``"gesvda"``. ``device``: None (default) decomposes on the
    weights' device; ``"cpu"`` or a CUDA device copies the selected weights there (one transfer per device and
    dtype), decomposes there and copies the results back without waiting for them."""

    driver: str = "auto"
    device: str | None = None

    def __post_init__(self):
        if self.driver not in SVD_DRIVERS:
            raise ValueError(f"`Solver.driver` must be one of {SVD_DRIVERS}, got {self.driver!r}")
        check_device("Solver.device", self.device)
        if self.device is not None:
            object.__setattr__(self, "device", str(torch.device(self.device)))


def coerced(argument: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind``: itself, ``kind()`` for None, or ``kind(**value)`` for a mapping of its fields."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        return kind(**value)
    raise ValueError(f"`{argument}` must be a {kind.__name__} or a mapping of its fields, got {value!r}")


@dataclass(frozen=True)
class LowRankOptions:
    """A validated plan request: ``scheme`` (a registered name, or a configured ``Scheme`` such as
    ``Tucker2(hooi_iters=1)``; default ``"svd"``), ``rank`` (a rule of ``lrlightning.rules``; default
    ``Compression(2.0)``), ``objective`` (``"weight"``, default, or ``Activation``), ``layers`` (``Selection``) and
    ``solver`` (``Solver``). Mappings are taken for ``layers``, ``solver`` and ``objective``."""

    scheme: Scheme | str = "svd"
    rank: RankRule = DEFAULT_RULE
    objective: Objective = WEIGHT
    layers: Selection = field(default_factory=Selection)
    solver: Solver = field(default_factory=Solver)

    def __post_init__(self):
        scheme = scheme_of(self.scheme)
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "rank", rank_rule(self.rank, scheme.pair_rank))
        object.__setattr__(self, "layers", coerced("layers", self.layers, Selection))
        object.__setattr__(self, "solver", coerced("solver", self.solver, Solver))
        objective = objective_of(self.objective)
        if isinstance(objective, Activation) and not scheme.weighted:
            raise ValueError(f"`objective`={objective!r} needs a scheme with a weighted projection (`weighted = True`, "
                             f"`project_weighted`); scheme {scheme.name!r} has none")
        object.__setattr__(self, "objective", objective)

    @property
    def weighted(self) -> bool:
        """Whether projections need input statistics (an ``Activation`` objective)."""
        return isinstance(self.objective, Activation)

    def replace_rank(self, rank: RankRule) -> "LowRankOptions":
        """The same options with another rank rule."""
        return replace(self, rank=rank)


def requested(options: LowRankOptions | None, scheme: Scheme | str = "svd", rank: RankRule = DEFAULT_RULE,
              objective: Objective = WEIGHT, layers: Selection | None = None,
              solver: Solver | None = None) -> LowRankOptions:
    """The request of a call taking ``options=`` or the five arguments it bundles: ``options`` when given (a
    ``LowRankOptions``, or a mapping of its fields), else ``LowRankOptions(scheme, rank, objective, layers,
    solver)``. Giving both is a ValueError naming the arguments set beside ``options``."""
    if options is None:
        return LowRankOptions(scheme, rank, objective, layers, solver)
    given = [name for name, value, default in (("scheme", scheme, "svd"), ("rank", rank, DEFAULT_RULE),
                                               ("objective", objective, WEIGHT), ("layers", layers, None),
                                               ("solver", solver, None))
             if value is not default and value != default]
    if given:
        raise ValueError(f"`options` bundles scheme, rank, objective, layers and solver; got it together with "
                         f"{', '.join(f'`{name}`' for name in given)}: pass those inside `options` instead")
    return coerced("options", options, LowRankOptions)

