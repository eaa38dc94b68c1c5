"""Latency tables: layers and their candidates timed side by side with their spread, cached on disk per device,
checked for staleness before a cached table is used, re-measured on request; unreadable caches are replaced."""
import json
import logging
import re

import pytest
import torch
from torch import nn

from lrlightning import count_macs
from lrlightning.speed import latency
from lrlightning.layers import FactorizedLayer
from lrlightning.speed.latency import FORMAT, LatencyTable, device_key, layer_key, model_key
from lrlightning.schemes.tucker2 import Tucker2


def conv():
    torch.manual_seed(0)
    return nn.Conv2d(8, 8, 3, padding=1, bias=False)


def candidates(layer, ranks=((4, 4), (2, 2))):
    return {f"tucker2:{rank}".replace(" ", ""): (lambda r=rank: Tucker2().factorized_layer(layer, r)) for rank in ranks}


class MacClock:
    """Stands in for ``lrlightning.speed.latency.interleaved_samples``: each module takes its MACs / 1e3 ms times
    ``slowdown`` (``candidate_slowdown`` for factorized layers), in every round; ``calls`` counts the timings."""

    def __init__(self):
        self.slowdown, self.candidate_slowdown, self.calls = 1.0, 1.0, 0

    def __call__(self, modules, example, rounds=7, round_seconds=0.01, max_rounds=14, tolerance=0.1, paired=False):
        self.calls += 1
        shape = tuple(example.shape[1:])
        factor = [self.candidate_slowdown if isinstance(m, FactorizedLayer) else 1.0 for m in modules]
        return [[count_macs(m, shape) / 1e3 * self.slowdown * f] * rounds for m, f in zip(modules, factor)]


@pytest.fixture
def clock(monkeypatch):
    fake = MacClock()
    monkeypatch.setattr(latency, "interleaved_samples", fake)
    return fake


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False)).eval()


def requests(model, shape=(8, 6, 6)):
    """What a budget hands ``LatencyTable.check``: every conv with its input shape and two candidates."""
    inputs = {"0": shape, "2": (16, *shape[1:]), "4": (16, *shape[1:])}
    return [(model.get_submodule(name), inputs[name], candidates(model.get_submodule(name), ((8, 8), (4, 4))))
            for name in ("0", "2", "4")]


def fill(table, model, shape=(8, 6, 6)):
    table.model_ms(model, shape, ["0", "2", "4"])
    for module, input_shape, built in requests(model, shape):
        table.layer_times(module, input_shape, built)


def test_a_table_times_what_it_lacks_with_its_spread_and_reads_the_rest_from_disk(tmp_path):
    layer = conv()
    table = LatencyTable("cpu", 2, tmp_path)
    times = table.layer_times(layer, (8, 6, 6), candidates(layer, ((4, 4),)))
    assert table.measured == 2 and table.seconds > 0 and table.state == "measured"
    assert times.dense.median > 0 and times.dense.low <= times.dense.median <= times.dense.high
    ratio = times.ratios["tucker2:(4,4)"]
    assert ratio.rounds == times.dense.rounds >= 7 and ratio.low <= ratio.median <= ratio.high
    stored = json.loads(table.path.read_text())
    assert (stored["format"], stored["device"]) == (FORMAT, device_key(torch.device("cpu")))
    assert len(stored["entries"]) == 2 and stored["seconds"] > 0
    assert set(stored["entries"][layer_key(layer, (2, 8, 6, 6), torch.float32) + "|tucker2:(4,4)"]) == {"ms", "ratio"}
    assert str(torch.get_num_threads()) in table.path.name

    again = LatencyTable("cpu", 2, tmp_path)

    def never_built():
        raise AssertionError("a cached candidate is not built")

    more = {"tucker2:(4,4)": never_built, **candidates(layer, ((2, 2),))}
    assert again.layer_times(layer, (8, 6, 6), more).ratios["tucker2:(4,4)"] == ratio
    assert again.measured == 2  # the new candidate, with dense again beside it (ratios are paired per round)
    other_batch = LatencyTable("cpu", 3, tmp_path)
    other_batch.layer_times(layer, (8, 6, 6), {})
    assert other_batch.measured == 1


