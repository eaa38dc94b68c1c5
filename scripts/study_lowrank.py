"""Accuracy after compression: this method (periodic projection) against decompose-then-fine-tune.

One dense model is trained first (cached in ``--out``; default 6450 steps, 15 epochs of Fashion-MNIST's 55000
training images). From it, every compression point × method × seed × lr fine-tunes for the same number of
optimizer steps (default 1290, 3 epochs; cosine lr, SGD momentum 0.9) and is tested as the *factorized* model:

* ``project``: LowRankProjection every ``--period`` steps, final projection, then ``factorize``; modifiers
  joined by ``+`` change one callback option each: ``bn`` (BatchNorm re-estimation after the final projection,
  20 batches), ``warmup`` (rank annealed over the first 3 projections), ``reset`` (momentum zeroed at each
  projection), ``sdN`` (S_D = N instead of ``--period``); e.g. ``project+bn+sd200``;
* ``decompose_finetune``: ``factorize`` the dense model at the same ranks, fine-tune the factorized structure;
* ``decompose``: ``factorize`` the dense model, no fine-tuning (no lr grid).

The lr of each (point, method) is the best of ``--lrs`` by mean *validation* accuracy; test accuracy is
reported for that lr: mean ± std over the seeds that finished (diverged runs, with a non-finite loss, are left
out of the mean), and the count of diverged and collapsed (test accuracy below ``--collapse`` %) runs. With
several ``--lrs``, a second table gives the test accuracy at every lr. Tables cover only the runs of ``--seeds``
at ``--lrs``. Points are ``scheme:rank`` (rank a fraction of full rank, or ``Nx`` for a per-layer compression
target). Usage:

    python scripts/study_lowrank.py --workers 12 --out study   # tucker2:0.3, svd:4x, every method, 3 seeds (GPU)
    python scripts/study_lowrank.py --points tucker2:0.7 tucker2:0.5 tucker2:0.4 svd:2x tiled_svd:2x \
        tiled_svd:4x --methods project+sd200 decompose_finetune decompose --seeds 0 1 --out study  # more ratios
    python scripts/study_lowrank.py --summarize-only --points ... --methods ... --out study   # tables only

``--workers N`` runs N fine-tunings at once, one process each; on one GPU, 12 workers finish about 8 runs a
minute (H200). On a 2-core CPU one run takes about 6 minutes.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import multiprocessing
import os
import statistics
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch

from lrlightning import LowRankProjection, NonFiniteTrainingError, count_params, factorize
from lrlightning.app.data import DATAMODULES
from lrlightning.app.module import LitClassifier
from lrlightning.summary import format_table

METHODS = ("project+sd200", "project+bn+sd200", "project+reset+sd200", "project+sd50", "project+bn+sd50",
           "decompose_finetune", "decompose")
BASES = ("project", "decompose_finetune", "decompose")
TILE_SHAPE = (16, 16)
BN_BATCHES, WARMUP_PROJECTIONS = 20, 3


class StopOnNonFinite(L.Callback):
    """Stops a run without the projection callback when its loss becomes NaN/Inf."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not torch.isfinite(loss):
            raise NonFiniteTrainingError(f"loss became {loss.item()} at optimizer step {trainer.global_step}")


def parse_method(text: str, period: int) -> dict:
    """``project+bn+sd200`` -> callback settings; raises ValueError naming the unknown part."""
    base, *modifiers = text.split("+")
    if base not in BASES or (modifiers and base != "project"):
        raise ValueError(f"method {text!r}: must be one of {list(BASES)}, modifiers only after 'project'")
    settings = {"base": base, "period": period, "bn": 0, "warmup": 0, "reset": False}
    for modifier in modifiers:
        if modifier == "bn":
            settings["bn"] = BN_BATCHES
        elif modifier == "warmup":
            settings["warmup"] = WARMUP_PROJECTIONS
        elif modifier == "reset":
            settings["reset"] = True
        elif modifier.startswith("sd") and modifier[2:].isdigit() and int(modifier[2:]) > 0:
            settings["period"] = int(modifier[2:])
        else:
            raise ValueError(f"method {text!r}: unknown modifier {modifier!r} (bn, warmup, reset, sdN with N >= 1)")
    return settings


