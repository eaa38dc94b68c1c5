"""Rank rules: how each selected layer's rank is chosen. A rule is a fixed rank (a number, a tucker2 pair or a
mapping of layer names to ranks), ``Energy``, ``Compression`` or ``Budget``; each validates itself."""
from __future__ import annotations

import os
import warnings
from dataclasses import MISSING, InitVar, dataclass, field, fields
from typing import Any, Mapping, Sequence

from .devices import check_device
from .speed.serving import check_memory_format

RankSpec = int | float | tuple[int, int] | dict[str, int | tuple[int, int]]
BUDGET_METRICS = ("params", "macs", "latency")
LATENCY_BACKENDS = ("eager", "onnxruntime")
BUDGET_OBJECTIVES = ("max", "sum")
OUT_OF_REACH = ("raise", "closest")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Energy:
    """The smallest rank keeping ``fraction`` (in (0, 1]) of each layer's squared singular-value energy, resolved
    once from the weights when the plan is made."""

    fraction: float

    def __post_init__(self):
        if not (is_number(self.fraction) and 0.0 < self.fraction <= 1.0):
            raise ValueError(f"`Energy.fraction` must be a number in (0, 1], got {self.fraction!r}")


@dataclass(frozen=True)
class Compression:
    """Per layer, the largest rank whose factorized layer has at least ``factor`` (> 1) times fewer weight
    parameters than the dense layer."""

    factor: float

    def __post_init__(self):
        if not (is_number(self.factor) and self.factor > 1.0):
            raise ValueError(f"`Compression.factor` must be a number > 1 (dense / factorized params per layer), "
                             f"got {self.factor!r}")


LATENCY_FIELDS = ("batch_sizes", "device", "cache", "remeasure", "backend", "memory_format", "precision")
FLAT_LATENCY = {"latency_batch_size": "batch_sizes", **{f"latency_{name}": name for name in LATENCY_FIELDS[1:6]}}
LATENCY_PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class Latency:
    """How a ``Budget(metric="latency")`` is timed (``lrlightning.speed.latency``).

    ``batch_sizes``: the batch sizes the model is served at (one or more ints >= 1; default (32,)); the allocation
    meets the budget at each of them, or says which one it cannot meet. ``device``: where layers are timed (default
    None: the weights' device; the CPU at torch's thread count). ``cache``: the directory of the latency table
    (default ``$LRLIGHTNING_CACHE`` or ~/.cache/lrlightning); a cached table is checked for staleness before use
    and timed anew with ``remeasure=True``. ``backend``: ``"eager"`` (default: PyTorch) or ``"onnxruntime"`` (each
    layer and the model exported to ONNX and timed in ONNX Runtime on the CPU, where an ``lrl-train deploy=onnx``
    artifact runs; the ``onnx`` extra). Eager timings are of the model as it is served
    (``lrlightning.speed.serving``): BatchNorm folded, conv weights and inputs in ``memory_format``
    (``"channels_last"``, default, or ``"contiguous"``). ``precision``: ``"fp32"`` (default) or ``"int8"``
    (``backend="onnxruntime"`` only): candidates, layers left dense and the whole model are timed as int8, quantized
    as ``lrlightning.Int8Config()`` chooses for this CPU, against the dense model in fp32, so that the speedup holds
    for the int8 file that ships (``lrl-train deploy=int8``)."""

    batch_sizes: tuple[int, ...] = (32,)
    device: str | None = None
    cache: str | None = None
    remeasure: bool = False
    backend: str = "eager"
    memory_format: str = "channels_last"
    precision: str = "fp32"

    def __post_init__(self):
        sizes = (self.batch_sizes,) if is_int(self.batch_sizes) else self.batch_sizes
        if not (isinstance(sizes, Sequence) and not isinstance(sizes, str) and len(sizes) >= 1
                and all(is_int(size) and size >= 1 for size in sizes) and len(set(sizes)) == len(sizes)):
            raise ValueError(f"`Latency.batch_sizes` must be one or more distinct ints >= 1, such as (1, 32), got "
                             f"{self.batch_sizes!r}")
        object.__setattr__(self, "batch_sizes", tuple(int(size) for size in sizes))
        if self.cache is not None:
            if not isinstance(self.cache, (str, os.PathLike)):
                raise ValueError(f"`Latency.cache` must be a directory path, got {self.cache!r}")
            object.__setattr__(self, "cache", os.fspath(self.cache))
        if not isinstance(self.remeasure, bool):
            raise ValueError(f"`Latency.remeasure` must be a bool, got {self.remeasure!r}")
        if self.backend not in LATENCY_BACKENDS:
            raise ValueError(f"`Latency.backend` must be one of {LATENCY_BACKENDS}, got {self.backend!r}")
        if self.backend == "onnxruntime" and self.device not in (None, "cpu"):
            raise ValueError(f"`Latency.backend`='onnxruntime' times on the CPU; `Latency.device` must be None or "
                             f"'cpu', got {self.device!r}")
        check_device("Latency.device", self.device)
        check_memory_format("Latency.memory_format", self.memory_format)
        if self.precision not in LATENCY_PRECISIONS:
            raise ValueError(f"`Latency.precision` must be one of {LATENCY_PRECISIONS}, got {self.precision!r}")
        if self.precision == "int8" and self.backend != "onnxruntime":
            raise ValueError(f"`Latency.precision`='int8' is timed in ONNX Runtime; `Latency.backend` must be "
                             f"'onnxruntime', got {self.backend!r}")

    @property
    def batch_size(self) -> int:
        """The first of ``batch_sizes``: the one a single figure is given at."""
        return self.batch_sizes[0]