def test_the_whole_model_and_its_layers_in_place_are_cached_by_structure_and_its_mode_restored(tmp_path):
    model = nn.Sequential(conv(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, bias=False)).train()
    table = LatencyTable("cpu", 2, tmp_path)
    whole, inside = table.model_ms(model, (8, 6, 6), ["0", "2"])
    assert model.training and table.measured == 1
    assert set(inside) == {"0", "2"} and inside["0"] > 0 and inside["2"] > 0 and whole > 0
    assert LatencyTable("cpu", 2, tmp_path).model_ms(model, (8, 6, 6), ["0"]) == (whole, {"0": inside["0"]})
    wider = nn.Sequential(nn.Conv2d(8, 16, 3, bias=False))
    fresh = LatencyTable("cpu", 2, tmp_path)
    fresh.model_ms(wider, (8, 6, 6))
    assert fresh.measured == 1


def test_a_valid_cached_table_is_confirmed_without_re_measuring(tmp_path, clock, model, caplog):
    fill(LatencyTable("cpu", 2, tmp_path), model)
    caplog.set_level(logging.INFO, "lrlightning.speed.latency")
    table = LatencyTable("cpu", 2, tmp_path)
    calls = clock.calls
    table.check(requests(model))
    assert table.state == "cached" and table.trusted
    assert clock.calls - calls == 2  # two layers with one candidate each
    fill(table, model)
    assert table.measured == 0 and clock.calls - calls == 2
    assert "cached timings confirmed" in caplog.text and "6 layer timings (median) 1.00x" in caplog.text


def test_a_table_whose_cached_times_are_off_is_re_measured_and_the_cache_updated(tmp_path, clock, model, caplog):
    fill(LatencyTable("cpu", 2, tmp_path), model)
    path = LatencyTable("cpu", 2, tmp_path).path
    stored = json.loads(path.read_text())
    for entry in stored["entries"].values():  # every time cached at 3x what this machine takes now
        entry["ms"] = {**entry["ms"], **{k: entry["ms"][k] * 3 for k in ("median", "low", "high")}}
    path.write_text(json.dumps(stored))
    reference = model_key(model, (2, 8, 6, 6), torch.float32)

    caplog.set_level(logging.INFO, "lrlightning.speed.latency")
    table = LatencyTable("cpu", 2, tmp_path)
    table.check(requests(model))
    assert table.state == "stale" and not table.trusted
    assert "is stale: re-timed, 6 layer timings (median) 0.33x the cached time (tolerance 20 %); re-measuring it" \
        in caplog.text
    fill(table, model)
    assert table.measured == 7  # the model pass, then dense and two candidates of each of the two layer shapes
    fresh = json.loads(path.read_text())["entries"][reference]["ms"]["median"]
    assert fresh == pytest.approx(stored["entries"][reference]["ms"]["median"] / 3)
    assert table.facts()["state"] == "stale" and table.facts()["measured"] == 7


def test_a_machine_that_slowed_down_or_candidates_cached_too_fast_make_a_table_stale(tmp_path, clock, model, caplog):
    fill(LatencyTable("cpu", 2, tmp_path), model)
    clock.slowdown = 2.0  # another job now keeps the cores busy
    loaded = LatencyTable("cpu", 2, tmp_path)
    loaded.check(requests(model))
    assert loaded.state == "stale"
    clock.slowdown = 1.0
    fill(LatencyTable("cpu", 2, tmp_path, remeasure=True), model)

    clock.candidate_slowdown = 2.5  # the cached candidates read 2.5x faster than they now run
    caplog.set_level(logging.WARNING, "lrlightning.speed.latency")
    table = LatencyTable("cpu", 2, tmp_path)
    table.check(requests(model))
    assert table.state == "stale" and "layer timings (median) 2.5" in caplog.text


def test_remeasure_times_every_entry_again_and_skips_the_check(tmp_path, clock, model):
    fill(LatencyTable("cpu", 2, tmp_path), model)
    table = LatencyTable("cpu", 2, tmp_path, remeasure=True)
    calls = clock.calls
    table.check(requests(model))
    assert clock.calls == calls and table.state == "remeasured"
    fill(table, model)
    assert table.measured == 7 and table.facts()["state"] == "remeasured"
    fill(table, model)  # what this table timed itself is used as it is
    assert table.measured == 7


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": 2, "device": "%s", "entries": {"x": 1}}',
                                     '{"format": 2, "device": "%s", "entries": {"x": {"ms": {"median": 1}}}}'])
