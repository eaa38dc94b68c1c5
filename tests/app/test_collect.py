"""lrl-collect on sweeps written by the tests: runs grouped by everything but the seed, mean ± std over seeds, the
lr chosen on validation, failed runs counted, verdicts against decompose_finetune; and the results document,
which must match docs/results.md byte for byte."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lrlightning.app.aggregate import BASELINE, aggregate, chosen_table, verdicts
from lrlightning.app.cli import collect_main
from lrlightning.app.collect import NO_SUMMARY, collect_rows
from lrlightning.app.provenance import describe_machine, git_commit, machine, provenance
from lrlightning.app.results_doc import COMMAND, document, find_entries

REPO = Path(__file__).resolve().parents[2]


def write_run(run_dir: Path, method: str, seed: int, lr: float, val: float, test: float, scheme: str = "tucker2",
              rank: Any = 0.3, diverged: bool = False, projection_log: list | None = None, rule: dict | None = None,
              **callback) -> None:
    """A run dir as lrl-train leaves it: summary.json with the resolved config (``scheme`` and ``rank`` as the
    config gives them: a name or number, or a ``_target_`` node), the recorded rule (``rule``, default
    ``{"rank": rank}``) and the accuracies (fractions)."""
    baseline = None if method in ("lowrank_projection", "deeptwist") else method
    lowrank = {"_target_": "lrlightning.LowRankProjection", "scheme": scheme, "rank": rank,
               "every_n_train_steps": 200, **callback}
    config = {"seed": seed, "baseline": baseline, "init_ckpt": "/dense.ckpt", "model": {"backbone": "resnet20", "lr": lr},
              "lowrank": lowrank}
    name = scheme if isinstance(scheme, str) else scheme["_target_"].rsplit(".", 1)[-1].lower().replace("svd", "_svd")
    summary = {"method": method, "scheme": name, "rule": rule or {"rank": rank}, "config": config, "val_acc_factorized": val / 100,
               "test_acc_factorized": test / 100, "model_compression_ratio": 6.35, "compression_ratio": 6.8,
               "diverged": diverged, "date": "2026-01-02T03:04:05+00:00", "commit": "a" * 40,
               "latency_ms_dense": 8.0, "latency_ms_factorized": 4.0,
               "machine": {"hostname": "box", "cpu": "cpu", "cpu_count": 2, "threads": 2, "gpu": None},
               **({"projection_log": projection_log} if projection_log is not None else {})}
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))


def write_failed_run(run_dir: Path, seed: int, lr: float) -> None:
    """A run dir that never wrote summary.json: only Hydra's record of its config."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nbaseline: null\nmodel:\n  backbone: resnet20\n  lr: {lr}\ninit_ckpt: /dense.ckpt\n"
        "lowrank:\n  _target_: lrlightning.LowRankProjection\n  scheme: tucker2\n  rank: 0.3\n"
        "  every_n_train_steps: 200\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n- model.lr={lr}\n")


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Seeds 0-2 of the method at two lrs (lr 0.1 wins on test but loses on validation), of the baseline at one
    lr; a one-seed S_D=50 probe; a diverged and a failed run of the method at lr 0.1."""
    root = tmp_path / "sweep"
    runs = [("lowrank_projection", 0.03, [(91.0, 92.0), (91.2, 92.2), (91.4, 92.4)]),
            ("lowrank_projection", 0.1, [(90.0, 93.0)]),
            ("decompose_finetune", 0.03, [(91.0, 92.3), (91.0, 92.3), (91.0, 92.3)])]
    index = 0
    for method, lr, accuracies in runs:
        for seed, (val, test) in enumerate(accuracies):
            write_run(root / str(index), method, seed, lr, val, test)
            index += 1
    write_run(root / str(index), "lowrank_projection", 1, 0.1, 95.0, float("nan"), diverged=True)
    write_failed_run(root / str(index + 1), seed=2, lr=0.1)
    write_run(root / str(index + 2), "lowrank_projection", 0, 0.03, 91.5, 93.5, every_n_train_steps=50)
    return root


def cells_by(cells, **match):
    return [c for c in cells if all(c[k] == v for k, v in match.items())]


def test_runs_group_by_everything_but_the_seed(sweep):
    rows = collect_rows(sweep)
    assert len(rows) == 10 and [r["run"] for r in rows] == [str(i) for i in range(10)]
    assert {r["point"] for r in rows} == {"tucker2:0.3"}
    assert [r["status"] for r in rows[7:9]] == ["diverged", NO_SUMMARY]
    assert rows[8]["method"] == "lowrank_projection" and (rows[8]["seed"], rows[8]["lr"]) == (2, 0.1)
    variants = {(r["method"], r["variant"]) for r in rows}
    assert variants == {("lowrank_projection", "lowrank.every_n_train_steps=200"),
                        ("lowrank_projection", "lowrank.every_n_train_steps=50"), ("decompose_finetune", "")}

    cells = aggregate(rows)
    [main] = cells_by(cells, method="lowrank_projection", lr=0.03, variant="lowrank.every_n_train_steps=200")
    assert (main["runs"], main["seeds"], main["failed"]) == (3, 3, 0)
    assert main["test_mean"] == pytest.approx(92.2) and main["test_std"] == pytest.approx(0.2)
    assert main["val_mean"] == pytest.approx(91.2)


def test_lr_is_chosen_on_validation_and_failed_runs_are_counted(sweep):
    cells = aggregate(collect_rows(sweep))
    family = cells_by(cells, method="lowrank_projection", variant="lowrank.every_n_train_steps=200")
    by_lr = {c["lr"]: c for c in family}
    assert by_lr[0.03]["chosen"] and not by_lr[0.1]["chosen"]  # lr 0.1 tests higher but validates lower
    assert (by_lr[0.1]["runs"], by_lr[0.1]["seeds"], by_lr[0.1]["failed"]) == (3, 1, 2)
    assert by_lr[0.1]["test_mean"] == pytest.approx(93.0)  # the diverged run is left out of the mean
    assert by_lr[0.03]["failed_all_lrs"] == 2 and by_lr[0.03]["runs_all_lrs"] == 6
    header, rows = chosen_table(cells)
    row = dict(zip(header, next(r for r in rows if r[3] == "lowrank.every_n_train_steps=200")))
    assert (row["lr"], row["test acc %"], row["seeds"], row["failed"], row["failed (all lrs)"]) == (
        "0.03", "92.20 ± 0.20", "3/3", "0/3", "2/6")


def test_verdicts_against_the_baseline_never_call_a_one_seed_probe_best(sweep):
    lines = verdicts(aggregate(collect_rows(sweep)))
    assert lines == [
        "tucker2:0.3: lowrank_projection (lowrank.every_n_train_steps=200) 92.20 is level (within one std) with "
        "decompose_finetune 92.30 (-0.10 pt)",
        "tucker2:0.3: lowrank_projection (lowrank.every_n_train_steps=50) 93.50 is compared on one seed (no spread "
        "to judge by) with decompose_finetune 92.30 (+1.20 pt)",
        "tucker2:0.3: best lowrank_projection (lowrank.every_n_train_steps=200) 92.20, -0.10 pt against "
        "decompose_finetune",
    ]


def test_verdict_words_follow_the_spread(tmp_path):
    for index, (method, test) in enumerate([("lowrank_projection", 93.0), ("lowrank_projection", 93.2),
                                            ("decompose_finetune", 92.0), ("decompose_finetune", 92.2)]):
        write_run(tmp_path / str(index), method, index % 2, 0.03, 90.0, test)
    [line, best] = verdicts(aggregate(collect_rows(tmp_path)))
    assert line.endswith("93.10 is ahead of decompose_finetune 92.10 (+1.00 pt)")
    assert best.startswith("tucker2:0.3: best lowrank_projection 93.10")


def test_older_summaries_that_say_deeptwist_are_the_same_method(tmp_path):
    write_run(tmp_path / "0", "deeptwist", 0, 0.03, 90.0, 91.0)
    write_run(tmp_path / "1", "lowrank_projection", 1, 0.03, 90.0, 92.0)
    [cell] = aggregate(collect_rows(tmp_path))
    assert (cell["method"], cell["seeds"], cell["test_mean"]) == ("lowrank_projection", 2, pytest.approx(91.5))


def test_points_keep_schemes_and_plan_settings_apart(tmp_path):
    four = {"_target_": "lrlightning.Compression", "factor": 4.0}
    write_run(tmp_path / "0", "lowrank_projection", 0, 0.03, 90.0, 91.0, scheme="svd", rank=four,
              rule={"compression": 4.0})
    for index, tile in ((1, [16, 16]), (2, [8, 8])):
        write_run(tmp_path / str(index), "lowrank_projection", 0, 0.03, 90.0, 91.0, rank=four,
                  scheme={"_target_": "lrlightning.TiledSVD", "tile_shape": tile}, rule={"compression": 4.0})
    export = tmp_path / "export"  # lrl-export: the rank rule is in the summary, the config holds only overrides
    export.mkdir()
    (export / "summary.json").write_text(json.dumps({
        "method": "decompose", "scheme": "svd", "rule": {"compression": 2.0}, "test_acc_factorized": 0.5,
        "config": {"ckpt": "/run/last.ckpt", "lowrank": {"rank": {"_target_": "lrlightning.Compression",
                                                                  "factor": 2.0}}}}))
    assert [r["point"] for r in collect_rows(tmp_path)] == [
        "svd:4x", "tiled_svd:4x scheme.tile_shape=[16, 16]", "tiled_svd:4x scheme.tile_shape=[8, 8]", "svd:2x"]


def test_legacy_flat_configs_keep_schemes_and_plan_settings_apart(tmp_path):
    write_run(tmp_path / "0", "lowrank_projection", 0, 0.03, 90.0, 91.0, scheme="svd", rank=None, compression=4.0)
    write_run(tmp_path / "1", "lowrank_projection", 0, 0.03, 90.0, 91.0, scheme="tiled_svd", rank=None,
              compression=4.0, tile_shape=[16, 16])
    write_run(tmp_path / "2", "lowrank_projection", 0, 0.03, 90.0, 91.0, scheme="tiled_svd", rank=None,
              compression=4.0, tile_shape=[8, 8])
    export = tmp_path / "export"  # lrl-export: the rank rule is in the summary, the config holds only overrides
    export.mkdir()
    (export / "summary.json").write_text(json.dumps({
        "method": "decompose", "scheme": "svd", "rule": {"compression": 2.0}, "test_acc_factorized": 0.5,
        "config": {"ckpt": "/run/last.ckpt", "lowrank": {"rank": None, "compression": 2.0}}}))
    assert [r["point"] for r in collect_rows(tmp_path)] == [
        "svd:4x", "tiled_svd:4x tile_shape=[16, 16]", "tiled_svd:4x tile_shape=[8, 8]", "svd:2x"]


def test_a_budget_is_a_point_of_its_own(tmp_path):
    budget = {"_target_": "lrlightning.Budget", "factor": 4.0}
    write_run(tmp_path / "0", "lowrank_projection", 0, 0.03, 90.0, 91.0, rank=budget,
              rule={"budget": 4.0, "metric": "params"})
    write_run(tmp_path / "1", "lowrank_projection", 0, 0.03, 90.0, 91.0, rank={**budget, "metric": "macs"},
              rule={"budget": 4.0, "metric": "macs"})
    export = tmp_path / "export"
    export.mkdir()
    (export / "summary.json").write_text(json.dumps({
        "method": "decompose", "scheme": "svd", "rule": {"budget": 2.0, "metric": "macs"}, "test_acc_factorized": 0.5,
        "config": {"ckpt": "/run/last.ckpt", "lowrank": {"rank": {**budget, "factor": 2.0, "metric": "macs"}}}}))
    rows = collect_rows(tmp_path)
    assert [r["point"] for r in rows] == ["tucker2:budget=4x params", "tucker2:budget=4x macs", "svd:budget=2x macs"]
    assert [(r["budget"], r["budget_metric"]) for r in rows] == [(4.0, "params"), (4.0, "macs"), (2.0, "macs")]


def test_a_legacy_flat_budget_is_a_point_of_its_own(tmp_path):
    write_run(tmp_path / "0", "lowrank_projection", 0, 0.03, 90.0, 91.0, rank=None, budget=4.0)
    write_run(tmp_path / "1", "lowrank_projection", 0, 0.03, 90.0, 91.0, rank=None, budget=4.0, budget_metric="macs")
    export = tmp_path / "export"
    export.mkdir()
    (export / "summary.json").write_text(json.dumps({
        "method": "decompose", "scheme": "svd", "rule": {"budget": 2.0, "metric": "macs"}, "test_acc_factorized": 0.5,
        "config": {"ckpt": "/run/last.ckpt", "lowrank": {"rank": None, "budget": 2.0, "budget_metric": "macs"}}}))
    assert [r["point"] for r in collect_rows(tmp_path)] == [
        "tucker2:budget=4x params", "tucker2:budget=4x macs", "svd:budget=2x macs"]


def test_collapse_threshold_counts_a_run_as_failed(tmp_path):
    write_run(tmp_path / "0", "decompose", 0, 0.03, 10.0, 11.0)
    write_run(tmp_path / "1", "decompose", 1, 0.03, 80.0, 81.0)
    [cell] = aggregate(collect_rows(tmp_path, collapse=50.0))
    assert (cell["seeds"], cell["failed"], cell["test_mean"]) == (2, 1, pytest.approx(46.0))


def test_command_writes_every_output(sweep, capsys):
    out = sweep.parent / "out"
    assert collect_main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| point | model ratio | method |" in printed and "9 of 10 runs" in printed
    with (out / "results.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == 10 and runs[8]["status"] == NO_SUMMARY and runs[0]["point"] == "tucker2:0.3"
    assert runs[0]["speedup"] == "2.0" and runs[8]["speedup"] == ""
    with (out / "aggregate.csv").open() as handle:
        cells = list(csv.DictReader(handle))
    assert len(cells) == 4 and sum(c["chosen"] == "True" for c in cells) == 3
    assert (out / "aggregate.md").read_text() in printed
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_document_matches_the_committed_results():
    """docs/results.md is generated: regenerate it with the documented command after changing results/."""
    committed = (REPO / "docs" / "results.md").read_text()
    assert COMMAND in committed
    generated = document(REPO / "results", REPO / "docs" / "figures")
    assert generated == committed, f"docs/results.md is out of date with results/: run `{COMMAND}`"
    for figure in re.findall(r"\]\((figures/[^)]+\.png)\)", committed):
        assert (REPO / "docs" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_result_file_states_date_commit_and_machine():
    entries = find_entries(REPO / "results")
    assert {e["section"] for e in entries} >= {"accuracy", "overhead", "projection", "speed", "data"}
    for entry in entries:
        if entry["kind"] == "tables":
            assert re.fullmatch(r"\d{4}-\d\d-\d\d.*", entry["date"]) and re.fullmatch(r"[0-9a-f]{7,40}", entry["commit"])
            assert entry["machine"] and all(t["rows"] and len(t["columns"]) == len(t["rows"][0]) for t in entry["tables"])
    for summary in (REPO / "results").rglob("summary.json"):
        fields = json.loads(summary.read_text())
        assert fields["date"] and re.fullmatch(r"[0-9a-f]{40}", fields["commit"]) and fields["machine"]["cpu_count"]


@pytest.mark.slow
def test_a_benchmark_writes_a_result_file_the_document_shows(tmp_path):
    out = tmp_path / "results" / "data" / "bench.json"
    command = [sys.executable, "scripts/bench_data.py", "--dataset", "synthetic", "--backbone", "simple_cnn",
               "--steps", "1", "--warmup", "0", "--batch-size", "16", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["command"].startswith("python scripts/bench_data.py --dataset synthetic")
    assert record["commit"] == git_commit() and record["machine"]["cpu_count"] >= 1
    assert [row[0] for row in record["tables"][0]["rows"]] == [r["variant"] for r in record["data"]["rows"]]
    text = document(tmp_path / "results", tmp_path / "figures")
    assert "## Data loading\n\n### Data loading of simple_cnn on synthetic" in text
    assert "- files: `results/data/bench.json`" in text and "| batched, augment |" in text


def test_results_document_rejects_an_incomplete_table_file(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bench.json").write_text(json.dumps({"title": "t", "section": "speed"}))
    with pytest.raises(SystemExit):
        collect_main(["--report", str(tmp_path / "results"), "--out", str(tmp_path / "doc.md")])
    error = capsys.readouterr().err
    assert "bench.json lacks ['date', 'commit', 'machine', 'command', 'tables']" in error


def test_provenance_names_the_commit_and_the_machine():
    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    facts = provenance()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", facts["date"])
    assert facts["machine"] == machine() and facts["machine"]["threads"] >= 1 and facts["machine"]["cpu"]
    assert describe_machine({"hostname": "h", "cpu": "Xeon", "cpu_count": 2, "threads": 2, "gpu": None}) == (
        "h: Xeon, 2 cores, torch threads 2")
    assert describe_machine("2-core CPU") == "2-core CPU"
    assert git_commit(Path("/")) is None and not math.isnan(facts["machine"]["cpu_count"])


def test_settings_that_only_change_speed_make_no_variant(tmp_path):
    for index, retain in enumerate((None, True, False)):
        write_run(tmp_path / str(index), "lowrank_projection", index, 0.03, 90.0, 91.0)
        if retain is not None:
            path = tmp_path / str(index) / "summary.json"
            summary = json.loads(path.read_text())
            summary["config"].update(retain_freed_memory=retain, latency_batch_size=4 + index)
            path.write_text(json.dumps(summary))
    [cell] = aggregate(collect_rows(tmp_path))
    assert (cell["variant"], cell["seeds"]) == ("", 3)


def test_under_a_latency_budget_the_latency_batch_makes_a_variant(tmp_path):
    for index, batch in enumerate((32, 32, 128)):
        write_run(tmp_path / str(index), "lowrank_projection", index, 0.03, 90.0, 91.0,
                  rank={"_target_": "lrlightning.Budget", "factor": 1.3, "metric": "latency"},
                  rule={"budget": 1.3, "metric": "latency"})
        path = tmp_path / str(index) / "summary.json"
        summary = json.loads(path.read_text())
        summary["config"]["latency_batch_size"] = batch
        path.write_text(json.dumps(summary))
    cells = aggregate(collect_rows(tmp_path))
    assert sorted((c["variant"], c["seeds"]) for c in cells) == [("latency_batch_size=128", 1),
                                                                 ("latency_batch_size=32", 2)]


def test_objectives_are_variants_compared_best_against_best_with_their_loss_jumps(tmp_path):
    runs = [("lowrank_projection", "weight", [90.0, 91.0]), ("lowrank_projection", "activation", [92.0, 92.2]),
            ("decompose_finetune", "weight", [91.4, 91.6]), ("decompose_finetune", "activation", [91.7, 91.9])]
    index = 0
    for method, objective, tests in runs:
        for seed, test in enumerate(tests):
            jump = 0.6 if objective == "weight" else 0.2
            log = [{"step": 200, "loss_before": 0.3, "loss_after": 0.3 + jump},
                   {"step": 400, "loss_before": 0.3, "loss_after": 0.3 + jump / 2}] if method != BASELINE else None
            write_run(tmp_path / str(index), method, seed, 0.03, 90.0, test, objective=objective, projection_log=log)
            index += 1
    cells = aggregate(collect_rows(tmp_path))
    lines = verdicts(cells)
    assert ("tucker2:0.3: best of lowrank_projection, lowrank_projection (lowrank.objective=activation) 92.10, "
            "against the best decompose_finetune (lowrank.objective=activation) 91.80: +0.30 pt") in lines
    header, rows = chosen_table(cells)
    assert header[-1] == "loss jump (first / mean)"
    jumps = {(row[2], row[3]): row[-1] for row in rows}
    assert jumps[("lowrank_projection", "lowrank.objective=weight")] == "+0.600 / +0.450"
    assert jumps[("lowrank_projection", "lowrank.objective=activation")] == "+0.200 / +0.150"
    assert jumps[("decompose_finetune", "lowrank.objective=weight")] == "-"
