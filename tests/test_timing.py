"""Timings with their spread: quantiles over interleaved rounds, paired ratios, more rounds while a spread is wide."""
import itertools

import pytest
import torch
from torch import nn

from lrlightning.speed import timing
from lrlightning.speed.timing import Spread, interleaved_samples, paired_ratios, paired_speedup, time_interleaved


def test_a_spread_is_the_median_and_interquartile_range_of_its_samples():
    spread = Spread.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (spread.median, spread.low, spread.high, spread.rounds) == (3.0, 2.0, 4.0, 5)
    assert spread.relative == pytest.approx(2 / 3) and not spread.settled
    assert Spread.of([10.0, 10.2, 9.9, 10.1]).settled
    assert Spread.of([7.0]) == Spread(7.0, 7.0, 7.0, 1, True)
    assert spread.excludes(1.5) and spread.excludes(4.5) and not spread.excludes(3.5)
    assert Spread.from_dict(spread.as_dict()) == spread
    assert spread.text(suffix="x") == "3.00x (IQR 2.00-4.00, unsettled)"
    with pytest.raises(ValueError, match="at least one sample"):
        Spread.of([])
    with pytest.raises(ValueError, match="not a spread"):
        Spread.from_dict({"median": 1, "low": 1, "high": 1, "rounds": 0, "settled": True})


def test_paired_ratios_cancel_what_a_round_shares():
    slow_rounds = [10.0, 20.0, 30.0, 40.0]  # the machine slows down, both modules alike
    ratio = paired_ratios([x / 2 for x in slow_rounds], slow_rounds)
    assert (ratio.median, ratio.low, ratio.high) == (0.5, 0.5, 0.5) and ratio.settled
    unpaired = Spread.of(slow_rounds)
    assert not unpaired.settled


class ScriptedPasses:
    """A ``timing.seconds_per_pass`` stand-in: each module's call returns its next scripted time (s)."""

    calls: list[str] = []
    scripts: dict[str, itertools.cycle] = {}

    @classmethod
    def seconds_per_pass(cls, module, example, number):
        cls.calls.append(module.name)
        return next(cls.scripts[module.name])


class Named(nn.Identity):
    def __init__(self, name):
        super().__init__()
        self.name = name


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setattr(timing, "seconds_per_pass", ScriptedPasses.seconds_per_pass)
    ScriptedPasses.calls = []

    def script(**times):
        ScriptedPasses.scripts = {name: itertools.cycle(values) for name, values in times.items()}
        return [Named(name) for name in times]
    return script


def test_settled_timings_take_the_first_rounds_in_rotated_order(scripted):
    modules = scripted(a=[0.001], b=[0.002], c=[0.004])
    samples = interleaved_samples(modules, torch.zeros(1), rounds=3, max_rounds=9)
    assert samples == [[1.0] * 3, [2.0] * 3, [4.0] * 3]
    timed = ScriptedPasses.calls[3 * timing.PROBES:]  # after the probe calls of each module
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_a_wide_spread_is_repeated_up_to_max_rounds_with_the_reference_and_stays_flagged(scripted):
    modules = scripted(steady=[0.001], noisy=[0.001, 0.003, 0.001, 0.005], settled=[0.002])
    steady, noisy, settled = time_interleaved(modules, torch.zeros(1), rounds=4, max_rounds=12)
    assert (steady.rounds, noisy.rounds, settled.rounds) == (12, 12, 4)  # the first module pairs with the rest
    assert ScriptedPasses.calls[3 * timing.PROBES + 3 * 4:].count("settled") == 0
    assert steady.settled and steady.median == 1.0
    assert not noisy.settled and noisy.low == 1.0 and noisy.high > 3.0


def test_paired_timings_settle_on_their_ratio_to_the_first_module(scripted):
    # a machine that swings between rounds slows both alike: each ratio is steady, each time is not
    swings = [0.001, 0.003]
    modules = scripted(dense=swings, half=[t / 2 for t in swings])
    dense, half = interleaved_samples(modules, torch.zeros(1), rounds=4, max_rounds=12, paired=True)
    assert (len(dense), len(half)) == (12, 4)
    assert paired_ratios(half, dense).median == pytest.approx(0.5) and paired_ratios(half, dense).settled
    modules = scripted(dense=swings, half=[t / 2 for t in swings])
    assert [len(s) for s in interleaved_samples(modules, torch.zeros(1), rounds=4, max_rounds=12)] == [12, 12]


def test_a_spread_that_settles_stops_the_extra_rounds(scripted):
    # wide at first (after the probes), steady after: the third block of 4 settles it
    modules = scripted(late=[*[0.001] * timing.PROBES, 0.001, 0.004, 0.001, 0.004, *[0.002] * 20])
    (late,) = time_interleaved(modules, torch.zeros(1), rounds=4, max_rounds=20)
    assert late.rounds == 12 and late.settled


def test_paired_speedup_of_real_models_brackets_its_median():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)).eval()  # 150 times the
    small = nn.Sequential(nn.Conv2d(8, 32, 1)).eval()  # MACs of this one: faster beyond any noise of a busy machine
    dense_ms, small_ms, speedup = paired_speedup(dense, small, torch.randn(2, 8, 32, 32), rounds=3,
                                                 round_seconds=0.002)
    assert dense_ms.median > small_ms.median > 0 and speedup.rounds >= 3
    assert speedup.median > 1


def test_passes_per_round_fill_the_round_and_a_slow_module_is_probed_once(scripted):
    fast, slow = scripted(fast=[0.004, 0.002, 0.003], slow=[0.05])
    assert timing.passes_per_round(fast, torch.zeros(1), 0.01) == 5  # the fastest probe, 2 ms
    assert timing.passes_per_round(slow, torch.zeros(1), 0.01) == 1
    assert ScriptedPasses.calls == ["fast"] * timing.PROBES + ["slow"]
