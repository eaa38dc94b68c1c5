"""Measured layer latency for ``Budget(metric="latency")``: each layer and each of its factorized candidates timed
side by side on its real input, on the device the model will run on, with their spread, cached on disk and checked
for staleness before a cached table is used. Layers run in eager PyTorch (``backend="eager"``) or, exported to ONNX,
in ONNX Runtime on the CPU (``backend="onnxruntime"``, the ``onnx`` extra), so that a budget holds where the model
will run.

A table is one JSON file per device (``latency-<device key>.json`` under ``cache_dir``; default
``$LRLIGHTNING_CACHE`` or ``~/.cache/lrlightning``). The key names the CPU model, its instruction sets and torch's
thread count, or the CUDA device, the backend (ONNX Runtime's version; eager: the memory format) and the torch
version; an entry is keyed by the layer's geometry, its input (N, C, *size), dtype and the candidate (scheme and
rank), never by weight values. Each entry holds a ``Spread`` (median and interquartile range
over interleaved rounds) of milliseconds per forward pass of the whole batch; a candidate also holds its ratio to
the dense layer, paired per round. A file that cannot be read, or was written in another format, is measured anew
and replaced, with a log line saying so.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .allocator import freed_memory_retained
from .cpu import cpu_label
from ..deploy.int8_config import Int8Config
from ..layers import is_conv
from ..names import named_modules
from ..rules import LATENCY_BACKENDS as BACKENDS
from .serving import check_memory_format, serving_form, serving_input
from .timing import ROUND_SECONDS, ROUNDS, Spread, interleaved_samples, on_device, paired_ratios, paired_speedup, synchronize

FORMAT = 2  # of the cache file; a file of another format is measured anew
STALE_TOLERANCE = 0.2  # a cached table is stale when a re-timed reference is off by more than this fraction
CHECKED_LAYERS = 2  # layers the staleness check re-times (dense and its smallest cached candidate each)
CHECK_ROUNDS = 5  # rounds of each staleness-check timing (of the table's round length, ``ROUND_SECONDS``)

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("LRLIGHTNING_CACHE") or Path.home() / ".cache" / "lrlightning")


def device_key(device: torch.device, backend: str = "eager", memory_format: str = "channels_last") -> str:
    """What a latency depends on besides the layer: the processor (CPU model and instruction sets, see
    ``lrlightning.speed.cpu``; thread count and whether freed memory is retained, see ``lrlightning.speed.allocator``; or the
    CUDA device name), the backend (eager: with its memory format, see ``lrlightning.speed.serving``) and the torch
    version."""
    if backend == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} cpu {cpu_label()} {torch.get_num_threads()} threads torch " \
               f"{torch.__version__}"
    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        memory = " retained memory" if freed_memory_retained() else ""
        where = f"{device.type} {cpu_label()} {torch.get_num_threads()} threads{memory}"
    return f"{where} {memory_format} torch {torch.__version__}"


def runnable(module: nn.Module, example: torch.Tensor, backend: str, memory_format: str = "channels_last",
             fold: bool = False):
    """What is timed of ``module`` on inputs shaped like ``example``: eager, its serving form on ``example``'s
    device (``lrlightning.speed.serving``: eval mode, weights in ``memory_format``, BatchNorm folded when ``fold``), or
    an ONNX Runtime session of it (``lrlightning.deploy.onnx.timing_bytes``; it folds BatchNorm itself)."""
    if backend == "eager":
        return serving_form(module, memory_format, fold).to(example.device)
    module = module.to(example.device).eval()
    from ..deploy.onnx import SessionModule, session, timing_bytes

    return SessionModule(session(timing_bytes(module, example)))


def layer_key(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype) -> str:
    """A dense layer's cache key: its kind, geometry and bias, its input (N, C, *size) and dtype."""
    if is_conv(module):
        dims = "" if len(module.kernel_size) == 2 else f"{len(module.kernel_size)}d"
        geometry = (f"conv{dims} {module.in_channels}->{module.out_channels} k{module.kernel_size} s{module.stride} "
                    f"p{module.padding} d{module.dilation} g{module.groups} {module.padding_mode}")
    elif isinstance(module, nn.Linear):
        geometry = f"linear {module.in_features}->{module.out_features}"
    else:
        raise ValueError(f"latency tables time Conv1d, Conv2d, Conv3d and Linear layers, got {type(module).__name__}")
    return f"{geometry} bias={module.bias is not None} input={tuple(input_shape)} {dtype}".replace(" ", "")