def method_arg(text: str) -> str:
    try:
        parse_method(text, 1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parse_point(text: str) -> dict:
    scheme, _, rank = text.partition(":")
    options = {"tile_shape": TILE_SHAPE} if scheme == "tiled_svd" else {}
    if rank.endswith("x"):
        return {"scheme": scheme, "rank": None, "compression": float(rank[:-1]), **options}
    return {"scheme": scheme, "rank": float(rank), **options}


def trainer(args, steps: int, root: Path, callbacks=()) -> L.Trainer:
    return L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator=args.accelerator, devices=1,
                     default_root_dir=root, callbacks=list(callbacks), num_sanity_val_steps=0)


def device_of(args) -> torch.device:
    gpu = args.accelerator == "gpu" or (args.accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if gpu else "cpu")


def accuracy(model: torch.nn.Module, loader, device: torch.device = torch.device("cpu")) -> float:
    model.to(device).eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


def pretrain(args, data, out: Path) -> LitClassifier:
    path = out / "dense.ckpt"
    if path.exists():
        return LitClassifier.load_from_checkpoint(path, map_location="cpu")
    L.seed_everything(1000, verbose=False)
    model = LitClassifier(args.backbone, num_classes=data.num_classes, in_channels=data.in_channels,
                          lr=args.pretrain_lr, backbone_kwargs={"width": args.width})
    run = trainer(args, args.pretrain_steps, out)
    run.fit(model, data)
    run.save_checkpoint(path)
    return model


def finetune(args, dense: LitClassifier, data, label: str, method: str, seed: int, lr: float, out: Path) -> dict:
    point = parse_point(label)
    settings = parse_method(method, args.period)
    L.seed_everything(seed, verbose=False)
    options = {k: v for k, v in point.items() if k != "scheme"}
    model = LitClassifier(args.backbone, num_classes=data.num_classes, in_channels=data.in_channels,
                          lr=lr or args.pretrain_lr, weight_decay=args.weight_decay, backbone_kwargs={"width": args.width})
    model.load_state_dict(dense.state_dict())
    status = "ok"
    start = time.perf_counter()
    if settings["base"] == "project":
        callback = LowRankProjection(point["scheme"], every_n_train_steps=settings["period"],
                                     bn_recalibration_batches=settings["bn"], rank_warmup=settings["warmup"],
                                     reset_momentum=settings["reset"], validate_projected=False, **options)
        try:
            trainer(args, args.finetune_steps, out, [callback]).fit(model, data)
        except NonFiniteTrainingError:
            status = "diverged"
        ranks = {name.removeprefix("backbone."): rank for name, rank in callback.ranks.items()}
        small = factorize(model.backbone, point["scheme"], rank=ranks,
                          **{k: v for k, v in options.items() if k == "tile_shape"})
    else:
        small = factorize(model.backbone, point["scheme"], **options)
        if method == "decompose_finetune":
            model = LitClassifier(small, num_classes=data.num_classes, in_channels=data.in_channels, lr=lr,
                                  weight_decay=args.weight_decay)
            try:
                trainer(args, args.finetune_steps, out, [StopOnNonFinite()]).fit(model, data)
            except NonFiniteTrainingError:
                status = "diverged"
            small = model.backbone
    device = device_of(args)
    val = accuracy(small, data.val_dataloader(), device) if status == "ok" else float("nan")
    test = accuracy(small, data.test_dataloader(), device) if status == "ok" else float("nan")
    if status == "ok" and not math.isfinite(test):
        status = "diverged"
    if status == "ok" and test < args.collapse:
        status = "collapsed"
    return {"point": label, "method": method, "seed": seed, "lr": lr, "val_acc": val, "test_acc": test, "status": status,
            "model_compression": count_params(dense.backbone) / count_params(small),
            "period": settings["period"] if settings["base"] == "project" else None,
            "steps": args.finetune_steps, "seconds": round(time.perf_counter() - start, 1), "device": device.type}


def requested(rows: list[dict], seeds: list[int], lrs: list[float]) -> list[dict]:
    """The runs of ``--seeds`` at ``--lrs`` (``decompose`` has no lr), so that a table states what it summarizes."""
    return [r for r in rows if r["seed"] in seeds and (r["method"] == "decompose" or r["lr"] in lrs)]


