"""``lrl-collect SWEEP_DIR``: every run's ``summary.json`` into ``results.csv`` (one row per run), the runs
aggregated over seeds into ``aggregate.csv`` and ``aggregate.md`` (lr chosen on validation, failed runs counted,
each method against decompose_finetune; see ``aggregate``), and an accuracy-vs-compression Pareto plot
(``pareto.png``) and against the measured speedup (``speedup.png``: dense / factorized latency), and, for runs
with a ``deploy`` entry, accuracy against the deployed models' ONNX Runtime latency (``deployed.png``). Run dirs without a summary (failed or still running) count as failed runs and are left out of
the plot. ``lrl-collect --report results/ --out docs/results.md`` writes the results document (``results_doc``)."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..rules import rule_label

from .aggregate import (COLLAPSED, DIVERGED, METHOD_ALIASES, OK, aggregate, describe_run, label,
                                   label_variants, report, summary_point)

NO_SUMMARY = "no summary.json (failed or running)"
UNFINISHED = "unfinished (deploy step did not end)"
DEPLOY_FAILED = "deploy failed"
COLUMNS = ["run", "status", "overrides", "method", "point", "variant", "seed", "lr", "scheme", "rank",
           "compression_ratio", "model_compression_ratio", "mac_reduction", "params_dense", "params_factorized",
           "macs_dense", "macs_factorized", "val_acc_factorized", "test_acc_projected", "test_acc_factorized",
           "max_abs_logit_diff", "latency_ms_dense", "latency_ms_factorized", "latency_batch_size", "speedup",
           "speedup_low", "speedup_high", "speedup_distinguishable",
           "budget", "budget_metric", "every_n_train_steps", "epochs", "global_step", "diverged", "first_loss_jump",
           "loss_jump", "date", "commit"]
DEPLOYED = ("dense_fp32", "factorized_fp32", "dense_int8", "factorized_int8")  # rows of a summary's deploy entry
DEPLOY_FIELDS = ("latency_ms", "latency_ms_batch1", "size_bytes", "test_acc")
COLUMNS += [f"{model}_{field}" for model in DEPLOYED for field in DEPLOY_FIELDS]
AGGREGATE_COLUMNS = ["point", "model_compression_ratio", "method", "variant", "lr", "chosen", "runs", "seeds",
                     "failed", "failed_all_lrs", "val_mean", "test_mean", "test_std", "speedup", "speedup_low",
                     "speedup_high", "first_loss_jump", "loss_jump"]
AXES = ("compression_ratio", "model_compression_ratio", "mac_reduction", "speedup")


def overrides_of(run_dir: Path) -> str:
    """The Hydra overrides of a run (``.hydra/overrides.yaml``), space-separated."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return " ".join(OmegaConf.load(path)) if path.is_file() else ""


def config_of(run_dir: Path, summary: dict[str, Any] | None) -> dict[str, Any]:
    """The run's resolved config: from its summary, else from ``.hydra/config.yaml`` (a run that wrote none)."""
    if summary is not None:
        return summary.get("config") or {}
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    config = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException:  # an interpolation into the hydra node, which a job config does not hold
        return OmegaConf.to_container(config, resolve=False)


def status_of(summary: dict[str, Any], collapse: float | None) -> str:
    """``unfinished`` (killed during its deploy step: ``finished`` false), ``deploy failed`` (its ``deploy``
    holds an error), ``diverged`` (non-finite training loss or
    accuracy), ``collapsed`` (test accuracy below ``collapse`` %) or ``ok``."""
    if summary.get("finished") is False:
        return UNFINISHED
    if isinstance(summary.get("deploy"), dict) and "error" in summary["deploy"]:
        return DEPLOY_FAILED
    accuracy = summary.get("test_acc_factorized")
    if summary.get("diverged") or accuracy is None or not math.isfinite(accuracy):
        return DIVERGED
    return COLLAPSED if collapse is not None and 100 * accuracy < collapse else OK


def loss_jumps(log: list[dict[str, Any]]) -> dict[str, float]:
    """``first_loss_jump`` and ``loss_jump`` (mean over projections): the training loss just after a projection
    minus just before it, from a run's ``projection_log``; empty when it recorded none."""
    jumps = [entry["loss_after"] - entry["loss_before"] for entry in log
             if entry.get("loss_after") is not None and entry.get("loss_before") is not None]
    return {"first_loss_jump": jumps[0], "loss_jump": sum(jumps) / len(jumps)} if jumps else {}


