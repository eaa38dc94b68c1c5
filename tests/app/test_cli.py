"""The entry points end to end, as subprocesses through their wrappers in scripts/ (test_packaging runs the
installed lrl-train): lrl-train on real Fashion-MNIST then lrl-export on its checkpoint, resume, the
decompose-then-fine-tune baseline, multiruns with the basic and the submitit local launchers, lrl-collect, and bad
input."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrlightning import count_params, load_factorized
from lrlightning.app.cli import collect_main
from lrlightning.app.data import DEBIAN_FASHION_MNIST

REPO = Path(__file__).resolve().parents[2]
REQUIRED = {"scheme", "scheme_options", "rule", "objective", "params_dense", "params_factorized", "macs_dense", "macs_factorized",
            "compression_ratio", "model_compression_ratio", "test_acc_projected", "test_acc_factorized",
            "max_abs_logit_diff", "latency_ms_dense", "latency_ms_factorized", "latency_batch_size", "config"}


def run(command: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """Run ``lrl-train`` or ``lrl-export`` through its wrapper in ``scripts/`` (the same entry point)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    script = REPO / "scripts" / f"{command.removeprefix('lrl-')}.py"
    result = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)")
@pytest.mark.slow
def test_train_on_fashion_mnist_then_export_the_checkpoint(tmp_path):
    small = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "+trainer.limit_val_batches=2",
             "+trainer.limit_test_batches=3", "lowrank.every_n_train_steps=2"]
    train_dir, export_dir = tmp_path / "train", tmp_path / "export"
    out = run("lrl-train", *small, f"hydra.run.dir={train_dir}")
    s = summary(train_dir)
    assert REQUIRED <= s.keys()
    assert (s["method"], s["scheme"], s["rule"], s["layers_compressed"]) == ("lowrank_projection", "tucker2",
                                                                           {"rank": 0.5}, 18)
    assert (s["scheme_options"], s["objective"]) == ({"hooi_iters": 0}, "activation")
    assert (s["global_step"], s["num_projections"]) == (4, 2)
    assert s["compression_ratio"] == pytest.approx(2.75, abs=0.01)
    assert s["params_factorized"] < s["params_dense"] and s["macs_factorized"] < s["macs_dense"]
    assert s["model_compression_ratio"] == pytest.approx(s["params_dense"] / s["params_factorized"])
    assert s["test_acc_factorized"] == s["test_acc_projected"] and s["max_abs_logit_diff"] < 1e-3
    assert s["latency_ms_dense"] > 0 and s["latency_ms_factorized"] > 0 and s["latency_batch_size"] == 32
    assert s["config"]["model"]["backbone"] == "resnet20" and s["config"]["lowrank"]["every_n_train_steps"] == 2
    assert (train_dir / "checkpoints" / "last.ckpt").is_file() and "factorized" in out.stderr + out.stdout

    model = load_factorized(train_dir / "factorized.pt")
    assert count_params(model) == s["params_factorized"]
    assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    payload = torch.load(train_dir / "factorized.pt", weights_only=True)
    assert payload["metadata"]["test_acc_factorized"] == s["test_acc_factorized"]

    run("lrl-export", f"ckpt={train_dir / 'checkpoints' / 'last.ckpt'}", "+trainer.limit_test_batches=3",
        f"hydra.run.dir={export_dir}")
    e = summary(export_dir)
    assert REQUIRED <= e.keys() and e["method"] == "lowrank_projection" and e["ranks"] == s["ranks"]
    for key in ("params_factorized", "macs_factorized", "compression_ratio", "test_acc_factorized", "num_projections"):
        assert e[key] == s[key], key
    assert e["max_abs_logit_diff"] < 1e-3
    exported = load_factorized(export_dir / "factorized.pt").eval()
    assert count_params(exported) == s["params_factorized"]
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=0)

    other = tmp_path / "export_rank"
    run("lrl-export", f"ckpt={train_dir / 'checkpoints' / 'last.ckpt'}", "lowrank.rank=0.25",
        "+trainer.limit_test_batches=1", f"hydra.run.dir={other}")
    o = summary(other)
    assert (o["method"], o["scheme"], o["rule"]) == ("decompose", "tucker2", {"rank": 0.25})
    assert o["max_abs_logit_diff"] < 1e-3
    assert o["compression_ratio"] > s["compression_ratio"]