def flat_keyword():
    """A deprecated keyword of ``Budget`` spelling one ``Latency`` field flat (``latency_<field>``): keyword-only,
    not a field of the object."""
    return field(default=None, kw_only=True)


@dataclass(frozen=True)
class Budget:
    """The whole model ``factor`` (> 1) times smaller in ``metric``, or that many times faster, with ranks
    allocated across the selected layers (``lrlightning.budget``); a layer may stay dense.

    ``metric``: ``"params"`` (default), ``"macs"`` per sample of ``input_shape`` (one sample's shape: (C, L) for
    Conv1d models, (C, H, W), (C, D, H, W) for Conv3d ones), or ``"latency"``: measured per layer as ``latency``
    says (a ``Latency``, or a mapping of its fields; default ``Latency()``: the weights' device, batch 32, eager,
    cached), at each of its batch sizes. The allocated model is then timed against dense and allocated again while
    it misses beyond the noise at some batch size (``lrlightning.speed.speedup_check``), and no layer is factorized
    into something not faster beyond the noise at every batch size.
    ``objective``: minimize the largest normalized error over layers (``"max"``) or their sum (``"sum"``); default
    None: ``"max"`` over weight errors, ``"sum"`` over output errors (an ``Activation`` projection objective with
    input statistics), the better of the two for each on trained models (docs/results.md). Candidate ranks are
    multiples of ``rank_multiple`` (default 8) where a layer's full rank is at least 16× that, else of the largest
    power of two fitting 16 times.
    ``reallocations``: the callback allocates again from the current weights before each of its first
    ``reallocations`` periodic projections (default 0: once, when fit starts).
    ``out_of_reach``: what a ``factor`` that the selected layers cannot reach does: ``"raise"`` (default) a
    ValueError naming the best reachable ratio; ``"closest"`` keeps the allocation closest to it (the smallest, or
    for latency the fastest as measured on this machine, its ``Allocation.check`` verdict ``"short"``) with a
    warning: a request such as "1.3x faster" then runs without an error on any CPU where some layer gets faster,
    and the record says how far it got.
    The flat keywords ``latency_batch_size``, ``latency_device``, ``latency_cache``, ``latency_remeasure``,
    ``latency_backend`` and ``latency_memory_format`` of earlier configs still build ``latency``, with a
    DeprecationWarning.
    """

    factor: float
    metric: str = "params"
    input_shape: tuple[int, ...] | None = None
    objective: str | None = None
    rank_multiple: int = 8
    reallocations: int = 0
    latency: Latency | None = None
    out_of_reach: str = "raise"
    latency_batch_size: InitVar[int | None] = flat_keyword()
    latency_device: InitVar[str | None] = flat_keyword()
    latency_cache: InitVar[str | None] = flat_keyword()
    latency_remeasure: InitVar[bool | None] = flat_keyword()
    latency_backend: InitVar[str | None] = flat_keyword()
    latency_memory_format: InitVar[str | None] = flat_keyword()

    def __post_init__(self, latency_batch_size, latency_device, latency_cache, latency_remeasure, latency_backend,
                      latency_memory_format):
        if not (is_number(self.factor) and self.factor > 1.0):
            raise ValueError(f"`Budget.factor` must be a number > 1 (dense / compressed, over the whole model), "
                             f"got {self.factor!r}")
        if self.metric not in BUDGET_METRICS:
            raise ValueError(f"`Budget.metric` must be one of {BUDGET_METRICS}, got {self.metric!r}")
        shape = self.input_shape
        if shape is not None:
            if not (isinstance(shape, Sequence) and not isinstance(shape, str) and len(shape) >= 1
                    and all(is_int(v) and v >= 1 for v in shape)):
                raise ValueError(f"`Budget.input_shape` must be the shape of one sample, such as (C, H, W), (C, L) or "
                                 f"(C, D, H, W): ints >= 1, got {shape!r}")
            object.__setattr__(self, "input_shape", tuple(int(v) for v in shape))
        elif self.metric != "params":
            raise ValueError(f"`Budget.metric`={self.metric!r} needs `input_shape`, the shape of one sample "
                             "((C, H, W), (C, L) or (C, D, H, W)), "
                             "got None")
        if self.objective is not None and self.objective not in BUDGET_OBJECTIVES:
            raise ValueError(f"`Budget.objective` must be None or one of {BUDGET_OBJECTIVES}, got {self.objective!r}")
        for argument, least in (("rank_multiple", 1), ("reallocations", 0)):
            value = getattr(self, argument)
            if not (is_int(value) and value >= least):
                raise ValueError(f"`Budget.{argument}` must be an int >= {least}, got {value!r}")
        flat = {name: value for name, value in zip(FLAT_LATENCY, (
            latency_batch_size, latency_device, latency_cache, latency_remeasure, latency_backend,
            latency_memory_format)) if value is not None}
        if self.latency is not None or flat or self.metric == "latency":
            object.__setattr__(self, "latency", latency_of(self.latency, flat))
        if self.out_of_reach not in OUT_OF_REACH:
            raise ValueError(f"`Budget.out_of_reach` must be one of {OUT_OF_REACH}, got {self.out_of_reach!r}")


