"""Measured layer latency for ``budget_metric="latency"``: each layer and each of its factorized candidates timed
side by side on its real input, on the device the model will run on, cached on disk.

A table is one JSON file per device (``latency-<device key>.json`` under ``cache_dir``; default
``$LRLIGHTNING_CACHE`` or ``~/.cache/lrlightning``). The key names the CPU model and torch's thread count, or the
CUDA device, and the torch version; an entry is keyed by the layer's geometry, its input (N, C, H, W), dtype and the
candidate (scheme and rank), never by weight values. Times are milliseconds per forward pass of the whole batch.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils import benchmark

from .allocator import freed_memory_retained
from .names import named_modules

ROUNDS = 5  # interleaved rounds; the fastest round of each variant is kept (noise only adds time)
ROUND_SECONDS = 0.01  # timed per variant per round


def default_cache_dir() -> Path:
    return Path(os.environ.get("LRLIGHTNING_CACHE") or Path.home() / ".cache" / "lrlightning")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(device: torch.device) -> str:
    """What a latency depends on besides the layer: the processor (CPU model, thread count and whether freed memory
    is retained, see ``lrlightning.allocator``; or the CUDA device name) and the torch version."""
    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        memory = " retained memory" if freed_memory_retained() else ""
        where = f"{device.type} {cpu_model()} {torch.get_num_threads()} threads{memory}"
    return f"{where} torch {torch.__version__}"


def layer_key(module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype) -> str:
    """A dense layer's cache key: its kind, geometry and bias, its input (N, C, H, W) and dtype."""
    if isinstance(module, nn.Conv2d):
        geometry = (f"conv {module.in_channels}->{module.out_channels} k{module.kernel_size} s{module.stride} "
                    f"p{module.padding} d{module.dilation} g{module.groups} {module.padding_mode}")
    elif isinstance(module, nn.Linear):
        geometry = f"linear {module.in_features}->{module.out_features}"
    else:
        raise ValueError(f"latency tables time Conv2d and Linear layers, got {type(module).__name__}")
    return f"{geometry} bias={module.bias is not None} input={tuple(input_shape)} {dtype}".replace(" ", "")


def time_interleaved(modules: Sequence[nn.Module], example: torch.Tensor, rounds: int = ROUNDS,
                     round_seconds: float = ROUND_SECONDS) -> list[float]:
    """Milliseconds per forward pass of each module on ``example`` (no grad): the fastest of ``rounds``
    interleaved rounds of about ``round_seconds`` each, timed with ``torch.utils.benchmark`` (CUDA synchronized),
    so that machine noise hits every module alike."""
    threads = torch.get_num_threads()
    timers = [benchmark.Timer("module(x)", globals={"module": m, "x": example}, num_threads=threads)
              for m in modules]
    with torch.inference_mode(), on_device(example.device):
        for module in modules:
            module(example)
        probe = timers[0].timeit(1).median
        number = max(1, int(round_seconds / max(probe, 1e-7)))
        times: list[list[float]] = [[] for _ in modules]
        for _ in range(rounds):
            for index, timer in enumerate(timers):
                times[index].append(timer.timeit(number).median)
    return [1000.0 * min(samples) for samples in times]