@pytest.mark.slow
def test_resume_baseline_and_basic_multirun(tmp_path, tiny_train):
    first = tmp_path / "first"
    run("lrl-train", *tiny_train, f"hydra.run.dir={first}")
    assert (summary(first)["global_step"], summary(first)["num_projections"]) == (2, 2)
    run("lrl-train", *tiny_train, "trainer.max_epochs=2", f"hydra.run.dir={first}")
    resumed = summary(first)
    assert (resumed["epochs"], resumed["global_step"], resumed["num_projections"]) == (2, 4, 4)

    sweep = tmp_path / "sweep"
    ckpt = first / "checkpoints" / "last.ckpt"
    run("lrl-train", "-m", *tiny_train, f"init_ckpt={ckpt}", "method=lowrank_projection,decompose_finetune,decompose",
        "distill.weight=0.5", f"hydra.sweep.dir={sweep}")
    projected, baseline, decomposed = summary(sweep / "0"), summary(sweep / "1"), summary(sweep / "2")
    assert projected["method"] == "lowrank_projection" and projected["init_ckpt"] == str(ckpt)
    assert baseline["method"] == "decompose_finetune" and baseline["init_ckpt"] == str(ckpt)
    assert projected["config"]["distill"] == baseline["config"]["distill"] == {"weight": 0.5, "temperature": 4.0}
    assert baseline["test_acc_projected"] is None and baseline["max_abs_logit_diff"] is None
    assert 0 <= baseline["test_acc_decomposed"] <= 1 and 0 <= baseline["test_acc_dense"] <= 1
    assert baseline["params_factorized"] == projected["params_factorized"]
    assert not (sweep / "1" / "dense").exists()
    assert decomposed["method"] == "decompose" and decomposed["global_step"] == 0
    assert decomposed["test_acc_factorized"] == decomposed["test_acc_decomposed"] == baseline["test_acc_decomposed"]
    assert decomposed["checkpoint"] is None and not (sweep / "2" / "checkpoints").exists()
    for s in (projected, baseline, decomposed):
        assert 0 <= s["val_acc_factorized"] <= 1 and s["date"].endswith("+00:00")
        assert s["machine"]["cpu_count"] >= 1 and (s["commit"] is None or len(s["commit"]) >= 40)
    assert count_params(load_factorized(sweep / "1" / "factorized.pt")) == baseline["params_factorized"]


@pytest.mark.slow
def test_submitit_local_multirun_then_collect(tmp_path, tiny_train):
    sweep = tmp_path / "sweep"
    run("lrl-train", "-m", "hydra/launcher=local", *tiny_train, "lowrank.rank=0.25,0.5", f"hydra.sweep.dir={sweep}")
    assert (sweep / ".submitit").is_dir()
    (sweep / "2" / ".hydra").mkdir(parents=True)
    result = subprocess.run([sys.executable, "scripts/collect.py", str(sweep)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with (sweep / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["run"], r["status"], r["rank"]) for r in rows] == [
        ("0", "ok", "0.25"), ("1", "ok", "0.5"), ("2", "no summary.json (failed or running)", "")]
    assert "lowrank.rank=0.25" in rows[0]["overrides"]
    assert float(rows[0]["compression_ratio"]) > float(rows[1]["compression_ratio"]) > 1
    assert (sweep / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["lowrank=foo"], "Could not find 'lowrank/foo'"),
    (["lowrank.rank=abc"], "`rank` must be an int >= 1, a float in (0, 1]"),
    (["seed=abc"], "`seed` must be an int >= 0, got 'abc'"),
    (["data=mnist", "+data.root=/nonexistent/mnist", "+data.download=false"], "MNIST not found"),
])
def test_train_bad_input_fails_without_a_result(tmp_path, args, message):
    run_dir = tmp_path / "run"
    result = run("lrl-train", *args, "model=simple_cnn", f"hydra.run.dir={run_dir}", expect=1)
    assert message in result.stderr
    assert not (run_dir / "summary.json").exists() and not (run_dir / "factorized.pt").exists()
    if args == ["lowrank=foo"]:
        assert "Available options in 'lowrank'" in result.stderr and not run_dir.exists()


@pytest.mark.slow
def test_export_and_collect_bad_input(tmp_path, capsys):
    result = run("lrl-export", f"ckpt={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path / 'e'}", expect=1)
    assert "`ckpt` must be an existing checkpoint file" in result.stderr
    with pytest.raises(SystemExit) as exit_info:
        collect_main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no summary.json under" in capsys.readouterr().err
