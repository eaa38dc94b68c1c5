"""Timings that carry their spread: modules timed in interleaved rounds, each quantity
reported as its median and interquartile range over the rounds, more rounds run while a spread is too wide, and
ratios taken per round (paired), so that machine noise shared by a round cancels. Pure torch."""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

ROUNDS = 7  # interleaved rounds timed first
MAX_ROUNDS = 14  # rounds at most, while some module's spread is wider than the tolerance
ROUND_SECONDS = 0.01  # timed per module per round
PROBES = 3  # single passes of each module whose fastest sets its passes per round
SETTLED_SPREAD = 0.1  # a timing has settled when its interquartile range is at most this fraction of its median


@dataclass(frozen=True)
class Spread:
    """A measured quantity over ``rounds`` rounds: ``median`` and interquartile range ``low`` (25th percentile) to
    ``high`` (75th); ``settled`` when the range is at most ``SETTLED_SPREAD`` (or the tolerance measured with) of
    the median. Milliseconds for timings, a pure number for ratios."""

    median: float
    low: float
    high: float
    rounds: int
    settled: bool = True

    @classmethod
    def of(cls, samples: Sequence[float], tolerance: float = SETTLED_SPREAD) -> "Spread":
        """The spread of ``samples`` (at least one)."""
        values = sorted(float(v) for v in samples)
        if not values:
            raise ValueError("a spread needs at least one sample")
        if len(values) == 1:
            low = high = values[0]
        else:
            low, _, high = statistics.quantiles(values, n=4, method="inclusive")
        median = statistics.median(values)
        return cls(median, low, high, len(values), (high - low) <= tolerance * abs(median))

    @property
    def relative(self) -> float:
        """The interquartile range as a fraction of the median."""
        return (self.high - self.low) / max(abs(self.median), 1e-30)

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interquartile range (distinguishable from it beyond the noise)."""
        return value < self.low or value > self.high

    def text(self, digits: int = 2, suffix: str = "") -> str:
        """``"1.31x (IQR 1.28-1.34)"`` for ``suffix="x"``."""
        return (f"{self.median:.{digits}f}{suffix} (IQR {self.low:.{digits}f}-{self.high:.{digits}f}"
                f"{'' if self.settled else ', unsettled'})")

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "low": self.low, "high": self.high, "rounds": self.rounds,
                "settled": self.settled}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Spread":
        """The inverse of ``as_dict``; raises ``KeyError``/``TypeError``/``ValueError`` on anything else."""
        values = [float(data[key]) for key in ("median", "low", "high")]
        rounds = data["rounds"]
        if not isinstance(rounds, int) or rounds < 1 or not isinstance(data["settled"], bool):
            raise ValueError(f"not a spread: {data!r}")
        return cls(*values, rounds, data["settled"])


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float],
                  tolerance: float = SETTLED_SPREAD) -> Spread:
    """The spread of the per-round ratios ``numerators[i] / denominators[i]`` (samples of two quantities measured
    in the same rounds)."""
    return Spread.of([a / max(b, 1e-30) for a, b in zip(numerators, denominators)], tolerance)


def on_device(device: torch.device):
    """Make a CUDA ``device`` current (``synchronize`` waits for the current one); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def interleaved_samples(modules: Sequence[nn.Module], example: torch.Tensor, rounds: int = ROUNDS,
                        round_seconds: float = ROUND_SECONDS, max_rounds: int = MAX_ROUNDS,
                        tolerance: float = SETTLED_SPREAD, paired: bool = False) -> list[list[float]]:
    """Milliseconds per forward pass of each module on ``example`` (no grad), one sample per round: every round
    times each module over as many passes as it runs in about ``round_seconds`` (``passes_per_round``;
    ``seconds_per_pass``), so a slow module costs a round no more than a fast one, the
    modules in an order rotated each round, so that machine noise hits every module alike. After ``rounds`` rounds,
    more are run (as many again, up to ``max_rounds``) for the modules whose interquartile range still exceeds
    ``tolerance`` × their median (``paired``: for modules after the first, the range of their per-round ratio to
    the first, which cancels the noise a round shares), each with the first module (the reference the others are
    paired with): a module's samples are its first rounds, so sample ``i`` of any two modules comes from the same
    round."""
    samples: list[list[float]] = [[] for _ in modules]
    with torch.inference_mode(), on_device(example.device):
        for module in modules:
            module(example)
        numbers = [passes_per_round(module, example, round_seconds) for module in modules]
        active, goal = list(range(len(modules))), rounds
        while True:
            while len(samples[0]) < goal:
                shift = len(samples[0]) % len(active)
                for index in [*active[shift:], *active[:shift]]:
                    samples[index].append(1000.0 * seconds_per_pass(modules[index], example, numbers[index]))
            unsettled = [index for index in active if not (
                paired_ratios(samples[index], samples[0], tolerance) if paired and index else
                Spread.of(samples[index], tolerance)).settled]
            if goal >= max_rounds or not unsettled:
                return samples
            active, goal = sorted({0, *unsettled}), min(max_rounds, goal + rounds)


