"""A latency budget's promise, checked on its result: the allocated model is timed against dense (whole models,
interleaved) before it is used; one that misses the requested speedup beyond the noise, too slow or faster than
asked (compressed more than needed), is allocated again from a corrected target, a bounded number of times, and a
machine too noisy to tell is said to be so. Pure Python."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .timing import Spread

CHECK_ATTEMPTS = 4  # allocations timed at most
SPEEDUP_TOLERANCE = 0.03  # a measured speedup within this fraction of the budget meets it
NOISY_SPREAD = 0.2  # a measured speedup whose interquartile range exceeds this fraction of its median cannot tell
PRECISE_SPREAD = 0.1  # a measured speedup this precise whose range holds the budget misses it only by noise
MAX_STEP = 1.2  # one correction changes the predicted speedup aimed at by at most this factor


@dataclass(frozen=True)
class SpeedupCheck:
    """What timing the allocated model against dense found: ``measured`` (the per-round speedup dense /
    factorized) and the ``verdict``: ``"met"`` (its median within ``SPEEDUP_TOLERANCE`` of ``budget``, or
    ``budget`` inside an interquartile range at most ``PRECISE_SPREAD`` of the median: off only by the noise),
    ``"noisy"`` (a range wider than ``NOISY_SPREAD`` of the median that holds the budget: the machine is too noisy
    to tell), ``"missed"`` (still off after ``attempts`` allocations, or no other allocation lies closer; the
    ``closest`` one is kept) or ``"short"`` (out of reach on this machine: the fastest allocation, kept under
    ``Budget(out_of_reach="closest")``, measured short of ``budget``). Timed at several batch sizes,
    ``by_batch`` holds the speedup at each ({batch size: Spread}) and ``measured`` is the slowest of them, at
    ``batch_size``; at one batch size both are empty."""

    budget: float
    measured: Spread
    verdict: str
    attempts: int
    by_batch: dict[int, Spread] = field(default_factory=dict)

    @property
    def batch_size(self) -> int | None:
        """The batch size the slowest speedup (``measured``) was timed at; None at one batch size."""
        return min(self.by_batch, key=lambda size: self.by_batch[size].median) if self.by_batch else None

    @property
    def distinguishable(self) -> bool:
        """Whether the measured speedup differs from 1.0 (no speedup) beyond the noise."""
        return self.measured.excludes(1.0)

    def text(self) -> str:
        measured = self.measured.text(suffix="x")
        if self.by_batch:
            others = ", ".join(f"batch {size}: {spread.median:.2f}x" for size, spread in self.by_batch.items()
                               if size != self.batch_size)
            measured += f" at batch {self.batch_size}, the slowest of batches " \
                        f"{', '.join(map(str, self.by_batch))} ({others})"
        tries = f"{self.attempts} allocation{'s' if self.attempts > 1 else ''} timed"
        if self.verdict == "met":
            return f"measured {measured} against dense, as asked ({tries})"
        if self.verdict == "noisy":
            return (f"the machine is too noisy to tell: measured {measured} against dense "
                    f"{'' if self.distinguishable else '(not distinguishable from 1.0) '}({tries})")
        if self.verdict == "short":
            return (f"short: out of reach on this machine, the fastest allocation measured {measured} against "
                    f"dense, asked {self.budget:g}x; it is kept ({tries})")
        return f"missed: measured {measured} against dense, asked {self.budget:g}x ({tries})"

    def as_dict(self) -> dict[str, Any]:
        record = {"budget": self.budget, "measured": self.measured.as_dict(), "verdict": self.verdict,
                  "attempts": self.attempts, "distinguishable_from_dense": self.distinguishable}
        if self.by_batch:
            record.update(batch_size=self.batch_size,
                          by_batch={str(size): spread.as_dict() for size, spread in self.by_batch.items()})
        return record


class OutOfReach(ValueError):
    """The fastest allocation measured short of the budget: ``ranks``, its ``measured`` speedup (the slowest over
    ``by_batch``, when timed at several batch sizes), and the allocations timed so far (``attempts``)."""

    def __init__(self, measured: Spread, ranks: dict | None = None, attempts: int = 1,
                 by_batch: Mapping[int, Spread] | None = None):
        self.measured, self.ranks, self.attempts, self.by_batch = measured, ranks, attempts, dict(by_batch or {})
        where = ""
        if self.by_batch:
            slowest_batch = self.check(1.0).batch_size
            others = ", ".join(f"batch {size}: {spread.median:.2f}x" for size, spread in self.by_batch.items()
                               if size != slowest_batch)
            where = f" at batch {slowest_batch}; {others}"
        super().__init__(f"{measured.text(suffix='x')} faster (measured{where})")

    def check(self, budget: float) -> SpeedupCheck:
        """The ``"short"`` check of keeping this allocation anyway."""
        return SpeedupCheck(budget, self.measured, "short", self.attempts, self.by_batch)


def slowest(measured: Spread | Mapping[int, Spread]) -> tuple[Spread, dict[int, Spread]]:
    """(the slowest speedup, {batch size: speedup}) of one measurement: a ``Spread``, or one per batch size (the
    dict is empty for a single ``Spread``, or a mapping of one batch size)."""
    if isinstance(measured, Spread):
        return measured, {}
    by_batch = dict(measured)
    worst = min(by_batch.values(), key=lambda spread: spread.median)
    return worst, by_batch if len(by_batch) > 1 else {}


def judged(measured: Spread, budget: float) -> str | None:
    """``"noisy"`` (too wide to tell, the budget inside the range), ``"met"``, or None when ``measured`` misses
    ``budget``."""
    if measured.relative > NOISY_SPREAD and not measured.excludes(budget):
        return "noisy"
    if abs(measured.median / budget - 1.0) <= SPEEDUP_TOLERANCE:
        return "met"
    if measured.relative <= PRECISE_SPREAD and not measured.excludes(budget):
        return "met"
    return None


def checked_ranks(choose: Callable[[float], tuple[dict, float]], measure: Callable[[dict], Spread], budget: float,
                  dense: float, fastest: float) -> tuple[dict, SpeedupCheck]:
    """Ranks meeting a speedup ``budget`` as measured, and the check that says so.

    ``choose(target)`` allocates ranks whose predicted total cost is at most ``target`` and returns (ranks, that
    total); ``dense`` is the predicted dense total, ``fastest`` the smallest reachable. ``measure(ranks)`` times the
    model at those ranks against dense: a ``Spread``, or {batch size: Spread}, of which the slowest is judged. Each miss corrects the target (``corrected``: measured against predicted
    speedup), so the next allocation aims where the measurement would meet the budget; ranks already timed end the
    search. Raises ``OutOfReach`` when the fastest
    allocation measures short of the budget beyond the noise."""
    target, tried, points = dense / budget, [], []
    for attempt in range(1, CHECK_ATTEMPTS + 1):
        target = min(max(target, fastest), dense)
        ranks, total = choose(target)
        if any(ranks == earlier for earlier, _, _ in tried):
            if target <= fastest * (1 + 1e-9) and all(m.median < budget for _, m, _ in tried):
                _, measured, by_batch = next(item for item in tried if item[0] == ranks)
                raise OutOfReach(measured, ranks, len(tried), by_batch)
            break  # the corrected target gives ranks already timed: no allocation lies closer
        measured, by_batch = slowest(measure(ranks))
        tried.append((ranks, measured, by_batch))
        verdict = judged(measured, budget)
        if verdict is not None:
            return ranks, SpeedupCheck(budget, measured, verdict, attempt, by_batch)
        if measured.median < budget and target <= fastest * (1 + 1e-9):
            raise OutOfReach(measured, ranks, len(tried), by_batch)
        points.append((math.log(dense / total), math.log(measured.median)))
        target = dense / math.exp(corrected(points, math.log(budget)))
    ranks, measured, by_batch = closest(tried, budget)
    return ranks, SpeedupCheck(budget, measured, "missed", len(tried), by_batch)


def corrected(points: list[tuple[float, float]], goal: float) -> float:
    """The log predicted speedup whose measurement should be ``goal`` (a log speedup), from the (log predicted,
    log measured) ``points`` so far: through the last two by a secant when they rise, else by the last one's
    measured / predicted ratio; one step moves the log prediction by at most log ``MAX_STEP``, so that a noisy
    measurement cannot send the next allocation far off."""
    predicted, measured = points[-1]
    step = goal - measured
    if len(points) > 1:
        before, measured_before = points[-2]
        if predicted != before and (measured - measured_before) / (predicted - before) > 0:
            step = (goal - measured) / ((measured - measured_before) / (predicted - before))
    limit = math.log(MAX_STEP)
    return predicted + min(max(step, -limit), limit)


def closest(tried: list[tuple], budget: float) -> tuple:
    """Of the timed allocations (ranks, speedup, ...), the slowest one that meets ``budget`` (within the
    tolerance), else the fastest."""
    meeting = [item for item in tried if item[1].median >= budget * (1 - SPEEDUP_TOLERANCE)]
    return min(meeting, key=lambda item: item[1].median) if meeting else max(tried, key=lambda item: item[1].median)
