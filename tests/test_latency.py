"""Latency tables: layers and their candidates timed side by side, cached on disk per device and never re-timed."""
import json

import pytest
import torch
from torch import nn

from lrlightning.latency import LatencyTable, device_key, layer_key, time_interleaved
from lrlightning.schemes.tucker2 import Tucker2


def conv():
    torch.manual_seed(0)
    return nn.Conv2d(8, 8, 3, padding=1, bias=False)


def test_time_interleaved_gives_one_positive_time_per_module():
    modules = [nn.Conv2d(4, 4, 3), nn.Identity()]
    times = time_interleaved(modules, torch.randn(2, 4, 8, 8), rounds=2, round_seconds=0.001)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_a_table_times_what_it_lacks_and_reads_the_rest_from_disk(tmp_path):
    layer = conv()
    candidates = {"tucker2:(4,4)": lambda: Tucker2().factorized_layer(layer, (4, 4))}
    table = LatencyTable("cpu", 2, tmp_path)
    dense, timed = table.layer_ms(layer, (8, 6, 6), candidates)
    assert table.measured == 2 and dense > 0 and timed["tucker2:(4,4)"] > 0
    stored = json.loads(table.path.read_text())
    assert stored["device"] == device_key(torch.device("cpu")) and len(stored["entries"]) == 2
    assert str(torch.get_num_threads()) in table.path.name

    again = LatencyTable("cpu", 2, tmp_path)
    def never_built():
        raise AssertionError("a cached candidate is not built")

    more = {"tucker2:(4,4)": never_built, "tucker2:(2,2)": lambda: Tucker2().factorized_layer(layer, (2, 2))}
    assert again.layer_ms(layer, (8, 6, 6), more)[0] == dense
    assert again.measured == 1  # only the new candidate
    other_batch = LatencyTable("cpu", 3, tmp_path)
    other_batch.layer_ms(layer, (8, 6, 6), {})
    assert other_batch.measured == 1


def test_the_whole_model_and_its_layers_in_place_are_cached_by_structure_and_its_mode_restored(tmp_path):
    model = nn.Sequential(conv(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, bias=False)).train()
    table = LatencyTable("cpu", 2, tmp_path)
    whole, inside = table.model_ms(model, (8, 6, 6), ["0", "2"])
    assert model.training and table.measured == 1
    assert set(inside) == {"0", "2"} and 0 < inside["0"] < whole and 0 < inside["2"] < whole
    assert LatencyTable("cpu", 2, tmp_path).model_ms(model, (8, 6, 6), ["0"]) == (whole, {"0": inside["0"]})
    wider = nn.Sequential(nn.Conv2d(8, 16, 3, bias=False))
    fresh = LatencyTable("cpu", 2, tmp_path)
    fresh.model_ms(wider, (8, 6, 6))
    assert fresh.measured == 1


def test_a_cache_written_for_another_device_is_not_used(tmp_path):
    table = LatencyTable("cpu", 2, tmp_path)
    table.path.parent.mkdir(parents=True, exist_ok=True)
    table.path.write_text(json.dumps({"device": "another machine", "entries": {"x": 1.0}}))
    assert LatencyTable("cpu", 2, tmp_path).entries == {}


def test_layer_keys_name_geometry_input_and_dtype_not_weights():
    a, b = conv(), conv()
    with torch.no_grad():
        b.weight.mul_(2)
    assert layer_key(a, (2, 8, 6, 6), torch.float32) == layer_key(b, (2, 8, 6, 6), torch.float32)
    assert layer_key(a, (2, 8, 6, 6), torch.float32) != layer_key(a, (2, 8, 7, 7), torch.float32)
    strided = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
    assert layer_key(a, (2, 8, 6, 6), torch.float32) != layer_key(strided, (2, 8, 6, 6), torch.float32)
    with pytest.raises(ValueError, match="time Conv2d and Linear layers, got ReLU"):
        layer_key(nn.ReLU(), (1,), torch.float32)