def passes_per_round(module: nn.Module, example: torch.Tensor, round_seconds: float) -> int:
    """How many passes of ``module`` on ``example`` take about ``round_seconds`` (at least one), from the fastest of
    ``PROBES`` single passes (one, when it already takes ``round_seconds``)."""
    fastest = seconds_per_pass(module, example, 1)
    for _ in range(PROBES - 1):
        if fastest >= round_seconds:
            break
        fastest = min(fastest, seconds_per_pass(module, example, 1))
    return max(1, int(round_seconds / max(fastest, 1e-7)))


def seconds_per_pass(module: nn.Module, example: torch.Tensor, number: int) -> float:
    """Seconds per forward pass of ``module`` on ``example`` over ``number`` passes in a row, after one untimed pass
    that warms its weights into the caches and wakes the threads (CUDA synchronized around them, the garbage
    collector paused)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        module(example)
        synchronize(example.device)
        start = time.perf_counter()
        for _ in range(number):
            module(example)
        synchronize(example.device)
        return (time.perf_counter() - start) / number
    finally:
        if collecting:
            gc.enable()


def time_interleaved(modules: Sequence[nn.Module], example: torch.Tensor, rounds: int = ROUNDS,
                     round_seconds: float = ROUND_SECONDS, max_rounds: int = MAX_ROUNDS,
                     tolerance: float = SETTLED_SPREAD) -> list[Spread]:
    """The ``Spread`` (ms per forward pass) of each module, timed as ``interleaved_samples`` does."""
    samples = interleaved_samples(modules, example, rounds, round_seconds, max_rounds, tolerance)
    return [Spread.of(s, tolerance) for s in samples]


MODEL_ROUNDS = 11  # rounds of whole-model timings (up to three times as many while unsettled)
MODEL_ROUND_SECONDS = 0.02  # a model pass longer than this is timed once a round


def paired_speedup(dense: nn.Module, factorized: nn.Module, example: torch.Tensor, rounds: int = MODEL_ROUNDS,
                   round_seconds: float = MODEL_ROUND_SECONDS) -> tuple[Spread, Spread, Spread]:
    """(dense ms, factorized ms, speedup) of two whole models on ``example``, timed interleaved
    (``interleaved_samples``, up to three times ``rounds`` rounds); the speedup is the per-round ratio dense /
    factorized, so its spread is the noise that remains once what a round shares cancels."""
    dense_samples, factorized_samples = interleaved_samples([dense, factorized], example, rounds, round_seconds,
                                                            3 * rounds, paired=True)
    return Spread.of(dense_samples), Spread.of(factorized_samples), paired_ratios(dense_samples, factorized_samples)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on a CUDA ``device``, so wall-clock times cover it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