class LatencyTable:
    """Per-layer latencies on ``device`` at batch ``batch_size``, read from and written to a JSON cache."""

    def __init__(self, device: torch.device | str, batch_size: int, cache_dir: str | os.PathLike | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.batch_size = batch_size
        self.key = device_key(self.device)
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", self.key).strip("-")
        self.path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.path = self.path / f"latency-{slug}.json"
        self.entries: dict[str, float] = {}
        if self.path.exists():
            stored = json.loads(self.path.read_text())
            if stored.get("device") == self.key:
                self.entries = dict(stored.get("entries", {}))
        self.measured = 0  # entries timed by this table (not read from the cache)

    def save(self) -> None:
        """Write the table (atomically); a cache that cannot be written is warned about, not fatal."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"device": self.key, "entries": dict(sorted(self.entries.items()))}, indent=1))
            os.replace(tmp, self.path)
        except OSError as error:
            warnings.warn(f"latency cache {self.path} cannot be written ({error}); timings are kept for this "
                          "process only", stacklevel=2)

    def layer_ms(self, module: nn.Module, input_shape: Sequence[int],
                 candidates: dict[str, Callable[[], nn.Module]]) -> tuple[float, dict[str, float]]:
        """(dense ms, {candidate label: ms}) of ``module`` and its factorized ``candidates`` (label: a function
        building the layer; only those missing from the cache are built) on a random batch of ``batch_size`` inputs
        of ``input_shape`` (C, H, W); what the cache lacks is timed, dense and candidates interleaved, and stored."""
        parameter = module.weight
        base = layer_key(module, (self.batch_size, *input_shape), parameter.dtype)
        keys = {"dense": base, **{label: f"{base}|{label}" for label in candidates}}
        missing = [label for label, key in keys.items() if key not in self.entries]
        if missing:
            build = {"dense": lambda: copy.deepcopy(module), **candidates}
            timed = [build[label]().to(self.device).eval() for label in missing]
            example = torch.randn(self.batch_size, *input_shape, device=self.device, dtype=parameter.dtype)
            for label, ms in zip(missing, time_interleaved(timed, example)):
                self.entries[keys[label]] = ms
            self.measured += len(missing)
            self.save()
        return self.entries[keys["dense"]], {label: self.entries[keys[label]] for label in candidates}

    def model_ms(self, model: nn.Module, input_shape: Sequence[int], names: Sequence[str] = ()) -> tuple[
            float, dict[str, float]]:
        """(ms of one forward pass of ``model``, {name: ms spent inside that submodule during the pass}) for the
        submodules ``names`` (canonical names), so layers are also timed where they run, on the model's own
        activations. Eval mode (restored after; a copy when the model lives on another device), a random batch,
        the fastest of ``ROUNDS`` passes for each; cached under a hash of the model's structure (its ``repr``)."""
        parameter = next(model.parameters())
        digest = hashlib.sha1(repr(model).encode()).hexdigest()[:16]
        key = f"model {digest} input={(self.batch_size, *input_shape)} {parameter.dtype}".replace(" ", "")
        keys = {name: f"{key}|{name}" for name in names}
        if key not in self.entries or any(k not in self.entries for k in keys.values()):
            timed = model if parameter.device == self.device else copy.deepcopy(model).to(self.device)
            example = torch.randn(self.batch_size, *input_shape, device=self.device, dtype=parameter.dtype)
            whole, inside = profile_ms(timed, example, names)
            self.entries[key] = whole
            self.entries.update({keys[name]: ms for name, ms in inside.items()})
            self.measured += 1
            self.save()
        return self.entries[key], {name: self.entries[k] for name, k in keys.items()}


def profile_ms(model: nn.Module, example: torch.Tensor, names: Sequence[str], rounds: int = ROUNDS) -> tuple[
        float, dict[str, float]]:
    """(fastest ms of a whole forward pass, {name: fastest ms inside that submodule}) over ``rounds`` passes, in
    eval mode (restored after), CUDA synchronized around each timed module."""
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
            inside[name].append(time.perf_counter() - started[name])
        return hook

    was_training = model.training
    model.eval()
    wholes = []
    with torch.inference_mode(), on_device(example.device):
        model(example)
        wholes = [1000.0 * t for t in time_passes(model, example, rounds)]
        hooks = [modules[n].register_forward_pre_hook(before(n)) for n in names]
        hooks += [modules[n].register_forward_hook(after(n)) for n in names]
        try:
            time_passes(model, example, rounds)
        finally:
            for hook in hooks:
                hook.remove()
            model.train(was_training)
    return min(wholes), {name: 1000.0 * min(times) for name, times in inside.items()}


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


def on_device(device: torch.device):
    """Make a CUDA ``device`` current (the benchmark timer synchronizes the current one); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on a CUDA ``device``, so wall-clock times cover it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