def model_key(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype) -> str:
    """A whole model's cache key: a hash of its structure (its ``repr``), its input (N, C, H, W) and dtype."""
    digest = hashlib.sha1(repr(model).encode()).hexdigest()[:16]
    return f"model {digest} input={tuple(input_shape)} {dtype}".replace(" ", "")


@dataclass(frozen=True)
class LayerTimes:
    """One layer at the table's batch: ``dense`` ms, and each candidate's ``ratios`` to dense (candidate ms / dense
    ms, paired per round: below 1 runs faster); in an int8 table the candidates run in int8 against the dense layer
    in fp32, and ``dense_int8`` is the dense layer's own int8 ratio."""

    dense: Spread
    ratios: dict[str, Spread]
    dense_int8: Spread | None = None


# A layer as the staleness check sees it: the dense module, its input (C, H, W) and its candidates' builders.
LayerRequest = tuple[nn.Module, Sequence[int], dict[str, Callable[[], nn.Module]]]


class LatencyTable:
    """Per-layer latencies on ``device`` at batch ``batch_size`` in ``backend`` (``"eager"``, default, or
    ``"onnxruntime"``: CPU only), read from and written to a JSON cache. Eager modules are timed in their serving
    form (``lrlightning.speed.serving``): weights and inputs in ``memory_format`` (default ``"channels_last"``), whole
    models with BatchNorm folded.

    ``remeasure=True`` ignores the cached entries this run needs: they are timed again and the cache updated.
    ``check`` (before a cached table is used) does the same when a cheap re-timed reference has moved. ``measured``
    counts the entries this table timed, ``seconds`` is the time the file's entries took to measure, ``state`` says
    where the timings come from (``"measured"``, ``"cached"``, ``"stale"`` or ``"remeasured"``)."""

    def __init__(self, device: torch.device | str, batch_size: int, cache_dir: str | os.PathLike | None = None,
                 remeasure: bool = False, backend: str = "eager", memory_format: str = "channels_last",
                 precision: str = "fp32"):
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
        self.device = torch.device(device)
        if backend == "onnxruntime":
            if self.device.type != "cpu":
                raise ValueError(f"`backend`='onnxruntime' times on the CPU, got device {str(device)!r}")
            from ..deploy.onnx import require_onnx

            require_onnx("a latency table in ONNX Runtime")
        self.backend = backend
        if precision not in ("fp32", "int8") or (precision == "int8" and backend != "onnxruntime"):
            raise ValueError(f"`precision` must be 'fp32', or 'int8' with backend='onnxruntime', got {precision!r} "
                             f"with backend={backend!r}")
        self.precision = precision
        self.int8 = Int8Config(cache=None if cache_dir is None else os.fspath(cache_dir)).resolved() \
            if precision == "int8" else None
        self.memory_format = check_memory_format("memory_format", memory_format)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.batch_size = batch_size
        self.key = device_key(self.device, backend, memory_format)
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.key).strip("-")
        self.path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.path = self.path / f"latency-{slug}.json"
        self.entries: dict[str, dict[str, Spread]] = {}
        self.seconds = 0.0
        self.unsaved_seconds = 0.0  # measuring time not yet added to the file's
        self.measured = 0
        self.check_seconds = 0.0
        self.trusted = not remeasure  # whether cached entries may be used (else only those timed by this table)
        self.fresh: set[str] = set()
        self.state = "remeasured" if remeasure else "measured"
        self.load()

    def load(self) -> None:
        """Read the cache file, if any; one that cannot be read, or is of another format, is warned about and
        ignored (replaced, atomically, when this table is saved)."""
        stored = self.read(warn=True)
        if stored is not None:
            self.entries, self.seconds = stored

    def read(self, warn: bool = False) -> tuple[dict[str, dict[str, Spread]], float] | None:
        """(entries, seconds) of the cache file as it is on disk now; None when there is none for this device key
        or it cannot be read (warned about with ``warn``)."""
        if not self.path.exists():
            return None
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("device") != self.key:
                return None
            if stored.get("format") != FORMAT:
                if warn:
                    warnings.warn(f"latency cache {self.path} was written in format {stored.get('format')!r}, not "
                                  f"{FORMAT}; measuring a new table and replacing it")
                return None
            entries = {str(key): {str(name): Spread.from_dict(value) for name, value in entry.items()}
                       for key, entry in stored["entries"].items()}
            for key, entry in entries.items():
                needed = {"ms", "ratio"} if "|" in key and not key.startswith("model") else {"ms"}
                if not needed <= entry.keys() or any(spread.median <= 0 for spread in entry.values()):
                    raise ValueError(f"entry {key!r} lacks {sorted(needed - entry.keys())} or holds a time <= 0")
            return entries, float(stored.get("seconds", 0.0))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
            if warn:
                warnings.warn(f"latency cache {self.path} cannot be read ({type(error).__name__}: {error}); "
                              "measuring a new table and replacing it")
            return None

    def save(self) -> None:
        """Write the table (atomically), merged with what the file holds now (other tables of this device, such as
        those of other batch sizes, may have written entries since this one read it: entries timed by this table
        replace theirs); a cache that cannot be written is warned about, not fatal."""
        on_disk, seconds = self.read() or ({}, self.seconds)
        merged = {**on_disk, **{key: self.entries[key] for key in self.fresh}}
        self.entries = {**self.entries, **merged}
        self.seconds, self.unsaved_seconds = seconds + self.unsaved_seconds, 0.0
        entries = {key: {name: spread.as_dict() for name, spread in entry.items()}
                   for key, entry in sorted(merged.items())}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"format": FORMAT, "device": self.key, "seconds": round(self.seconds, 3),
                                       "entries": entries}, indent=1))
            os.replace(tmp, self.path)
        except OSError as error:
            warnings.warn(f"latency cache {self.path} cannot be written ({error}); timings are kept for this "
                          "process only", stacklevel=2)

    def cached(self, key: str) -> bool:
        """Whether the entry ``key`` may be used as it is (cached and trusted, or timed by this table)."""
        return key in self.entries and (self.trusted or key in self.fresh)

    def store(self, key: str, **fields: Spread) -> None:
        self.entries[key] = fields
        self.fresh.add(key)

    def example(self, input_shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A random batch of ``batch_size`` inputs of ``input_shape``, in the table's memory format (eager)."""
        example = torch.randn(self.batch_size, *input_shape, device=self.device, dtype=dtype)
        return serving_input(example, self.memory_format) if self.backend == "eager" else example

    def runnable(self, module: nn.Module, example: torch.Tensor, fold: bool = False):
        """``runnable`` in this table's backend and memory format."""
        return runnable(module, example, self.backend, self.memory_format, fold)

    def int8_runnable(self, module: nn.Module, example: torch.Tensor, in_chain: bool = True):
        """``module`` in int8 as this table's settings quantize it (``lrlightning.deploy.precision.int8_runnable``)."""
        from ..deploy.precision import int8_runnable

        return int8_runnable(module.to(example.device), example, self.int8, in_chain)

    def int8_label(self) -> str:
        from ..deploy.precision import int8_label

        return int8_label(self.int8)

    def layer_times(self, module: nn.Module, input_shape: Sequence[int],
                    candidates: dict[str, Callable[[], nn.Module]]) -> LayerTimes:
        """``LayerTimes`` of ``module`` and its factorized ``candidates`` (label: a function building the layer;
        only those to be timed are built) on a random batch of ``batch_size`` inputs of ``input_shape`` (C, H, W).
        What the cache lacks is timed interleaved with the dense layer (so every ratio is paired) and stored."""
        dtype = module.weight.dtype
        base = layer_key(module, (self.batch_size, *input_shape), dtype)
        if self.precision == "int8":
            suffix = f" {self.int8_label()}"
            built = {f"{label}{suffix}": lambda example, build=build: self.int8_runnable(build(), example)
                     for label, build in candidates.items()}
            built[f"dense{suffix}"] = lambda example: self.int8_runnable(copy.deepcopy(module), example)
            times = self.pair_times(base, lambda: self.example(input_shape, dtype),
                                    lambda example: self.runnable(copy.deepcopy(module), example), built)
            return LayerTimes(times.dense, {label: times.ratios[f"{label}{suffix}"] for label in candidates},
                              times.ratios[f"dense{suffix}"])
        return self.pair_times(base, lambda: self.example(input_shape, dtype),
                               lambda example: self.runnable(copy.deepcopy(module), example),
                               {label: lambda example, build=build: self.runnable(build(), example)
                                for label, build in candidates.items()})

    def pair_times(self, base: str, make_example: Callable[[], torch.Tensor], reference: Callable,
                   candidates: dict[str, Callable]) -> LayerTimes:
        """``LayerTimes`` of a ``reference`` and its ``candidates`` (label: a function of the example batch
        returning what is timed; only those to be timed are built), cached under ``base`` and ``base|label``:
        what the cache lacks is timed interleaved with the reference on ``make_example()`` and stored."""
        keys = {label: f"{base}|{label}" for label in candidates}
        missing = [label for label in candidates if not self.cached(keys[label])]
        if missing or not self.cached(base):
            example = make_example()
            timed = [reference(example), *(candidates[label](example) for label in missing)]
            start = time.perf_counter()
            samples = interleaved_samples(timed, example, paired=True)
            self.unsaved_seconds += time.perf_counter() - start
            self.store(base, ms=Spread.of(samples[0]))
            for label, times in zip(missing, samples[1:]):
                self.store(keys[label], ms=Spread.of(times), ratio=paired_ratios(times, samples[0]))
            self.measured += 1 + len(missing)
            self.save()
        return LayerTimes(self.entries[base]["ms"], {label: self.entries[keys[label]]["ratio"] for label in candidates})

    def model_ms(self, model: nn.Module, input_shape: Sequence[int], names: Sequence[str] = (),
                 int8: bool = False) -> tuple[float, dict[str, float]]:
        """(median ms of one forward pass of ``model``, {name: median ms spent inside that submodule during a
        pass}) for the submodules ``names`` (canonical names), so layers are also timed where they run, on the
        model's own activations. The model's serving form (a copy, see ``lrlightning.speed.serving``), a random
        batch; cached under a hash of the model's structure (``model_key``). ONNX Runtime runs the graph whole, so
        there no submodule is timed inside it (the dict is empty); ``int8`` times it quantized (int8 tables)."""
        parameter = next(model.parameters())
        key = model_key(model, (self.batch_size, *input_shape), parameter.dtype)
        if int8:
            key = f"{key}|{self.int8_label()}"
        if self.backend != "eager":
            if not self.cached(key):
                example = self.example(input_shape, parameter.dtype)
                timed = (self.int8_runnable(copy.deepcopy(model), example, in_chain=False) if int8 else
                         self.runnable(copy.deepcopy(model), example, fold=True))
                start = time.perf_counter()
                (samples,) = interleaved_samples([timed], example)
                self.unsaved_seconds += time.perf_counter() - start
                self.store(key, ms=Spread.of(samples))
                self.measured += 1
                self.save()
            return self.entries[key]["ms"].median, {}
        keys = {name: f"{key}|{name}" for name in names}
        if not self.cached(key) or any(not self.cached(k) for k in keys.values()):
            timed = serving_form(model, self.memory_format).to(self.device)
            start = time.perf_counter()
            whole, inside = profile_ms(timed, self.example(input_shape, parameter.dtype), names)
            self.unsaved_seconds += time.perf_counter() - start
            self.store(key, ms=whole)
            for name, spread in inside.items():
                self.store(keys[name], ms=spread)
            self.measured += 1
            self.save()
        return self.entries[key]["ms"].median, {name: self.entries[k]["ms"].median for name, k in keys.items()}

    def speedup(self, dense: nn.Module, factorized: nn.Module, input_shape: Sequence[int]) -> Spread:
        """Dense / factorized whole-model speedup on this table's device and batch, timed interleaved, per-round
        ratios (``lrlightning.speed.timing.paired_speedup``; serving forms of copies, never cached). In an int8
        table the factorized model runs in int8, the dense one in fp32."""
        parameter = next(dense.parameters())
        example = self.example(input_shape, parameter.dtype)
        copies = [self.runnable(copy.deepcopy(dense), example, fold=True),
                  self.int8_runnable(copy.deepcopy(factorized), example, in_chain=False) if self.precision == "int8"
                  else self.runnable(copy.deepcopy(factorized), example, fold=True)]
        return paired_speedup(*copies, example)[2]

    def check(self, layers: Sequence[LayerRequest]) -> None:
        """Before cached entries are used: re-time cheap references (``CHECKED_LAYERS`` of the cached ``layers``,
        each with its smallest cached candidate) and compare them with the cache. When the median over
        their times and ratios is off by more than ``STALE_TOLERANCE``, the table is distrusted for this run: what
        it needs is timed again and the cache updated, and a log line says so. Nothing is checked when none of it
        is cached, or under ``remeasure``. (The whole model is not re-timed: one pass costs as much as checking
        several layers, and it runs on the same processor as they do.)"""
        if not self.trusted:
            return
        start = time.perf_counter()
        offs = [off for request in self.checked_layers(layers) for off in self.layer_offs(*request)]
        self.check_seconds = time.perf_counter() - start
        if offs:
            self.judge({f"{len(offs)} layer timings (median)": typical(offs)})

    def check_pairs(self, requests: Sequence[tuple[str, Callable[[], torch.Tensor], Callable, dict[str, Callable]]]
                    ) -> None:
        """``check`` for entries timed with ``pair_times``: re-time the cached ``requests`` (base key, example
        maker, reference, candidates, as ``pair_times`` takes them) and distrust the table when the median of
        their times and ratios is off by more than ``STALE_TOLERANCE``. Nothing is checked under ``remeasure``."""
        if not self.trusted:
            return
        start = time.perf_counter()
        offs = [off for base, make_example, reference, candidates in requests
                if self.cached(base) and all(self.cached(f"{base}|{label}") for label in candidates)
                for off in self.pair_offs(base, make_example(), reference, candidates)]
        self.check_seconds += time.perf_counter() - start
        if offs:
            self.judge({f"{len(offs)} timings (median)": typical(offs)})

    def judge(self, offs: dict[str, float]) -> None:
        """Distrust the table (``state`` "stale", a log warning) when one of ``offs`` (re-timed / cached, by
        what was re-timed) is off by more than ``STALE_TOLERANCE``; else confirm it (``state`` "cached")."""
        if not offs:
            return
        stale = {what: off for what, off in offs.items() if abs(math.log(off)) > math.log1p(STALE_TOLERANCE)}
        if stale:
            self.trusted, self.state = False, "stale"
            what = ", ".join(f"{what} {off:.2f}x" for what, off in stale.items())
            log.warning("latency table %s is stale: re-timed, %s the cached time (tolerance %d %%); re-measuring it "
                        "for this run and updating the cache", self.path, what, round(100 * STALE_TOLERANCE))
        else:
            self.state = "cached"
            log.info("latency table %s: cached timings confirmed in %.2f s (%s)", self.path, self.check_seconds,
                     ", ".join(f"{what} {off:.2f}x" for what, off in offs.items()))

    def checked_layers(self, layers: Sequence[LayerRequest]) -> list[tuple[nn.Module, Sequence[int], dict]]:
        """Up to ``CHECKED_LAYERS`` of ``layers`` whose dense time and some candidate are cached, spread evenly
        over their cached dense times (one per layer shape), each with its last (smallest) cached candidate."""
        found = []
        for module, input_shape, candidates in layers:
            base = layer_key(module, (self.batch_size, *input_shape), module.weight.dtype)
            cached = [label for label in candidates if self.cached(f"{base}|{label}")]
            if self.cached(base) and cached and all(base != item[1] for item in found):
                found.append((self.entries[base]["ms"].median, base, module, input_shape,
                              {cached[-1]: candidates[cached[-1]]}))
        found.sort(key=lambda item: item[0])
        if len(found) > CHECKED_LAYERS:
            step = (len(found) - 1) / max(CHECKED_LAYERS - 1, 1)
            found = [found[round(i * step)] for i in range(CHECKED_LAYERS)]
        return [item[2:] for item in found]

    def layer_offs(self, module: nn.Module, input_shape: Sequence[int],
                   candidates: dict[str, Callable[[], nn.Module]]) -> list[float]:
        """Re-timed / cached, for the dense layer, each candidate and each candidate's ratio to dense."""
        base = layer_key(module, (self.batch_size, *input_shape), module.weight.dtype)
        return self.pair_offs(base, self.example(input_shape, module.weight.dtype),
                              lambda example: self.runnable(copy.deepcopy(module), example),
                              {label: lambda example, build=build: self.runnable(build(), example)
                               for label, build in candidates.items()})

    def pair_offs(self, base: str, example: torch.Tensor, reference: Callable,
                  candidates: dict[str, Callable]) -> list[float]:
        """Re-timed / cached, for the reference under ``base``, each candidate and each candidate's ratio to it,
        timed on ``example`` (``CHECK_ROUNDS`` rounds)."""
        timed = [reference(example), *(build(example) for build in candidates.values())]
        samples = interleaved_samples(timed, example, CHECK_ROUNDS, ROUND_SECONDS, CHECK_ROUNDS)
        offs = [statistics.median(samples[0]) / self.entries[base]["ms"].median]
        for label, times in zip(candidates, samples[1:]):
            entry = self.entries[f"{base}|{label}"]
            offs.append(statistics.median(times) / entry["ms"].median)
            offs.append(paired_ratios(times, samples[0]).median / entry["ratio"].median)
        return offs

    def facts(self) -> dict[str, object]:
        """Where this table's timings came from: ``state``, ``measured`` (layers and candidates timed now, a model
        pass counting once), ``unsettled`` (how many spreads timed now stayed wider than the tolerance), ``seconds``
        spent measuring the file's entries (over every run that measured some), ``check_seconds`` of the
        staleness check, and the cache ``path``."""
        unsettled = sum(not spread.settled for key in self.fresh for spread in self.entries[key].values())
        return {"state": self.state, "backend": self.backend, "precision": self.precision,
                "memory_format": self.memory_format if self.backend == "eager" else None,
                "measured": self.measured, "unsettled": unsettled,
                "seconds": round(self.seconds, 3), "check_seconds": round(self.check_seconds, 3),
                "path": str(self.path)}


def typical(offs: Sequence[float]) -> float:
    """The median of re-timed / cached ratios, taken on their logarithms (so 2x and 0.5x weigh alike)."""
    return math.exp(statistics.median(math.log(off) for off in offs))


def profile_ms(model: nn.Module, example: torch.Tensor, names: Sequence[str], rounds: int = ROUNDS) -> tuple[
        Spread, dict[str, Spread]]:
    """(ms of a whole forward pass, {name: ms inside that submodule}) over ``rounds`` passes each, in eval mode
    (restored after), CUDA synchronized around each timed module: the whole pass timed as ``interleaved_samples``
    does, the submodules by hooks in a second series of passes."""
    modules = named_modules(model)
    started: dict[str, float] = {}
    inside: dict[str, list[float]] = {name: [] for name in names}

    def before(name):
        def hook(module, args):
            synchronize(example.device)
            started[name] = time.perf_counter()
        return hook

    def after(name):
        def hook(module, args, output):
            synchronize(example.device)
            inside[name].append(1000.0 * (time.perf_counter() - started[name]))
        return hook

    was_training = model.training
    model.eval()
    try:
        (whole,) = interleaved_samples([model], example, rounds)
        with torch.inference_mode(), on_device(example.device):
            hooks = [modules[n].register_forward_pre_hook(before(n)) for n in names]
            hooks += [modules[n].register_forward_hook(after(n)) for n in names]
            try:
                time_passes(model, example, rounds)
            finally:
                for hook in hooks:
                    hook.remove()
    finally:
        model.train(was_training)
    return Spread.of(whole), {name: Spread.of(times) for name, times in inside.items()}


def time_passes(model: nn.Module, example: torch.Tensor, rounds: int) -> list[float]:
    """Seconds of each of ``rounds`` forward passes (CUDA synchronized)."""
    times = []
    for _ in range(rounds):
        synchronize(example.device)
        start = time.perf_counter()
        model(example)
        synchronize(example.device)
        times.append(time.perf_counter() - start)
    return times
