"""A budget in an lrl-train job: the Hydra point and overrides reach the callback, the datamodule completes the
options, and summary.json records what was asked and what was measured."""
import json
import logging

import pytest
import torch

from hydra import compose, initialize_config_dir

from lrlightning.app.cli import CONF_DIR
from lrlightning.speed.cpu import cpu_label
from lrlightning.app.train import train


def run_job(tmp_path, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return train(cfg, tmp_path)


def test_a_latency_budget_is_allocated_at_the_jobs_batch_on_the_cpu_and_recorded(tmp_path, tiny_train, mac_latency,
                                                                                  caplog):
    caplog.set_level(logging.INFO)
    summary = run_job(tmp_path, [*tiny_train, "point=tucker2_faster", "lowrank.rank.factor=1.5"])
    [table] = mac_latency.made
    assert (table.batch_size, str(table.device)) == (4, "cpu")
    assert summary["rule"] == {"budget": 1.5, "metric": "latency", "backend": "eager"}
    assert summary["ranks"] and summary["latency_device"] == "cpu" and summary["latency_batch_size"] == 4
    assert summary["mac_reduction"] >= 1.5  # the stand-in's latency is MACs, so the MACs meet the budget
    assert json.loads((tmp_path / "summary.json").read_text())["rule"] == {"budget": 1.5, "metric": "latency", "backend": "eager"}
    assert ("Budget 1.5x in ms per batch at batch 4 on cpu, predicted from measured layer times (timed now): whole "
            "model") in caplog.text
    check = summary["budget_check"]  # the tiny model's ranks cannot land within 3 % of 1.5x: the closest above
    assert (check["verdict"], check["attempts"], check["distinguishable_from_dense"]) == ("missed", 1, True)
    measured = check["measured"]["median"]
    assert measured == summary["mac_reduction"] and 1.5 < measured < 1.7
    assert summary["latency_table"]["state"] == "measured"
    assert (f"Speedup of the allocated model: missed: measured {measured:.2f}x (IQR {measured:.2f}-{measured:.2f}) "
            "against dense, asked 1.5x (1 allocation timed)") in caplog.text
    assert f"latency budget 1.5x, when fit started: missed (measured {measured:.2f}x" in caplog.text
    assert f"Timed on {cpu_label()}, {torch.get_num_threads()} threads" in caplog.text


def test_a_mac_budget_from_the_command_line(tmp_path, tiny_train):
    summary = run_job(tmp_path, [*tiny_train, "lowrank.rank={_target_:lrlightning.Budget,factor:2,metric:macs}"])
    assert summary["rule"] == {"budget": 2.0, "metric": "macs"}
    assert 2.0 <= summary["mac_reduction"] <= 2.1


def test_a_budget_under_the_activation_objective_is_allocated_from_output_errors(tmp_path, tiny_train):
    rule = "lowrank.rank={_target_:lrlightning.Budget,factor:2}"
    output = run_job(tmp_path / "activation", [*tiny_train, rule])  # the presets' objective: Activation
    weight = run_job(tmp_path / "weight", [*tiny_train, rule, "lowrank.objective=weight"])
    assert (output["budget_errors"], output["budget_objective"]) == ("output", "sum")
    assert (weight["budget_errors"], weight["budget_objective"]) == ("weight", "max")
    assert output["model_compression_ratio"] >= 2.0 * 0.95 and weight["model_compression_ratio"] >= 2.0 * 0.95


def test_the_quickstart_point_keeps_the_fastest_allocation_when_its_request_is_out_of_reach(tmp_path, tiny_train,
                                                                                            mac_latency, caplog):
    caplog.set_level(logging.INFO)
    summary = run_job(tmp_path, [*tiny_train, "point=tucker2_faster", "lowrank.rank.factor=50"])
    check = summary["budget_check"]
    assert (check["verdict"], check["budget"], check["distinguishable_from_dense"]) == ("short", 50.0, True)
    assert check["measured"]["median"] == summary["mac_reduction"] < 50  # the stand-in's latency is MACs
    assert summary["rule"] == {"budget": 50.0, "metric": "latency", "backend": "eager"}
    assert summary["machine"]["cpu"] and "cpu_features" in summary["machine"]
    assert "latency budget 50x, when fit started: short: out of reach on this CPU, the fastest allocation kept" \
        in caplog.text


def test_the_quickstart_point_refuses_a_request_out_of_reach_when_told_to(tmp_path, tiny_train, mac_latency):
    with pytest.raises(ValueError, match=r"`Budget.factor`=50 \(latency\) is out of reach: .* at most "
                                         r"\d+\.\d\dx .*faster \(measured\).*out_of_reach`='closest'"):
        run_job(tmp_path, [*tiny_train, "point=tucker2_faster", "lowrank.rank.factor=50",
                           "lowrank.rank.out_of_reach=raise"])
    assert not (tmp_path / "summary.json").exists()


def test_the_jobs_latency_batch_sizes_are_those_the_budget_meets_and_the_summary_reports(tmp_path, tiny_train,
                                                                                         mac_latency, caplog):
    caplog.set_level(logging.INFO)
    summary = run_job(tmp_path, [*tiny_train, "point=tucker2_faster", "lowrank.rank.factor=1.5",
                                 "latency_batch_sizes=[2,4]"])
    assert [table.batch_size for table in mac_latency.made] == [2, 4]
    assert set(summary["budget_check"]["by_batch"]) == {"2", "4"} and summary["budget_check"]["batch_size"] in (2, 4)
    assert summary["latency_batch_size"] == 2 and set(summary["latency_by_batch"]) == {"2", "4"}
    assert summary["latency_by_batch"]["2"]["speedup"] == summary["speedup"]
    assert all(row["latency_ms_dense"] > 0 for row in summary["latency_by_batch"].values())
    assert "CPU latency, batch 2" in caplog.text and "CPU latency, batch 4" in caplog.text
    assert "the slowest of batches 2, 4" in caplog.text
    with pytest.raises(ValueError, match=r"`lowrank.rank.latency.batch_sizes`=\[8\] differs from the job's "
                                         r"`latency_batch_sizes`=\[2, 4\]"):
        run_job(tmp_path / "two_owners", [*tiny_train, "point=tucker2_faster", "latency_batch_sizes=[2,4]",
                                          "+lowrank.rank.latency.batch_sizes=[8]"])
