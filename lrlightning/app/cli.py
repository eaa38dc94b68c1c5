"""Console entry points: ``lrl-train`` and ``lrl-export`` (Hydra apps on ``conf/``, which the package carries as
``lrlightning/app/conf``) and ``lrl-collect``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> dict | None:
    """Train with the low-rank callback, test, export: ``lrl-train [overrides]``, ``lrl-train -m ...``."""
    from .train import train as run

    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def export(cfg: DictConfig) -> dict | None:
    """Factorize a checkpoint and write the same artefacts: ``lrl-export ckpt=PATH [lowrank=... data=...]``."""
    from .export import export as run

    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


def collect(argv: list[str] | None = None) -> None:
    """Gather a sweep's summaries: ``lrl-collect SWEEP_DIR``."""
    sys.exit(collect_main(argv))


def collect_main(argv: list[str] | None = None) -> int:
    """``lrl-collect``: a sweep's tables and plots, or (``--report``) the results document; returns the exit code."""
    from . import collect as collecting
    from .collect import AXES, NO_SUMMARY, collect_rows, write_sweep
    from .results_doc import write_document

    parser = argparse.ArgumentParser(prog="lrl-collect", description=collecting.__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, nargs="?", help="a multirun dir (or any dir holding run dirs)")
    parser.add_argument("--out", type=Path, help="where the CSVs, aggregate.md and pareto.png go (default: "
                        "SWEEP_DIR); with --report, the document to write")
    parser.add_argument("--x", choices=AXES, default=AXES[0], help="plot axis (default: %(default)s)")
    parser.add_argument("--collapse", type=float, metavar="PCT",
                        help="count a run whose test accuracy is below PCT %% as failed (collapsed)")
    parser.add_argument("--report", type=Path, metavar="RESULTS_DIR",
                        help="write the results document (Markdown, PNG plots beside it) from RESULTS_DIR to --out")
    args = parser.parse_args(argv)
    if args.report is not None:
        if args.sweep_dir is not None or args.out is None:
            parser.error("--report RESULTS_DIR takes no SWEEP_DIR and needs --out, e.g. --out docs/results.md")
        try:
            write_document(args.report, args.out)
        except ValueError as error:
            parser.error(str(error))
        print(f"{args.report} -> {args.out}")
        return 0
    if args.sweep_dir is None or not args.sweep_dir.is_dir():
        parser.error(f"SWEEP_DIR must be a directory, got {str(args.sweep_dir)!r}")
    rows = collect_rows(args.sweep_dir, args.collapse)
    if all(r["status"] == NO_SUMMARY for r in rows):
        parser.error(f"no summary.json under {str(args.sweep_dir)!r} ({len(rows)} run dirs without one); "
                     "runs write it when they finish")
    out = args.out or args.sweep_dir
    print(write_sweep(rows, out, args.x))
    deployed = f", {out / 'deployed.png'}" if (out / "deployed.png").is_file() else ""
    print(f"{sum(r['status'] != NO_SUMMARY for r in rows)} of {len(rows)} runs -> {out / 'results.csv'}, "
          f"{out / 'aggregate.md'}, {out / 'pareto.png'}, {out / 'speedup.png'}{deployed}")
    return 0