def latency_of(latency: Any, flat: Mapping[str, Any] | None = None) -> Latency:
    """``Budget.latency`` as a ``Latency``: given as one, as a mapping of its fields, or None (the defaults);
    ``flat`` holds the deprecated ``latency_<field>`` keywords given (``FLAT_LATENCY``; warned about, and never
    together with ``latency``)."""
    if latency is None:
        fields_given = {}
    elif isinstance(latency, Latency):
        fields_given = {}
    elif isinstance(latency, Mapping):
        unknown = sorted(set(map(str, latency)) - set(LATENCY_FIELDS))
        if unknown:
            raise ValueError(f"`Budget.latency` has unknown fields {unknown}; a Latency has {list(LATENCY_FIELDS)}")
        fields_given = dict(latency)
    else:
        raise ValueError(f"`Budget.latency` must be a lrlightning.Latency, a mapping of its fields or None, got "
                         f"{latency!r}")
    if flat:
        spelled = ", ".join(f"{name}=..." for name in flat)
        if latency is not None:
            raise ValueError(f"`Budget` got both `latency` and the flat keywords {spelled}; give `latency` only")
        warnings.warn(f"`Budget({spelled})` is deprecated: give `latency=Latency(...)` (fields "
                      f"{', '.join(LATENCY_FIELDS)}; `latency_batch_size=n` is `batch_sizes=(n,)`)",
                      DeprecationWarning, stacklevel=4)
        fields_given = {FLAT_LATENCY[name]: value for name, value in flat.items()}
    return latency if isinstance(latency, Latency) else Latency(**fields_given)


RankRule = RankSpec | Energy | Compression | Budget
RULE_TYPES = (Energy, Compression, Budget)
DEFAULT_RULE = Compression(2.0)


def check_layer_rank(argument: str, value: Any, allow_pair: bool) -> int | tuple[int, int]:
    """A positive int, or (tucker2) a pair of positive ints; returns it normalized."""
    if is_int(value) and value >= 1:
        return int(value)
    if allow_pair and isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        if all(is_int(v) and v >= 1 for v in value):
            return (int(value[0]), int(value[1]))
    allowed = "an int >= 1 or a pair (R_in, R_out) of ints >= 1" if allow_pair else "an int >= 1"
    raise ValueError(f"`{argument}` must be {allowed}, got {value!r}")


