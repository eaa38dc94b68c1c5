"""``lrl-collect SWEEP_DIR``: every run's ``summary.json`` into ``results.csv`` and an accuracy-vs-compression
Pareto plot (``pareto.png``). Run dirs of the sweep without a summary (failed, diverged or still running) are
listed in the CSV with their status and left out of the plot."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

COLUMNS = ["run", "status", "overrides", "method", "scheme", "rank", "compression_ratio", "model_compression_ratio",
           "mac_reduction", "params_dense", "params_factorized", "macs_dense", "macs_factorized", "test_acc_projected",
           "test_acc_factorized", "max_abs_logit_diff", "latency_ms_dense", "latency_ms_factorized",
           "latency_batch_size", "every_n_train_steps", "epochs", "global_step", "diverged"]
AXES = ("compression_ratio", "model_compression_ratio", "mac_reduction")


def overrides_of(run_dir: Path) -> str:
    """The Hydra overrides of a run (``.hydra/overrides.yaml``), space-separated."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return " ".join(OmegaConf.load(path)) if path.is_file() else ""


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per run dir (a dir holding ``summary.json`` or ``.hydra/``), sorted by run path."""
    runs = {p.parent for p in sweep_dir.rglob("summary.json")} | {p.parent for p in sweep_dir.rglob(".hydra")}
    rows = []
    for run_dir in sorted(runs):
        row: dict[str, Any] = {"run": str(run_dir.relative_to(sweep_dir)) or ".", "overrides": overrides_of(run_dir)}
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            row.update({key: summary.get(key) for key in COLUMNS if key in summary}, status="ok")
        else:
            row["status"] = "no summary.json (failed or running)"
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
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
    """Test accuracy of the factorized model against compression, one marker per method/scheme, Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    done = [r for r in rows if r["status"] == "ok" and r.get("test_acc_factorized") is not None]
    points = [(float(r[x_key]), 100 * float(r["test_acc_factorized"])) for r in done]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for group in sorted({(r["method"], r["scheme"]) for r in done}, key=str):
        chosen = [p for p, r in zip(points, done) if (r["method"], r["scheme"]) == group]
        ax.scatter(*zip(*chosen), label=f"{group[0]} / {group[1]}", alpha=0.8)
    for (x, y), row in zip(points, done):
        ax.annotate(str(row.get("rank")), (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    front = [points[i] for i in pareto_front(points)]
    ax.plot(*zip(*front), color="black", linewidth=1, marker="o", markerfacecolor="none", markersize=9,
            label="Pareto front")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.set_xlabel(x_key.replace("_", " ") + " (dense / factorized)")
    ax.set_ylabel("test accuracy of the factorized model (%)")
    ax.set_title(f"accuracy vs compression ({len(done)} runs)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lrl-collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun dir (or any dir holding run dirs)")
    parser.add_argument("--out", type=Path, help="where results.csv and pareto.png go (default: SWEEP_DIR)")
    parser.add_argument("--x", choices=AXES, default=AXES[0], help="plot axis (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"SWEEP_DIR must be a directory, got {str(args.sweep_dir)!r}")
    rows = collect_rows(args.sweep_dir)
    if not any(r["status"] == "ok" for r in rows):
        parser.error(f"no summary.json under {str(args.sweep_dir)!r} ({len(rows)} run dirs without one); "
                     "runs write it when they finish")
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    plot(rows, out / "pareto.png", args.x)
    print(f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} runs -> {out / 'results.csv'}, {out / 'pareto.png'}")
    return 0
