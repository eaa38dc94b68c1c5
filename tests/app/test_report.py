"""summary.json: its fields, its table in the log, and the run's outputs written atomically."""
import json
import math

import pytest
import torch

from lrlightning import (
    Activation,
    Budget,
    Compression,
    Energy,
    LowRankOptions,
    Plan,
    TiledSVD,
    count_macs,
    count_params,
    factorize_planned,
    load_factorized,
    plan_layers,
)
from lrlightning.app.aggregate import config_rule, config_scheme, point_label, point_of, summary_point
from lrlightning.app.collect import UNFINISHED, collect_rows, status_of
from lrlightning.app.report import summarize, summary_table, write_json, write_outputs
from lrlightning.rules import Latency, rule_label, rule_record
from lrlightning.speed.cpu import cpu_features, cpu_model
from lrlightning.speed.timing import MODEL_ROUNDS
from lrlightning.zoo import SimpleCNN

SHAPE = (3, 16, 16)


@pytest.fixture
def dense_and_small():
    dense = SimpleCNN(num_classes=10, in_channels=3, width=8).eval()
    options = LowRankOptions(scheme="svd", rank=4)
    plans = plan_layers(dense, options)[0]
    return options, plans, dense, factorize_planned(dense, plans, options)


@pytest.mark.parametrize(("options", "recorded", "label"), [
    (LowRankOptions(scheme="svd", rank=0.5), {"rank": 0.5}, "0.5"),
    (LowRankOptions(scheme="tucker2", rank=(4, 8)), {"rank": [4, 8]}, "4x8"),
    (LowRankOptions(scheme="svd", rank={"features.4": 3}), {"rank": {"features.4": 3}}, "per-layer"),
    (LowRankOptions(scheme="svd", rank=Energy(0.9)), {"energy": 0.9}, "energy=0.9"),
    (LowRankOptions(scheme="svd", rank=Compression(2.0)), {"compression": 2.0}, "2x"),
    (LowRankOptions(scheme="svd", rank=Budget(4.0, metric="macs", input_shape=(3, 8, 8))),
     {"budget": 4.0, "metric": "macs"}, "budget=4x macs"),
])
def test_rule_record_records_the_rule_in_plain_json(options, recorded, label):
    record = rule_record(options.rank)
    assert record == recorded and json.loads(json.dumps(record)) == recorded
    assert rule_label(record) == label


def test_summarize_counts_the_factorized_layers_and_the_whole_model(dense_and_small):
    options, plans, dense, small = dense_and_small
    metrics = {"acc_projected": 0.5, "acc_factorized": 0.5, "max_abs_logit_diff": 1e-6}
    s = summarize("lowrank_projection", Plan(options, plans), dense, small, SHAPE, [2], metrics, {"config": {"seed": 0}})
    assert (s["method"], s["scheme"], s["rule"], s["layers_compressed"]) == ("lowrank_projection", "svd", {"rank": 4}, 2)
    assert (s["scheme_options"], s["objective"]) == ({}, "weight")
    assert (s["params_dense"], s["params_factorized"]) == (count_params(dense), count_params(small))
    assert (s["macs_dense"], s["macs_factorized"]) == (count_macs(dense, SHAPE), count_macs(small, SHAPE))
    weights = {"features.4": (16 * 8 * 9, 4 * (8 * 9 + 16)), "features.8": (32 * 16 * 9, 4 * (16 * 9 + 32))}
    dense_weights, factorized_weights = map(sum, zip(*weights.values()))
    assert s["compression_ratio"] == pytest.approx(dense_weights / factorized_weights)
    assert s["model_compression_ratio"] == pytest.approx(s["params_dense"] / s["params_factorized"])
    assert s["test_acc_factorized"] == 0.5 and "test_acc_dense" not in s
    assert s["latency_ms_dense"] > 0 and s["latency_batch_size"] == 2 and s["latency_device"] == "cpu"
    assert s["speedup_low"] <= s["speedup"] <= s["speedup_high"] and s["speedup_rounds"] >= MODEL_ROUNDS
    assert s["speedup_distinguishable"] == (s["speedup_low"] > 1 or s["speedup_high"] < 1)
    assert not {"rank", "budget", "budget_metric"} & s.keys()  # the rule is one record, `rule`
    assert s["ranks"] == {"features.4": 4, "features.8": 4}
    assert list(s)[-1] == "config"
    json.dumps(s)