def rank_rule(rank: Any, pair: bool) -> RankRule:
    """Validate a rank rule for a scheme taking pair ranks (``pair``) or not; returns it normalized (lists to
    tuples, mappings to dicts of str)."""
    if isinstance(rank, RULE_TYPES):
        return rank
    if isinstance(rank, float):
        if 0.0 < rank <= 1.0:
            return rank
        raise ValueError(f"`rank` as a float is a fraction of the layer's full rank and must be in (0, 1], got {rank!r}")
    if isinstance(rank, Mapping):
        return {str(name): check_layer_rank(f"rank[{name!r}]", value, pair) for name, value in rank.items()}
    if is_int(rank) and rank >= 1 or (pair and isinstance(rank, Sequence) and not isinstance(rank, str)):
        return check_layer_rank("rank", rank, pair)
    allowed = "an int >= 1, a float in (0, 1]" + (", a pair (R_in, R_out)" if pair else "")
    raise ValueError(f"`rank` must be {allowed}, a mapping of layer names to ranks, Energy(fraction), "
                     f"Compression(factor) or Budget(factor, ...); got {rank!r}")


def rule_record(rule: RankRule) -> dict[str, Any]:
    """The rule as ``summary.json`` records it: ``{"rank": ...}``, ``{"energy": f}``, ``{"compression": c}`` or
    ``{"budget": b, "metric": m}`` (``"backend"`` too for latency, and ``"precision"`` when int8; JSON values: tuples
    as lists)."""
    if isinstance(rule, (Energy, Compression, Budget)):
        return record_of(type(rule).__name__, vars(rule))
    if isinstance(rule, dict):
        return {"rank": {name: list(r) if isinstance(r, tuple) else r for name, r in rule.items()}}
    return {"rank": list(rule) if isinstance(rule, tuple) else rule}


def record_of(kind: str, values: Mapping[str, Any]) -> dict[str, Any] | None:
    """``rule_record`` of an ``Energy``, ``Compression`` or ``Budget`` (``kind``) given by its field ``values``, such
    as a config node (missing fields take the class's defaults); None when a field without default is missing."""
    classes = {"Energy": Energy, "Compression": Compression, "Budget": Budget}
    defaults = {f.name: f.default for f in fields(classes[kind]) if f.default is not MISSING}
    values = {**defaults, **values}
    if any(f.name not in values for f in fields(classes[kind]) if f.default is MISSING and f.init):
        return None
    if kind == "Energy":
        return {"energy": values["fraction"]}
    if kind == "Compression":
        return {"compression": float(values["factor"])}
    record = {"budget": float(values["factor"]), "metric": values["metric"]}
    if values["metric"] != "latency":
        return record
    latency = values.get("latency")
    backend = latency.backend if isinstance(latency, Latency) else (latency or {}).get("backend") \
        if isinstance(latency, Mapping) or latency is None else None
    precision = latency.precision if isinstance(latency, Latency) else (latency or {}).get("precision") \
        if isinstance(latency, Mapping) or latency is None else None
    record = {**record, "backend": backend or values.get("latency_backend") or Latency.backend}
    return {**record, "precision": precision} if precision not in (None, Latency.precision) else record


def rule_label(record: Mapping[str, Any]) -> str:
    """A short text of a ``rule_record``: the rank (``0.5``, ``6x8``), ``4x`` (compression), ``budget=2x macs``,
    ``energy=0.9``, or ``per-layer`` for a mapping."""
    if "budget" in record:
        backend = f" ({record['backend']})" if record.get("backend", "eager") != "eager" else ""
        if record.get("precision", "fp32") != "fp32":
            backend = f"{backend[:-1]} {record['precision']})"
        return f"budget={float(record['budget']):g}x {record.get('metric', 'params')}{backend}"
    if "compression" in record:
        return f"{float(record['compression']):g}x"
    if "energy" in record:
        return f"energy={record['energy']}"
    rank = record.get("rank")
    if isinstance(rank, dict):
        return "per-layer"
    return "x".join(map(str, rank)) if isinstance(rank, (list, tuple)) else str(rank)