def test_an_unreadable_cache_is_measured_anew_and_replaced(tmp_path, clock, content):
    layer = conv()
    table = LatencyTable("cpu", 2, tmp_path)
    table.path.parent.mkdir(parents=True, exist_ok=True)
    table.path.write_text(content.replace("%s", table.key))
    with pytest.warns(UserWarning, match=rf"latency cache {re.escape(str(table.path))} cannot be read"):
        fresh = LatencyTable("cpu", 2, tmp_path)
    assert fresh.entries == {}
    fresh.layer_times(layer, (8, 6, 6), {})
    assert json.loads(fresh.path.read_text())["format"] == FORMAT


def test_a_cache_of_an_older_format_or_another_device_is_not_used(tmp_path):
    table = LatencyTable("cpu", 2, tmp_path)
    table.path.parent.mkdir(parents=True, exist_ok=True)
    table.path.write_text(json.dumps({"device": table.key, "entries": {"x": 1.0}}))
    with pytest.warns(UserWarning, match=r"was written in format None, not 2; measuring a new table"):
        assert LatencyTable("cpu", 2, tmp_path).entries == {}
    table.path.write_text(json.dumps({"format": FORMAT, "device": "another machine", "entries": {}}))
    assert LatencyTable("cpu", 2, tmp_path).entries == {}


def test_a_table_without_a_named_cache_writes_under_lrlightning_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRLIGHTNING_CACHE", str(tmp_path / "cache"))
    table = LatencyTable("cpu", 2)
    table.layer_times(conv(), (8, 6, 6), {})
    assert table.path.parent == tmp_path / "cache" and table.path.is_file()


def test_layer_keys_name_geometry_input_and_dtype_not_weights():
    a, b = conv(), conv()
    with torch.no_grad():
        b.weight.mul_(2)
    assert layer_key(a, (2, 8, 6, 6), torch.float32) == layer_key(b, (2, 8, 6, 6), torch.float32)
    assert layer_key(a, (2, 8, 6, 6), torch.float32) != layer_key(a, (2, 8, 7, 7), torch.float32)
    strided = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
    assert layer_key(a, (2, 8, 6, 6), torch.float32) != layer_key(strided, (2, 8, 6, 6), torch.float32)
    with pytest.raises(ValueError, match="time Conv1d, Conv2d, Conv3d and Linear layers, got ReLU"):
        layer_key(nn.ReLU(), (1,), torch.float32)


def test_a_corrupt_cache_file_warns_and_is_measured_anew_and_rewritten_as_valid_json(tmp_path, clock):
    layer = conv()
    cache = tmp_path / "cache"
    path = LatencyTable("cpu", 2, cache).path
    assert path.parent == cache and path.name.startswith("latency-") and path.suffix == ".json"
    cache.mkdir()
    path.write_bytes(b"\x00\xffgarbage{{{ not json")
    with pytest.warns(UserWarning, match=rf"latency cache {re.escape(str(path))} cannot be read"):
        table = LatencyTable("cpu", 2, cache)
    assert table.entries == {}
    times = table.layer_times(layer, (8, 6, 6), candidates(layer, ((4, 4),)))
    assert table.measured == 2 and times.dense.median > 0
    stored = json.loads(path.read_text())
    assert (stored["format"], stored["device"]) == (FORMAT, table.key)
    assert set(stored["entries"]) == {layer_key(layer, (2, 8, 6, 6), torch.float32),
                                      layer_key(layer, (2, 8, 6, 6), torch.float32) + "|tucker2:(4,4)"}


def test_tables_of_two_batch_sizes_open_together_keep_each_others_entries_in_the_file(tmp_path, clock, model):
    small, large = LatencyTable("cpu", 1, tmp_path), LatencyTable("cpu", 4, tmp_path)  # both read an empty file
    fill(small, model)
    fill(large, model)
    small.layer_times(*requests(model)[0][:2], candidates(model.get_submodule("0"), ((2, 2),)))  # saves again
    stored = json.loads(small.path.read_text())
    batches = {key.split("input=(")[1].split(",")[0] for key in stored["entries"]}
    assert batches == {"1", "4"}
    assert stored["seconds"] == pytest.approx(small.seconds, abs=1e-3) and small.seconds > large.seconds > 0
    for batch_size, table in ((1, small), (4, large)):
        reread = LatencyTable("cpu", batch_size, tmp_path)
        fill(reread, model)
        assert reread.measured == 0 and {key: reread.entries[key] for key in table.fresh} == \
            {key: table.entries[key] for key in table.fresh}