def test_summarize_records_the_requested_budget(dense_and_small):
    _, _, dense, _ = dense_and_small
    options = LowRankOptions(scheme="svd", rank=Budget(2.0, metric="latency", input_shape=SHAPE,
                                                       latency=Latency((2,), "cpu")))
    plans = [p for p in plan_layers(dense, LowRankOptions(scheme="svd", rank=4))[0]]
    small = factorize_planned(dense, plans, options)
    s = summarize("lowrank_projection", Plan(options, plans), dense, small, SHAPE, [2], {}, {})
    assert (s["rule"], s["latency_device"]) == ({"budget": 2.0, "metric": "latency", "backend": "eager"}, "cpu")
    assert summary_table(s).splitlines()[0].startswith("lowrank_projection: svd budget=2x latency on 2 layers, ")


def test_summary_table_compares_dense_and_factorized(dense_and_small):
    options, plans, dense, small = dense_and_small
    metrics = {"acc_dense": 0.9, "acc_decomposed": 0.25, "acc_factorized": 0.875}
    s = summarize("decompose_finetune", Plan(options, plans), dense, small, SHAPE, [2], metrics, {})
    table = summary_table(s)
    head, header, _, *rows, machine = table.splitlines()
    assert head.startswith("decompose_finetune: svd 4 on 2 layers, ")
    assert head.endswith("; 25.00 % right after decomposition")
    assert header.split() == ["dense", "factorized", "ratio"]
    assert rows[0].split()[-1] == f"{s['model_compression_ratio']:.2f}x"
    assert rows[-1].split()[-4:] == ["90.00", "%", "87.50", "%"]
    assert s["machine"]["cpu_features"] == list(cpu_features()) and s["latency_memory_format"] == "channels_last"
    assert machine == (f"latency timed on {cpu_model()} ({' '.join(cpu_features()) or 'no AVX2'}), "
                       f"{torch.get_num_threads()} threads, channels_last, BatchNorm folded")
    dense_run = {**s, "method": "dense", "scheme": None, "test_acc_projected": 0.9, "max_abs_logit_diff": 0.0,
                 "test_acc_decomposed": None}
    dense_head, dense_header = summary_table(dense_run).splitlines()[:2]
    assert dense_head == "dense: no low-rank layers" and "dense (projected)" in dense_header


