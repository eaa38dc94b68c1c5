import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study_lowrank.py"


@pytest.fixture(scope="module")
def study_module():
    spec = importlib.util.spec_from_file_location("study_lowrank", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def study(tmp_path, *extra):
    command = [sys.executable, str(SCRIPT), "--data", "synthetic", "--backbone", "resnet20", "--width", "4",
               "--pretrain-steps", "3", "--finetune-steps", "4", "--batch-size", "64", "--accelerator", "cpu",
               "--seeds", "0", "--lrs", "0.01", "--out", str(tmp_path), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_study_runs_every_method_kind_and_resumes(tmp_path):
    methods = ["project+bn+reset+sd2", "decompose_finetune", "decompose"]
    first = study(tmp_path, "--points", "svd:0.5", "--methods", *methods)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == methods
    project = rows[0]
    assert project["period"] == 2 and project["steps"] == 4 and project["device"] == "cpu"
    assert all(0.0 <= r["test_acc"] <= 100.0 and r["model_compression"] > 1.0 for r in rows)
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + len(methods)

    again = study(tmp_path, "--points", "svd:0.5", "--methods", *methods)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 runs to do, 3 done" in again.stdout
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3


def test_method_modifiers_set_callback_options(study_module):
    settings = study_module.parse_method("project+bn+warmup+reset+sd75", period=200)
    assert settings == {"base": "project", "period": 75, "bn": 20, "warmup": 3, "reset": True}
    assert study_module.parse_method("project", period=200)["period"] == 200


@pytest.mark.parametrize("method, message", [
    ("project+fast", "unknown modifier 'fast'"),
    ("project+sd0", "unknown modifier 'sd0'"),
    ("decompose+bn", "modifiers only after 'project'"),
    ("finetune", "must be one of"),
])
def test_unknown_methods_are_rejected(study_module, method, message):
    with pytest.raises(ValueError, match=message):
        study_module.parse_method(method, period=200)


def test_command_line_names_the_bad_method(tmp_path):
    result = study(tmp_path, "--methods", "project+fast")
    assert result.returncode == 2
    assert "unknown modifier 'fast'" in result.stderr


def test_tables_summarize_only_the_requested_seeds_and_lrs(study_module):
    rows = [{"method": "project", "seed": 0, "lr": 0.03}, {"method": "project", "seed": 3, "lr": 0.03},
            {"method": "project", "seed": 0, "lr": 0.1}, {"method": "decompose", "seed": 0, "lr": 0.0},
            {"method": "decompose", "seed": 1, "lr": 0.0}]
    kept = study_module.requested(rows, seeds=[0, 1, 2], lrs=[0.01, 0.03])
    assert kept == [rows[0], rows[3], rows[4]]


def test_verdict_prefers_methods_with_the_baselines_seed_count(study_module):
    def chosen(method, mean, std, seeds):
        return {"point": "svd:4x", "method": method, "test_mean": mean, "test_std": std, "seeds": seeds}
    rows = [chosen("project+sd10", 92.30, 0.0, 1), chosen("project+sd50", 92.22, 0.10, 3),
            chosen("decompose_finetune", 92.18, 0.25, 3)]
    [line] = study_module.verdicts(rows)
    assert line == "svd:4x: best project+sd50 92.22 is level (within one std) with decompose_finetune 92.18 (+0.04 pt)"
    [line] = study_module.verdicts([chosen("project+sd10", 92.90, 0.0, 1), chosen("decompose_finetune", 92.18, 0.25, 3)])
    assert line.startswith("svd:4x: best project+sd10 92.90 is compared on one seed")


def test_summarize_only_refuses_a_folder_without_a_study(tmp_path):
    result = study(tmp_path / "empty", "--summarize-only")
    assert result.returncode == 2
    assert "--summarize-only needs a finished study in --out" in result.stderr and "dense.ckpt" in result.stderr
    assert not (tmp_path / "empty").exists()


def test_lr_table_shows_every_lr_of_every_fine_tuned_method(study_module):
    def run(method, lr, test):
        return {"point": "svd:4x", "method": method, "lr": lr, "test_acc": test}
    rows = [run("project", 0.03, 92.0), run("project", 0.03, 92.2), run("project", 0.1, float("nan")),
            run("decompose_finetune", 0.1, 91.0), run("decompose", 0.0, 14.0)]
    table = study_module.lr_table(rows, ["svd:4x"], ["project", "decompose_finetune", "decompose"], [0.03, 0.1])
    assert table == [["svd:4x", "project", "92.10 ± 0.14 /2", "-"],
                     ["svd:4x", "decompose_finetune", "-", "91.00 ± 0.00 /1"]]