def summarize(rows: list[dict], dense_acc: float, points: list[str], methods: list[str]) -> tuple[list[list[str]], list[dict]]:
    table, chosen = [], []
    for point in points:
        for method in methods:
            runs = [r for r in rows if r["point"] == point and r["method"] == method]
            if not runs:
                continue
            by_lr = {}
            for r in runs:
                by_lr.setdefault(r["lr"], []).append(r)
            best_lr = max(by_lr, key=lambda lr: statistics.fmean(
                r["val_acc"] if math.isfinite(r["val_acc"]) else 0.0 for r in by_lr[lr]))
            best = by_lr[best_lr]
            tests = [r["test_acc"] for r in best if math.isfinite(r["test_acc"])] or [float("nan")]
            spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
            failed = sum(r["status"] != "ok" for r in by_lr[best_lr])
            failed_any = sum(r["status"] != "ok" for r in runs)
            summary = {"point": point, "method": method, "lr": best_lr, "test_mean": statistics.fmean(tests),
                       "test_std": spread, "seeds": len(best), "failed_at_lr": failed, "failed_any_lr": failed_any,
                       "model_compression": best[0]["model_compression"]}
            chosen.append(summary)
            table.append([point, f"{summary['model_compression']:.2f}x", method, f"{best_lr:g}",
                          f"{summary['test_mean']:.2f} ± {spread:.2f}", f"{summary['test_mean'] - dense_acc:+.2f}",
                          f"{failed}/{len(best)}", f"{failed_any}/{len(runs)}"])
    return table, chosen


def lr_table(rows: list[dict], points: list[str], methods: list[str], lrs: list[float]) -> list[list[str]]:
    """Test accuracy % of every fine-tuned (point, method) at each lr: mean ± std / finished seeds, "-" if not run."""
    table = []
    for point in points:
        for method in methods:
            if method == "decompose":
                continue
            cells = []
            for lr in lrs:
                tests = [r["test_acc"] for r in rows if (r["point"], r["method"], r["lr"]) == (point, method, lr)
                         and math.isfinite(r["test_acc"])]
                spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
                cells.append(f"{statistics.fmean(tests):.2f} ± {spread:.2f} /{len(tests)}" if tests else "-")
            if any(cell != "-" for cell in cells):
                table.append([point, method, *cells])
    return table


def verdicts(chosen: list[dict]) -> list[str]:
    """Per point: the best ``project*`` method against decompose-then-fine-tune, in points of test accuracy.

    Only methods with at least as many seeds as the baseline compete for best, unless none has them.
    """
    lines = []
    for point in dict.fromkeys(c["point"] for c in chosen):
        rows = {c["method"]: c for c in chosen if c["point"] == point}
        projected = [c for m, c in rows.items() if m.startswith("project")]
        if not projected or "decompose_finetune" not in rows:
            continue
        baseline = rows["decompose_finetune"]
        candidates = [c for c in projected if c["seeds"] >= baseline["seeds"]] or projected
        best = max(candidates, key=lambda c: c["test_mean"])
        gap = best["test_mean"] - baseline["test_mean"]
        if min(best["seeds"], baseline["seeds"]) < 2:
            word = "compared on one seed (no spread to judge by) with"
        else:
            noise = max(best["test_std"], baseline["test_std"])
            word = "ahead of" if gap > noise else "behind" if -gap > noise else "level (within one std) with"
        lines.append(f"{point}: best {best['method']} {best['test_mean']:.2f} is {word} decompose_finetune "
                     f"{baseline['test_mean']:.2f} ({gap:+.2f} pt)")
    return lines


def job_list(args) -> list[tuple[str, str, int, float]]:
    """(point, method, seed, lr), seed-major so that a deadline leaves whole seeds of every configuration."""
    return [(label, method, seed, lr) for seed in args.seeds for label in args.points for method in args.methods
            for lr in (args.lrs if method != "decompose" else [0.0])]


_WORKER: dict = {}


def load_data(args):
    kwargs = {"root": args.data_root} if args.data_root else {}
    data = DATAMODULES[args.data](batch_size=args.batch_size, seed=0, **kwargs)
    data.setup("fit")
    data.setup("test")
    return data