def test_write_json_replaces_the_file_whole_and_keeps_nan(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    write_json(path, {"train_loss": math.nan, "ranks": {"a": [1, 2]}})
    assert list(tmp_path.iterdir()) == [path]
    data = json.loads(path.read_text())
    assert math.isnan(data["train_loss"]) and data["ranks"] == {"a": [1, 2]}


def test_write_outputs_saves_the_factorized_model_then_the_summary(tmp_path, dense_and_small):
    options, plans, dense, small = dense_and_small
    spec = {"name": "simple_cnn", "num_classes": 10, "in_channels": 3, "width": 8}
    metrics = {"acc_projected": 0.5, "acc_factorized": 0.5, "max_abs_logit_diff": 0.0}
    s = summarize("lowrank_projection", Plan(options, plans), dense, small, SHAPE, [2], metrics, {})
    written = write_outputs(tmp_path, small, spec, s)
    assert written["factorized"] == "factorized.pt"
    assert json.loads((tmp_path / "summary.json").read_text()) == written
    loaded = load_factorized(tmp_path / "factorized.pt").eval()
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(loaded(x), small(x))
    assert torch.load(tmp_path / "factorized.pt", weights_only=True)["metadata"]["ranks"] == {p.name: p.rank for p in plans}


def test_a_summary_reads_unfinished_until_its_deploy_step_has_ended(tmp_path, dense_and_small):
    options, plans, dense, small = dense_and_small
    metrics = {"acc_projected": 0.5, "acc_factorized": 0.5, "max_abs_logit_diff": 0.0}
    seen = []

    def deployed():
        on_disk = json.loads((tmp_path / "summary.json").read_text())
        seen.append((on_disk["finished"], status_of(on_disk, None)))
        return {"format": "onnx"}

    s = summarize("lowrank_projection", Plan(options, plans), dense, small, SHAPE, [2], metrics, {})
    written = write_outputs(tmp_path, small, None, s, deployed)
    assert seen == [(False, UNFINISHED)]  # a run killed during deploy leaves a summary that says so
    assert "finished" not in torch.load(tmp_path / "factorized.pt", weights_only=True)["metadata"]
    assert written["finished"] is True and status_of(written, None) == "ok"
    assert json.loads((tmp_path / "summary.json").read_text())["deploy"] == {"format": "onnx"}
    (tmp_path / "plain").mkdir()
    plain = write_outputs(tmp_path / "plain", small, None, dict(s))
    assert plain["finished"] is True


def test_summarize_records_the_schemes_options_and_the_objective(dense_and_small):
    _, _, dense, _ = dense_and_small
    options = LowRankOptions(TiledSVD(tile_shape=(8, 8)), 2, objective=Activation(batches=3))
    plans = plan_layers(dense, options)[0]
    small = factorize_planned(dense, plans, options)
    s = summarize("lowrank_projection", Plan(options, plans), dense, small, SHAPE, [2], {}, {})
    assert (s["scheme"], s["scheme_options"], s["rule"], s["objective"]) == (
        "tiled_svd", {"tile_shape": [8, 8]}, {"rank": 2}, "activation")
    none = summarize("dense", None, dense, dense, SHAPE, [2], {}, {})
    assert (none["scheme"], none["scheme_options"], none["rule"], none["objective"]) == (None, None, None, None)


def test_the_recorded_rule_is_a_dict_that_aggregate_reads_back_into_the_same_point(tmp_path, dense_and_small):
    _, _, dense, _ = dense_and_small
    options = LowRankOptions(scheme="svd", rank=Budget(2.0, metric="macs", input_shape=SHAPE))
    plans = plan_layers(dense, LowRankOptions(scheme="svd", rank=4))[0]
    small = factorize_planned(dense, plans, options)
    lowrank = {"_target_": "lrlightning.LowRankProjection", "scheme": "svd",
               "rank": {"_target_": "lrlightning.Budget", "factor": 2.0, "metric": "macs"}}
    config = {"seed": 0, "baseline": None, "model": {"lr": 0.03}, "lowrank": lowrank}
    metrics = {"acc_projected": 0.5, "acc_factorized": 0.5, "max_abs_logit_diff": 0.0}
    s = summarize("lowrank_projection", Plan(options, plans), dense, small, SHAPE, [2], metrics, {"config": config})
    assert s["rule"] == {"budget": 2.0, "metric": "macs"}
    (tmp_path / "train").mkdir()
    written = write_outputs(tmp_path / "train", small, None, s)
    recorded = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert recorded["rule"] == {"budget": 2.0, "metric": "macs"} == written["rule"]
    # the train config and the summary's record name the same point: read as dicts, no string parsed
    assert config_rule(lowrank) == recorded["rule"] and config_scheme(lowrank) == recorded["scheme"]
    latency = {"_target_": "lrlightning.Budget", "factor": 1.3, "metric": "latency",
               "latency": {"_target_": "lrlightning.Latency", "backend": "onnxruntime"}}
    flat = {"_target_": "lrlightning.Budget", "factor": 1.3, "metric": "latency", "latency_backend": "onnxruntime"}
    budget = Budget(1.3, metric="latency", latency=Latency(backend="onnxruntime"), input_shape=SHAPE)
    assert config_rule({"rank": latency}) == config_rule({"rank": flat}) == rule_record(budget) == {
        "budget": 1.3, "metric": "latency", "backend": "onnxruntime"}
    assert config_rule({"rank": {"_target_": "lrlightning.Compression", "_args_": [4]}}) is None  # no field named
    label = point_label(recorded["scheme"], recorded["rule"])
    assert label == point_of(lowrank) == summary_point(recorded) == "svd:budget=2x macs"
    # an lrl-export summary: its config holds only the overrides, so the point comes from the rule record
    export = tmp_path / "export"
    export.mkdir()
    (export / "summary.json").write_text(json.dumps({**recorded, "method": "decompose",
                                                     "config": {"ckpt": "/run/last.ckpt", "lowrank": {"rank": None}}}))
    rows = collect_rows(tmp_path)
    assert [(r["run"], r["point"]) for r in rows] == [("export", label), ("train", label)]
    assert all((r["rank"], r["budget"], r["budget_metric"]) == ("budget=2x macs", 2.0, "macs") for r in rows)
