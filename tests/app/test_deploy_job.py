"""``deploy=onnx|int8`` in lrl-train and lrl-export: the ONNX and int8 files in the run dir, their rows in
summary.json and the summary table, the checks before a job runs, a failing export, and the deployed plot."""
import json
import logging

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

pytest.importorskip("onnx", reason="needs the `onnx` extra")
pytest.importorskip("onnxscript", reason="needs the `onnx` extra")
pytest.importorskip("onnxruntime", reason="needs the `onnx` extra")

from lrlightning import load_factorized  # noqa: E402
from lrlightning.app.cli import CONF_DIR  # noqa: E402
from lrlightning.app.collect import collect_rows, plot_deployed, write_sweep  # noqa: E402
from lrlightning.app.deploy import check_deploy  # noqa: E402
from lrlightning.app.export import export  # noqa: E402
from lrlightning.app.train import train  # noqa: E402
from lrlightning.deploy.onnx import OnnxExportError, SessionModule, session  # noqa: E402

ROW_FIELDS = {"file", "size_bytes", "latency_ms", "latency_ms_batch1", "speedup", "speedup_low", "speedup_high",
              "speedup_batch1", "test_acc"}


def compose_job(name, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, tiny_train):
    run_dir = tmp_path_factory.mktemp("int8-run")
    summary = train(compose_job("train", [*tiny_train, "deploy=int8", "deploy.calibration_batches=2",
                                            "deploy.int8.layers=all", "deploy.int8.weight_range=full"]), run_dir)
    return run_dir, summary


def test_int8_deploy_writes_four_checked_files_and_their_measured_rows(int8_run, caplog):
    run_dir, summary = int8_run
    entry = summary["deploy"]
    assert list(entry["rows"]) == ["dense_fp32", "factorized_fp32", "dense_int8", "factorized_int8"]
    assert (entry["format"], entry["calibration_batches"], entry["latency_batch_size"]) == ("int8", 2, 4)
    settings = entry["int8"]  # what was asked, with "auto" resolved for this CPU and the reason recorded
    assert (settings["layers"], settings["weight_range"], settings["activations"]) == ("all", "full", "uint8")
    assert settings["batch_sizes"] == [1, 4] and "asked for weight_range='full'" in settings["why"]
    for label, row in entry["rows"].items():
        assert ROW_FIELDS <= row.keys() and (run_dir / row["file"]).stat().st_size == row["size_bytes"]
        assert row["latency_ms"] > 0 and row["latency_ms_batch1"] > 0 and 0.0 <= row["test_acc"] <= 1.0
    rows = entry["rows"]
    assert rows["dense_fp32"]["speedup"] == 1.0 and rows["factorized_fp32"]["batchnorm_left"] == 0
    assert rows["factorized_int8"]["quantized_layers"] >= 4 and rows["factorized_int8"]["float_layers"] == []
    assert rows["factorized_int8"]["why_float"] == {} and entry["int8_timing"] == {"dense": {}, "factorized": {}}
    assert rows["factorized_int8"]["size_bytes"] < rows["factorized_fp32"]["size_bytes"]
    # the fp32 files compute what PyTorch does: both test at the factorized model's accuracy
    assert rows["factorized_fp32"]["test_acc"] == pytest.approx(summary["test_acc_factorized"], abs=1e-6)
    assert rows["dense_fp32"]["test_acc"] == pytest.approx(summary["test_acc_projected"], abs=1e-6)
    assert entry["int8_accuracy_cost"] == {
        name: pytest.approx(rows[f"{name}_fp32"]["test_acc"] - rows[f"{name}_int8"]["test_acc"])
        for name in ("dense", "factorized")}
    assert json.loads((run_dir / "summary.json").read_text())["deploy"] == entry
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = load_factorized(run_dir / "factorized.pt").eval()(x)
    assert torch.allclose(torch.from_numpy(SessionModule(session(run_dir / "factorized.onnx"))(x)), expected,
                          atol=1e-4)


def test_the_summary_table_prints_the_deployed_models(int8_run):
    from lrlightning.app.report import summary_table

    table = summary_table(int8_run[1])
    assert "deployed (onnxruntime" in table and "factorized int8  factorized.int8.onnx" in table
    assert "batch 4" in table and "speedup" in table


def test_lrl_export_deploys_the_checkpoint_as_onnx(int8_run, tmp_path):
    run_dir, trained = int8_run
    cfg = compose_job("export", [f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "deploy=onnx",
                                 "latency_batch_sizes=[4]"])
    summary = export(cfg, tmp_path)
    assert list(summary["deploy"]["rows"]) == ["dense_fp32", "factorized_fp32"]
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["dense.onnx", "factorized.onnx"]
    assert summary["deploy"]["rows"]["factorized_fp32"]["test_acc"] == pytest.approx(
        trained["deploy"]["rows"]["factorized_fp32"]["test_acc"])