def quiet() -> None:
    warnings.simplefilter("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def start_worker(args, threads: int) -> None:
    quiet()
    torch.set_num_threads(threads)
    out = Path(args.out)
    _WORKER.update(args=args, out=out, data=load_data(args),
                   dense=LitClassifier.load_from_checkpoint(out / "dense.ckpt", map_location="cpu"))


def run_job(job: tuple, deadline: float) -> dict | None:
    """One fine-tuning run in a worker process, or None once the deadline (a `time.time()` value) has passed."""
    if time.time() > deadline:
        return None
    w = _WORKER
    return finetune(w["args"], w["dense"], w["data"], *job, w["out"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="fashion_mnist", choices=sorted(DATAMODULES))
    parser.add_argument("--data-root", default=None, help="folder with the dataset files (default: searched)")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--points", nargs="+", default=["tucker2:0.3", "svd:4x"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), type=method_arg)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.03])
    parser.add_argument("--period", type=int, default=200, help="S_D in optimizer steps")
    parser.add_argument("--pretrain-steps", type=int, default=6450)
    parser.add_argument("--pretrain-lr", type=float, default=0.1)
    parser.add_argument("--finetune-steps", type=int, default=1290)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--collapse", type=float, default=50.0, help="test accuracy %% below which a run collapsed")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel, one process each (several share a GPU)")
    parser.add_argument("--deadline-minutes", type=float, default=None,
                        help="start no run after this many minutes; finished runs are kept and summarized")
    parser.add_argument("--summarize-only", action="store_true", help="run nothing; summarize the runs in --out")
    parser.add_argument("--out", default="study")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    quiet()
    started = time.time()
    deadline = started + 60 * args.deadline_minutes if args.deadline_minutes else math.inf

    out = Path(args.out)
    if args.summarize_only and not (out / "dense.ckpt").exists():
        parser.error(f"--summarize-only needs a finished study in --out, but {out / 'dense.ckpt'} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args)
    dense = pretrain(args, data, out)
    dense_acc = accuracy(dense.backbone, data.test_dataloader(), device_of(args))
    results_path = out / "runs.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    done = [r for r in done if r.get("steps", args.finetune_steps) == args.finetune_steps]
    seen = {(r["point"], r["method"], r["seed"], r["lr"]) for r in done}
    pending = [] if args.summarize_only else [job for job in job_list(args) if job not in seen]
    print(f"dense test accuracy {dense_acc:.2f} %; {len(pending)} runs to do, {len(seen)} done", flush=True)

    def record(row: dict) -> None:
        done.append(row)
        with results_path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"[{time.time() - started:6.0f} s] {row['point']} {row['method']} seed={row['seed']} lr={row['lr']:g}: "
              f"test {row['test_acc']:.2f} ({row['status']}, {row['seconds']} s)", flush=True)

    if args.workers == 1:
        for job in pending:
            if time.time() > deadline:
                break
            record(finetune(args, dense, data, *job, out))
    else:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.workers, initializer=start_worker, initargs=(args, threads)) as pool:
            for row in pool.imap_unordered(partial(run_job, deadline=deadline), pending):
                if row is not None:
                    record(row)
    methods = list(dict.fromkeys(args.methods))
    points = list(dict.fromkeys(args.points))
    rows = requested(done, args.seeds, args.lrs)
    table, chosen = summarize(rows, dense_acc, points, methods)
    text = format_table(["point", "model ratio", "method", "lr", "test acc %", "vs dense", "failed", "failed (all lrs)"],
                        table)
    text += "".join(f"\n{line}" for line in verdicts(chosen))
    text += (f"\n(dense {args.backbone} width {args.width}: {dense_acc:.2f} %; {args.finetune_steps} fine-tuning steps, "
             f"S_D={args.period} unless the method says sdN, batch {args.batch_size}, seeds {args.seeds}, "
             f"lr chosen on validation from {args.lrs})")
    if len(args.lrs) > 1:
        headers = ["point", "method", *(f"lr {lr:g}" for lr in args.lrs)]
        text += "\n\ntest acc % at each lr (mean ± std / seeds):\n"
        text += format_table(headers, lr_table(rows, points, methods, args.lrs))
    print(text)
    (out / "summary.txt").write_text(text + "\n")
    if chosen:
        with (out / "summary.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(chosen[0]))
            writer.writeheader()
            writer.writerows(chosen)


if __name__ == "__main__":
    main()