def natural_key(path: Path) -> list:
    """Sort key that puts run 2 before run 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def collect_rows(sweep_dir: Path, collapse: float | None = None) -> list[dict[str, Any]]:
    """One row per run dir (a dir holding ``summary.json`` or ``.hydra/``), in natural order of run path, with
    ``method``, ``point``, ``variant``, ``seed``, ``lr`` and ``settings`` (see ``aggregate``)."""
    runs = {p.parent for p in sweep_dir.rglob("summary.json")} | {p.parent for p in sweep_dir.rglob(".hydra")}
    rows = []
    for run_dir in sorted(runs, key=natural_key):
        row: dict[str, Any] = {"run": str(run_dir.relative_to(sweep_dir)) or ".", "overrides": overrides_of(run_dir)}
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        row.update(describe_run(config_of(run_dir, summary)))
        if summary is not None:
            row.update({key: summary.get(key) for key in COLUMNS if key in summary}, status=status_of(summary, collapse))
            row["method"] = METHOD_ALIASES.get(row["method"], row["method"])
            row["point"] = row["point"] or summary_point(summary)
            if summary.get("rule"):
                rule = summary["rule"]
                row.update(rank=rule_label(rule), budget=rule.get("budget"), budget_metric=rule.get("metric"))
            row["machine"] = summary.get("machine")
            if row.get("speedup") is None and summary.get("latency_ms_dense") and summary.get("latency_ms_factorized"):
                row["speedup"] = summary["latency_ms_dense"] / summary["latency_ms_factorized"]
            row.update(loss_jumps(summary.get("projection_log") or []))
            row.update(deployed_columns(summary.get("deploy")))
        else:
            row["status"] = NO_SUMMARY
        rows.append(row)
    label_variants(rows)
    return rows


def deployed_columns(entry: Any) -> dict[str, Any]:
    """``<model>_<field>`` of each deployed model (``DEPLOYED``, ``DEPLOY_FIELDS``) of a summary's ``deploy``
    entry; empty without one."""
    if not isinstance(entry, dict) or not isinstance(entry.get("rows"), dict):
        return {}
    return {f"{model}_{field}": row.get(field) for model, row in entry["rows"].items() if model in DEPLOYED
            for field in DEPLOY_FIELDS}


def save_figure(fig, ax, path: Path, legend_size: str) -> None:
    """Grid, legend, tight layout; write ``path`` (PNG, 120 dpi) and close the figure."""
    import matplotlib.pyplot as plt

    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_deployed(rows: list[dict[str, Any]], path: Path) -> bool:
    """Test accuracy against ONNX Runtime latency at the run's latency batch, one marker per deployed model
    (``DEPLOYED``) and method, each run's models joined by a thin line; False (nothing written) when no run was
    deployed."""
    done = [r for r in rows if r["status"] == OK and any(r.get(f"{m}_latency_ms") is not None for m in DEPLOYED)]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in done:
        models = [m for m in DEPLOYED if row.get(f"{m}_latency_ms") is not None]
        ax.plot([row[f"{m}_latency_ms"] for m in models], [100 * row[f"{m}_test_acc"] for m in models],
                color="grey", linewidth=0.5, alpha=0.5)
    for model, marker in zip(DEPLOYED, "os^D"):
        for method in sorted({label(r) for r in done}):
            members = [r for r in done if label(r) == method and r.get(f"{model}_latency_ms") is not None]
            if members:
                ax.scatter([r[f"{model}_latency_ms"] for r in members],
                           [100 * r[f"{model}_test_acc"] for r in members], marker=marker, alpha=0.8,
                           label=f"{model.replace('_', ' ')} / {method}")
    batches = sorted({r["latency_batch_size"] for r in done if r.get("latency_batch_size") is not None})
    ax.set_xscale("log")
    ax.set_xlabel(f"ONNX Runtime latency, ms per batch of {', '.join(map(str, batches))} (lower is faster)")
    ax.set_ylabel("test accuracy in ONNX Runtime (%)")
    ax.set_title(f"accuracy vs deployed latency ({len(done)} runs)")
    save_figure(fig, ax, path, "x-small")
    return True


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] = COLUMNS) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (higher is better), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front[::-1]


def plot(rows: list[dict[str, Any]], path: Path, x_key: str = "compression_ratio") -> None:
    """Test accuracy of the factorized model against ``x_key`` (a compression ratio or the measured speedup), one
    marker per method (variant) and scheme, and the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    done = [r for r in rows if r["status"] == OK and r.get("test_acc_factorized") is not None
            and r.get(x_key) is not None]
    points = [(float(r[x_key]), 100 * float(r["test_acc_factorized"])) for r in done]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for group in sorted({(label(r), r["scheme"]) for r in done}, key=str):
        members = [(p, r) for p, r in zip(points, done) if (label(r), r["scheme"]) == group]
        marks = ax.scatter(*zip(*[p for p, _ in members]), label=f"{group[0]} / {group[1]}", alpha=0.8)
        ranged = [(p, r) for p, r in members if r.get(f"{x_key}_low") is not None and r.get(f"{x_key}_high") is not None]
        if ranged:  # the measured speedup's interquartile range
            xs = [p[0] for p, _ in ranged]
            ax.errorbar(xs, [p[1] for p, _ in ranged], fmt="none", ecolor=marks.get_facecolor()[0], alpha=0.6,
                        xerr=[[x - float(r[f"{x_key}_low"]) for x, (_, r) in zip(xs, ranged)],
                              [float(r[f"{x_key}_high"]) - x for x, (_, r) in zip(xs, ranged)]])
    for (x, y), row in zip(points, done):
        if row.get("rank") is not None:
            ax.annotate(str(row["rank"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    front = [points[i] for i in pareto_front(points)]
    ax.plot(*zip(*front), color="black", linewidth=1, marker="o", markerfacecolor="none", markersize=9,
            label="Pareto front")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    what = "measured speedup (bars: interquartile range)" if x_key == "speedup" else x_key.replace("_", " ")
    ax.set_xlabel(what + " (dense / factorized)")
    ax.set_ylabel("test accuracy of the factorized model (%)")
    ax.set_title(f"accuracy vs {'speed' if x_key == 'speedup' else 'compression'} ({len(done)} runs)")
    save_figure(fig, ax, path, "small")


def write_sweep(rows: list[dict[str, Any]], out: Path, x_key: str = AXES[0]) -> str:
    """``results.csv``, ``aggregate.csv``, ``aggregate.md``, ``pareto.png`` (accuracy vs ``x_key``) and
    ``speedup.png`` (accuracy vs measured speedup) into ``out``, and ``deployed.png`` when some run was deployed;
    returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    cells = aggregate(rows)
    write_csv(cells, out / "aggregate.csv", AGGREGATE_COLUMNS)
    text = report(cells)
    (out / "aggregate.md").write_text(text)
    plot(rows, out / "pareto.png", x_key)
    plot(rows, out / "speedup.png", "speedup")
    plot_deployed(rows, out / "deployed.png")
    return text