def test_lrl_collect_plots_accuracy_against_deployed_latency(int8_run, tmp_path):
    run_dir, summary = int8_run
    [row] = collect_rows(run_dir)
    assert row["factorized_int8_latency_ms"] == summary["deploy"]["rows"]["factorized_int8"]["latency_ms"]
    assert row["dense_fp32_test_acc"] == summary["deploy"]["rows"]["dense_fp32"]["test_acc"]
    write_sweep([row], tmp_path)
    assert (tmp_path / "deployed.png").stat().st_size > 0
    assert "factorized_int8_size_bytes" in (tmp_path / "results.csv").read_text().splitlines()[0]
    assert plot_deployed([{**row, **{k: None for k in row if k.endswith("_latency_ms")}}], tmp_path / "no.png") is False
    assert not (tmp_path / "no.png").exists()


@pytest.mark.parametrize(("node", "message"), [
    ({"format": "tflite"}, r"`deploy.format` must be one of \('none', 'onnx', 'int8'\), got 'tflite'"),
    ({"format": "int8", "calibration_batches": 0}, r"`deploy.calibration_batches` must be an int >= 1, got 0"),
    ({"format": "int8", "min_channels": 16}, r"`deploy.min_channels` \(16\) is no longer a setting: each layer runs "
                                             r"in int8 only where it measured faster"),
    ({"format": "onnx", "opset": 17}, r"`deploy` has unknown keys \['opset'\]; allowed: format, calibration_batches, "
                                      r"int8"),
    ({"format": "int8", "int8": {"bits": 4}}, r"`deploy.int8` has unknown keys \['bits'\]; allowed: weight_range, "),
    ({"format": "int8", "int8": {"weight_range": "half"}}, r"`Int8Config.weight_range` must be one of \('auto', "
                                                          r"'full', 'reduced'\), got 'half'"),
])
def test_bad_deploy_settings_are_named_before_the_job_runs(node, message, tmp_path, tiny_train):
    with pytest.raises(ValueError, match=message):
        check_deploy(node)
    preset = "int8" if node["format"] == "int8" else "onnx"
    overrides = [*tiny_train, f"deploy={preset}", f"deploy.format={node['format']}"]
    given = compose_job("train", [f"deploy={preset}"]).deploy
    flat = {f"{k}.{inner}" if isinstance(v, dict) else k: item for k, v in node.items() if k != "format"
            for inner, item in (v.items() if isinstance(v, dict) else [(None, v)])}
    overrides += [f"{'' if OmegaConf.select(given, k) is not None else '+'}deploy.{k}={v}" for k, v in flat.items()]
    with pytest.raises(ValueError, match=message):
        train(compose_job("train", overrides), tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was trained or written


def test_a_missing_onnx_extra_stops_the_job_before_training(tmp_path, tiny_train, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"deploy=int8 needs the `onnx` extra, which is not installed \(missing: "
                                          r"onnxscript\)"):
        train(compose_job("train", [*tiny_train, "deploy=int8"]), tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_failed_export_keeps_the_pytorch_outputs_and_records_the_error(tmp_path, tiny_train, monkeypatch, caplog):
    def fails(model, example, path):
        raise OnnxExportError("ONNX cannot export SimpleCNN: layer 'features.0' (Conv2d) fails on its own: boom",
                              "features.0")

    monkeypatch.setattr("lrlightning.app.deploy.export_onnx", fails)
    caplog.set_level(logging.ERROR)
    with pytest.raises(OnnxExportError, match="layer 'features.0'"):
        train(compose_job("train", [*tiny_train, "deploy=onnx"]), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["deploy"] == {"error": "OnnxExportError: ONNX cannot export SimpleCNN: layer 'features.0' "
                                          "(Conv2d) fails on its own: boom"}
    assert (tmp_path / "factorized.pt").is_file() and summary["test_acc_factorized"] is not None
    assert "deploy failed; factorized.pt and summary.json are written without it" in caplog.text


def test_a_dense_run_deploys_the_dense_model_only(tmp_path, tiny_train):
    dense = [o for o in tiny_train if not o.startswith("lowrank.")]
    summary = train(compose_job("train", [*dense, "lowrank=none", "deploy=onnx"]), tmp_path)
    assert list(summary["deploy"]["rows"]) == ["dense_fp32"]
    assert [p.name for p in tmp_path.glob("*.onnx")] == ["dense.onnx"]


def test_the_int8_preset_is_the_library_default_int8_config():
    from lrlightning.app.deploy import deploy_settings
    from lrlightning.deploy.int8_config import Int8Config

    preset = compose_job("train", ["deploy=int8"]).deploy
    assert deploy_settings(preset) == ("int8", 8, Int8Config())
    assert deploy_settings({"format": "int8", "int8": {"float_layers": ["fc"], "layers": "all"}})[2] == Int8Config(
        layers="all", float_layers=("fc",))