"""Validated options shared by ``factorize``, ``project_`` and ``LowRankProjection`` (same names everywhere)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .schemes import SVD_DRIVERS, Scheme, scheme_class

RankSpec = int | float | tuple[int, int] | dict[str, int | tuple[int, int]] | None
RANK_RULES = ("rank", "energy", "compression", "budget")
BUDGET_METRICS = ("params", "macs", "latency")
BUDGET_OBJECTIVES = ("max", "sum")
OBJECTIVES = ("weight", "activation")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_layer_rank(argument: str, value: Any, allow_pair: bool) -> int | tuple[int, int]:
    """A positive int, or (tucker2) a pair of positive ints; returns it normalized."""
    if is_int(value) and value >= 1:
        return int(value)
    if allow_pair and isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        if all(is_int(v) and v >= 1 for v in value):
            return (int(value[0]), int(value[1]))
    allowed = "an int >= 1 or a pair (R_in, R_out) of ints >= 1" if allow_pair else "an int >= 1"
    raise ValueError(f"`{argument}` must be {allowed}, got {value!r}")


def check_rank(rank: Any, scheme: str) -> RankSpec:
    """Validate the ``rank`` rule; returns it normalized (lists to tuples, mappings to dicts)."""
    pair = scheme_class(scheme).pair_rank
    if rank is None:
        return None
    if isinstance(rank, float) and not isinstance(rank, bool):
        if 0.0 < rank <= 1.0:
            return rank
        raise ValueError(f"`rank` as a float is a fraction of the layer's full rank and must be in (0, 1], got {rank!r}")
    if isinstance(rank, Mapping):
        return {str(name): check_layer_rank(f"rank[{name!r}]", value, pair) for name, value in rank.items()}
    if is_int(rank) and rank < 1:
        raise ValueError(f"`rank` must be an int >= 1, a float in (0, 1], a pair (tucker2) or a mapping, got {rank!r}")
    if is_int(rank) or (pair and isinstance(rank, Sequence) and not isinstance(rank, str)):
        return check_layer_rank("rank", rank, pair)
    allowed = "an int >= 1, a float in (0, 1]" + (", a pair (R_in, R_out)" if pair else "")
    raise ValueError(f"`rank` must be {allowed}, or a mapping of layer names to ranks; got {rank!r}")


def check_device(argument: str, value: Any) -> None:
    """Raise unless ``value`` is None, ``"cpu"`` or a CUDA device present on this machine."""
    if value is None:
        return
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        device = None
    usable = device is not None and (device.type == "cpu" or (
        device.type == "cuda" and torch.cuda.is_available()
        and (device.index is None or device.index < torch.cuda.device_count())))
    if not usable:
        raise ValueError(f"`{argument}` must be 'cpu' or a CUDA device of this machine such as 'cuda:0' "
                         f"(CUDA available: {torch.cuda.is_available()}), got {value!r}")


def check_patterns(argument: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"`{argument}` must be a glob pattern or a list of glob patterns on module names, got {value!r}")


@dataclass(frozen=True)
class LowRankOptions:
    """What to project and how; every argument is checked here, once.

    Exactly one rank rule applies:
      ``rank``: int >= 1 (absolute; tucker2: both modes), float in (0, 1] (fraction of the layer's full rank,
        floored, at least 1; tucker2: of each channel dimension), a pair (R_in, R_out) for tucker2, or a mapping
        ``{layer name: rank}`` (ranks fixed elsewhere, e.g. by a budget allocator or a previous plan);
      ``energy``: float in (0, 1], the smallest rank keeping that fraction of squared singular-value energy,
        resolved once from the weights when the plan is made;
      ``compression``: float > 1, the largest rank whose factorized layer is at least that many times smaller
        (dense params / factorized params, per layer);
      ``budget``: float > 1, the whole model that many times smaller in ``budget_metric`` (``"params"``, default,
        or ``"macs"`` per sample of ``input_shape`` (C, H, W)) or that many times faster (``"latency"``: measured
        per layer on ``latency_device`` (default: the weights' device; CPU at torch's thread count) at batch
        ``latency_batch_size`` (default 32) of ``input_shape``, cached under ``latency_cache`` and checked for
        staleness before use, re-measured with ``latency_remeasure=True``, see ``lrlightning.latency``; the
        allocated model is then timed against dense and allocated again while it misses the budget beyond the
        noise, see ``lrlightning.speedup_check``), with ranks allocated across the selected layers: the largest
        normalized error over layers is minimized (``budget_objective="max"``, default) or their sum (``"sum"``); a
        layer may stay dense, and under ``"latency"`` no layer is factorized into something not faster beyond the
        noise. Candidate ranks are multiples
        of ``rank_multiple`` (default 8) where a layer's full rank is at least 16× that, else of the largest power
        of two fitting 16 times (see ``lrlightning.budget``).
    ``tile_shape`` (rows, cols) is required by ``tiled_svd`` only. Layer selection: every Conv2d with groups == 1
    and a kernel larger than 1×1 except the first conv (``skip_first_conv``), plus every Linear when ``linear``
    (Linear layers always use ``svd``); ``include``/``exclude`` are glob patterns on module names.
    ``svd_driver`` picks how projections decompose: ``"auto"`` (the fastest measured on the weights' device:
    ``"gram"`` on the CPU, ``"exact"`` elsewhere), ``"exact"`` (``torch.linalg.svd``), ``"randomized"``
    (``torch.svd_lowrank``), ``"gram"`` (``eigh`` of the float64 Gram matrix of each matrix's shorter side) or, for
    CUDA only, a cuSOLVER method of ``torch.linalg.svd``: ``"gesvd"``, ``"gesvdj"``, ``"gesvda"``.
    ``projection_device``: where projections decompose: None (default) the weights' device; ``"cpu"`` (or a CUDA
    device) copies the selected weights there (one transfer per device and dtype), decomposes there with that
    device's driver and copies the results back without waiting for them.
    ``objective``: what a projection keeps best, ``"weight"`` (default: the Frobenius error of the weight) or
    ``"activation"`` (the layer's output error E‖(W − W_r)x‖² over its inputs x on data: under their covariance
    when a BatchNorm normalizes the output, else their second moment; with ``bn_weighting`` also each output channel
    scaled by the following BatchNorm's |γ|/σ), with a ridge of ``activation_ridge`` (default 1e-2) times the
    mean eigenvalue on each metric; see ``lrlightning.schemes.weighting``. Either way the projected weight is in the same rank set, so the export is
    exact. Rank rules (``energy``, ``compression``, ``budget``) stay weight-based.
    """

    scheme: str = "svd"
    rank: RankSpec = None
    energy: float | None = None
    compression: float | None = None
    tile_shape: tuple[int, int] | None = None
    include: tuple[str, ...] = field(default=())
    exclude: tuple[str, ...] = field(default=())
    linear: bool = False
    skip_first_conv: bool = True
    hooi_iters: int = 0
    svd_driver: str = "auto"
    projection_device: str | None = None
    budget: float | None = None
    budget_metric: str = "params"
    input_shape: tuple[int, ...] | None = None
    rank_multiple: int = 8
    budget_objective: str = "max"
    latency_batch_size: int = 32
    latency_device: str | None = None
    latency_cache: str | None = None
    latency_remeasure: bool = False
    objective: str = "weight"
    activation_ridge: float = 1e-2
    bn_weighting: bool = False

    def __post_init__(self):
        scheme_class(self.scheme)
        given = [name for name in RANK_RULES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one rank rule of {', '.join(f'`{r}`' for r in RANK_RULES)}; "
                             f"got {given or 'none'}")
        self.check_budget()
        object.__setattr__(self, "rank", check_rank(self.rank, self.scheme))
        if self.energy is not None and not (is_number(self.energy) and 0.0 < self.energy <= 1.0):
            raise ValueError(f"`energy` must be a float in (0, 1], got {self.energy!r}")
        if self.compression is not None and not (is_number(self.compression) and self.compression > 1.0):
            raise ValueError(f"`compression` must be a number > 1 (dense / factorized params), got {self.compression!r}")
        if self.scheme == "tiled_svd":
            shape = self.tile_shape
            if not (isinstance(shape, Sequence) and len(shape) == 2 and all(is_int(v) and v >= 1 for v in shape)):
                raise ValueError(f"`tile_shape` must be a pair (rows, cols) of ints >= 1 for scheme 'tiled_svd', "
                                 f"got {shape!r}")
            object.__setattr__(self, "tile_shape", (int(shape[0]), int(shape[1])))
        elif self.tile_shape is not None:
            raise ValueError(f"`tile_shape` applies to scheme 'tiled_svd' only, got {self.tile_shape!r} "
                             f"with scheme {self.scheme!r}")
        object.__setattr__(self, "include", check_patterns("include", self.include))
        object.__setattr__(self, "exclude", check_patterns("exclude", self.exclude))
        if not (is_int(self.hooi_iters) and self.hooi_iters >= 0):
            raise ValueError(f"`hooi_iters` must be an int >= 0, got {self.hooi_iters!r}")
        if self.svd_driver not in SVD_DRIVERS:
            raise ValueError(f"`svd_driver` must be one of {SVD_DRIVERS}, got {self.svd_driver!r}")
        check_device("projection_device", self.projection_device)
        if self.projection_device is not None:
            object.__setattr__(self, "projection_device", str(torch.device(self.projection_device)))
        self.check_objective()

    def check_objective(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "activation" and not scheme_class(self.scheme).weighted:
            raise ValueError(f"`objective`='activation' needs a scheme with a weighted projection (`weighted = True`, "
                             f"`project_weighted`); scheme {self.scheme!r} has none")
        if not (is_number(self.activation_ridge) and self.activation_ridge > 0):
            raise ValueError(f"`activation_ridge` must be a number > 0 (a fraction of the mean eigenvalue), "
                             f"got {self.activation_ridge!r}")
        if not isinstance(self.bn_weighting, bool):
            raise ValueError(f"`bn_weighting` must be a bool, got {self.bn_weighting!r}")
        if self.bn_weighting and self.objective != "activation":
            raise ValueError("`bn_weighting`=True weights the output error of objective='activation'; got "
                             f"`objective`={self.objective!r}")

    @property
    def weighted(self) -> bool:
        """Whether projections need input statistics (``objective="activation"``)."""
        return self.objective == "activation"

    def check_budget(self) -> None:
        if self.budget is not None and not (is_number(self.budget) and self.budget > 1.0):
            raise ValueError(f"`budget` must be a number > 1 (dense / compressed, over the whole model), "
                             f"got {self.budget!r}")
        if self.budget_metric not in BUDGET_METRICS:
            raise ValueError(f"`budget_metric` must be one of {BUDGET_METRICS}, got {self.budget_metric!r}")
        shape = self.input_shape
        if shape is not None:
            if not (isinstance(shape, Sequence) and len(shape) >= 1 and all(is_int(v) and v >= 1 for v in shape)):
                raise ValueError(f"`input_shape` must be the (C, H, W) of one sample, ints >= 1, got {shape!r}")
            object.__setattr__(self, "input_shape", tuple(int(v) for v in shape))
        if self.budget is not None and self.budget_metric != "params" and self.input_shape is None:
            raise ValueError(f"`budget_metric`={self.budget_metric!r} needs `input_shape`, the (C, H, W) of one "
                             "sample, got None")
        if self.budget_objective not in BUDGET_OBJECTIVES:
            raise ValueError(f"`budget_objective` must be one of {BUDGET_OBJECTIVES}, got {self.budget_objective!r}")
        for argument in ("rank_multiple", "latency_batch_size"):
            value = getattr(self, argument)
            if not (is_int(value) and value >= 1):
                raise ValueError(f"`{argument}` must be an int >= 1, got {value!r}")
        check_device("latency_device", self.latency_device)
        if self.latency_cache is not None and not isinstance(self.latency_cache, (str, os.PathLike)):
            raise ValueError(f"`latency_cache` must be a directory path, got {self.latency_cache!r}")
        if not isinstance(self.latency_remeasure, bool):
            raise ValueError(f"`latency_remeasure` must be a bool, got {self.latency_remeasure!r}")

    def conv_scheme(self) -> Scheme:
        return scheme_class(self.scheme).from_options(self)

    def replace_rank(self, rank: RankSpec) -> "LowRankOptions":
        """The same options with another rank rule (energy, compression and budget cleared)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(rank=rank, energy=None, compression=None, budget=None)
        return LowRankOptions(**values)
