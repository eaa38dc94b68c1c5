"""Timings that carry their spread: modules timed in interleaved rounds (``torch.utils.benchmark``), each quantity
reported as its median and interquartile range over the rounds, more rounds run while a spread is too wide, and
ratios taken per round (paired), so that machine noise shared by a round cancels. Pure torch."""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils import benchmark

ROUNDS = 7  # interleaved rounds timed first
MAX_ROUNDS = 14  # rounds at most, while some module's spread is wider than the tolerance
ROUND_SECONDS = 0.01  # timed per module per round
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
    """Make a CUDA ``device`` current (the benchmark timer synchronizes the current one); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def interleaved_samples(modules: Sequence[nn.Module], example: torch.Tensor, rounds: int = ROUNDS,
                        round_seconds: float = ROUND_SECONDS, max_rounds: int = MAX_ROUNDS,
                        tolerance: float = SETTLED_SPREAD) -> list[list[float]]:
    """Milliseconds per forward pass of each module on ``example`` (no grad), one sample per round: every round
    times each module over the same number of passes, as many as the fastest module runs in about
    ``round_seconds`` (``torch.utils.benchmark``, CUDA synchronized), the modules in an
    order rotated each round, so that machine noise hits every module alike. After ``rounds`` rounds, more are run
    (as many again, up to ``max_rounds``) while some module's interquartile range exceeds ``tolerance`` × its
    median."""
    threads = torch.get_num_threads()
    timers = [benchmark.Timer("module(x)", globals={"module": m, "x": example}, num_threads=threads)
              for m in modules]
    samples: list[list[float]] = [[] for _ in modules]
    with torch.inference_mode(), on_device(example.device):
        for module in modules:
            module(example)
        probe = min(timer.timeit(1).median for timer in timers)
        number = max(1, int(round_seconds / max(probe, 1e-7)))
        goal = rounds
        while True:
            while len(samples[0]) < goal:
                shift = len(samples[0]) % len(timers)
                for index in [*range(shift, len(timers)), *range(shift)]:
                    samples[index].append(1000.0 * timers[index].timeit(number).median)
            if goal >= max_rounds or all(Spread.of(s, tolerance).settled for s in samples):
                return samples
            goal = min(max_rounds, goal + rounds)


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
                                                            3 * rounds)
    return Spread.of(dense_samples), Spread.of(factorized_samples), paired_ratios(dense_samples, factorized_samples)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on a CUDA ``device``, so wall-clock times cover it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
