"""A latency budget's promise checked on its result: allocations are timed against dense and corrected while they
miss beyond the noise, in either direction; a noisy machine is said to be; an unreachable budget names what was
measured."""
import pytest

from lrlightning.speed.speedup_check import (CHECK_ATTEMPTS, OutOfReach, SpeedupCheck, checked_ranks, closest, judged)
from lrlightning.speed.timing import Spread

DENSE = 100.0  # predicted dense cost (ms)


def exact(value, spread=0.0):
    return Spread(value, value * (1 - spread / 2), value * (1 + spread / 2), 9, spread <= 0.1)


class Model:
    """``choose(target)``: the allocation is the target itself (continuous ranks); ``measure``: the real speedup is
    the predicted one to the power ``power`` (below 1: factorized layers gain less than predicted), with ``spread``;
    keeps the targets it was asked for."""

    def __init__(self, power, spread=0.02, fastest=DENSE / 3):
        self.power, self.spread, self.fastest, self.targets = power, spread, fastest, []

    def choose(self, target):
        self.targets.append(target)
        return {"total": round(target, 6)}, target

    def measure(self, ranks):
        return exact((DENSE / ranks["total"]) ** self.power, self.spread)


def test_judged_calls_met_within_the_tolerance_and_noisy_beyond_the_spread():
    assert judged(exact(1.32), 1.3) == "met" and judged(exact(1.27), 1.3) == "met"
    assert judged(exact(1.25), 1.3) is None and judged(exact(1.40), 1.3) is None
    assert judged(exact(1.3, spread=0.3), 1.3) == "noisy"


def test_a_slower_result_is_allocated_again_until_the_measurement_meets_the_budget():
    model = Model(power=0.6)
    ranks, check = checked_ranks(model.choose, model.measure, 1.3, DENSE, model.fastest)
    assert check.verdict == "met" and 2 <= check.attempts <= 3
    assert model.targets[0] == pytest.approx(DENSE / 1.3) and model.targets[-1] < model.targets[0]
    assert abs(check.measured.median / 1.3 - 1) <= 0.03 and ranks == {"total": round(model.targets[-1], 6)}
    assert check.distinguishable and check.as_dict()["verdict"] == "met"
    assert check.text().startswith(f"measured {check.measured.median:.2f}x (IQR ")
    assert check.text().endswith(f"against dense, as asked ({check.attempts} allocations timed)")


def test_a_result_faster_than_asked_is_allocated_again_with_less_compression():
    model = Model(power=1.5)
    _, check = checked_ranks(model.choose, model.measure, 1.3, DENSE, model.fastest)
    assert check.verdict == "met" and model.targets[1] > model.targets[0]


def test_a_noisy_machine_is_said_to_be_noisy_without_chasing_the_noise():
    model = Model(power=0.85, spread=0.5)
    _, check = checked_ranks(model.choose, model.measure, 1.3, DENSE, model.fastest)
    assert check.verdict == "noisy" and check.attempts == 1
    assert check.text().startswith("the machine is too noisy to tell: measured 1.25x")
    assert "(not distinguishable from 1.0)" in check.text() and not check.distinguishable


def test_a_clear_miss_on_a_noisy_machine_is_still_allocated_again():
    model = Model(power=0.3, spread=0.3)  # 1.08x (IQR 0.92-1.24): wide, yet clearly short of 2x
    with pytest.raises(OutOfReach):
        checked_ranks(model.choose, model.measure, 2.0, DENSE, model.fastest)
    assert len(model.targets) > 1


def test_a_budget_the_fastest_allocation_does_not_reach_names_the_measurement():
    model = Model(power=0.5)  # at most 4x predicted, so 2x measured
    with pytest.raises(OutOfReach, match=r"^2\.00x \(IQR 1\.98-2\.02\) faster \(measured\)$") as raised:
        checked_ranks(model.choose, model.measure, 2.5, DENSE, DENSE / 4)
    assert raised.value.measured.median == pytest.approx(2.0)
    assert model.targets[-1] == pytest.approx(DENSE / 4)


def test_allocations_that_repeat_end_the_search_with_the_slowest_that_meets_the_budget():
    steps = [40.0, 50.0, 80.0]  # the only allocations there are (predicted totals), measured as predicted

    def choose(target):
        total = max([s for s in steps if s <= target], default=steps[0])
        return {"total": total}, total

    def measure(ranks):
        return exact((DENSE / ranks["total"]) ** 0.5)

    ranks, check = checked_ranks(choose, measure, 1.5, DENSE, steps[0])  # 1.41x, then 1.58x, then 1.58x again
    assert (ranks, check.verdict) == ({"total": 40.0}, "missed") and check.measured.median == pytest.approx(1.581, 1e-3)
    assert check.attempts == 2 < CHECK_ATTEMPTS and "missed: measured 1.58x" in check.text()


def test_after_every_attempt_misses_the_closest_allocation_is_kept():
    results = iter([1.0, 1.9, 1.1, 1.7])

    def choose(target):
        return {"target": target}, target

    _, check = checked_ranks(choose, lambda ranks: exact(next(results)), 1.5, DENSE, 10.0)
    assert check.verdict == "missed" and check.attempts == CHECK_ATTEMPTS and check.measured.median == 1.7
    assert closest([({}, exact(1.2)), ({}, exact(1.4))], 1.5)[1].median == 1.4  # none meets it: the fastest


def test_a_check_records_what_it_measured():
    check = SpeedupCheck(1.3, exact(1.31, 0.04), "met", 1)
    data = check.as_dict()
    assert data["measured"] == exact(1.31, 0.04).as_dict() and data["distinguishable_from_dense"]


def test_timed_at_several_batch_sizes_the_slowest_must_meet_the_budget_and_is_named():
    model = Model(power=1.0)

    def measure(ranks):  # batch 1 gains only part of what batch 32 gains
        speedup = DENSE / ranks["total"]
        return {1: exact(speedup ** 0.6, 0.02), 32: exact(speedup, 0.02)}

    _, check = checked_ranks(model.choose, measure, 1.3, DENSE, model.fastest)
    assert check.verdict == "met" and check.attempts >= 2 and check.batch_size == 1
    assert abs(check.measured.median / 1.3 - 1) <= 0.03 and check.by_batch[32].median > 1.4
    assert f"at batch 1, the slowest of batches 1, 32 (batch 32: {check.by_batch[32].median:.2f}x)" in check.text()
    record = check.as_dict()
    assert record["batch_size"] == 1 and set(record["by_batch"]) == {"1", "32"}


def test_a_budget_out_of_reach_at_one_batch_size_names_it_and_what_it_measured_there():
    model = Model(power=1.0, fastest=DENSE / 2)

    def measure(ranks):
        speedup = DENSE / ranks["total"]
        return {1: exact(speedup ** 0.3, 0.02), 32: exact(speedup, 0.02)}

    with pytest.raises(OutOfReach, match=r"^1\.23x \(IQR .*\) faster \(measured at batch 1; batch 32: 2\.00x\)$") \
            as error:
        checked_ranks(model.choose, measure, 1.8, DENSE, model.fastest)
    assert error.value.check(1.8).batch_size == 1 and error.value.by_batch[32].median == pytest.approx(2.0)
