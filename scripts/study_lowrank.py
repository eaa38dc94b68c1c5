"""Accuracy after compression: this method (periodic projection) against decompose-then-fine-tune.

One dense model is trained first (cached in ``--out``). From it, every compression point × method × seed × lr
fine-tunes for the same number of optimizer steps and is tested as the *factorized* model:

* ``project``: LowRankProjection every ``--period`` steps, final projection, then ``factorize``;
* ``project_bn``: the same plus BatchNorm re-estimation after the final projection;
* ``project_bn_warmup``: the same plus the rank annealed over the first 3 projections;
* ``decompose_finetune``: ``factorize`` the dense model at the same ranks, fine-tune the factorized structure;
* ``decompose``: ``factorize`` the dense model, no fine-tuning (no lr grid).

The lr of each (point, method) is the best of ``--lrs`` by mean *validation* accuracy; test accuracy is
reported for that lr: mean ± std over the seeds that finished (diverged runs, with a non-finite loss, are left
out of the mean), and the count of diverged and collapsed (test accuracy below ``--collapse`` %) runs. Points are ``scheme:rank`` (rank a fraction of full rank, or
``Nx`` for a per-layer compression target). Usage:

    python scripts/study_lowrank.py --out study                    # ResNet-20, Fashion-MNIST, tucker2:0.3, svd:4x
    python scripts/study_lowrank.py --points tucker2:0.7 tucker2:0.5 tucker2:0.4 tucker2:0.3 svd:2x svd:4x \
        tiled_svd:2x tiled_svd:4x --seeds 0 1 --out study_ratios
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import warnings
from pathlib import Path

import lightning as L
import torch

from lrlightning import LowRankProjection, NonFiniteTrainingError, count_params, factorize
from lrlightning.data import DATAMODULES
from lrlightning.module import LitClassifier
from lrlightning.summary import format_table

METHODS = ("project", "project_bn", "project_bn_warmup", "decompose_finetune", "decompose")
TILE_SHAPE = (16, 16)


class StopOnNonFinite(L.Callback):
    """Stops a run without the projection callback when its loss becomes NaN/Inf."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not torch.isfinite(loss):
            raise NonFiniteTrainingError(f"loss became {loss.item()} at optimizer step {trainer.global_step}")


def parse_point(text: str) -> dict:
    scheme, _, rank = text.partition(":")
    options = {"tile_shape": TILE_SHAPE} if scheme == "tiled_svd" else {}
    if rank.endswith("x"):
        return {"scheme": scheme, "rank": None, "compression": float(rank[:-1]), **options}
    return {"scheme": scheme, "rank": float(rank), **options}


def trainer(steps: int, root: Path, callbacks=()) -> L.Trainer:
    return L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                     default_root_dir=root, callbacks=list(callbacks), num_sanity_val_steps=0)


def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


def pretrain(args, data, out: Path) -> LitClassifier:
    path = out / "dense.ckpt"
    if path.exists():
        return LitClassifier.load_from_checkpoint(path)
    L.seed_everything(1000, verbose=False)
    model = LitClassifier(args.backbone, num_classes=data.num_classes, in_channels=data.in_channels,
                          lr=args.pretrain_lr, backbone_kwargs={"width": args.width})
    run = trainer(args.pretrain_steps, out)
    run.fit(model, data)
    run.save_checkpoint(path)
    return model


def finetune(args, dense: LitClassifier, data, label: str, method: str, seed: int, lr: float, out: Path) -> dict:
    point = parse_point(label)
    L.seed_everything(seed, verbose=False)
    options = {k: v for k, v in point.items() if k != "scheme"}
    model = LitClassifier(args.backbone, num_classes=data.num_classes, in_channels=data.in_channels,
                          lr=lr or args.pretrain_lr, weight_decay=args.weight_decay, backbone_kwargs={"width": args.width})
    model.load_state_dict(dense.state_dict())
    status = "ok"
    if method.startswith("project"):
        callback = LowRankProjection(point["scheme"], every_n_train_steps=args.period,
                                     bn_recalibration_batches=20 if "bn" in method else 0,
                                     rank_warmup=3 if "warmup" in method else 0, validate_projected=False,
                                     **options)
        try:
            trainer(args.finetune_steps, out, [callback]).fit(model, data)
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
                trainer(args.finetune_steps, out, [StopOnNonFinite()]).fit(model, data)
            except NonFiniteTrainingError:
                status = "diverged"
            small = model.backbone
    val = accuracy(small, data.val_dataloader()) if status == "ok" else float("nan")
    test = accuracy(small, data.test_dataloader()) if status == "ok" else float("nan")
    if status == "ok" and not math.isfinite(test):
        status = "diverged"
    if status == "ok" and test < args.collapse:
        status = "collapsed"
    return {"point": label, "method": method, "seed": seed, "lr": lr, "val_acc": val, "test_acc": test, "status": status,
            "model_compression": count_params(dense.backbone) / count_params(small)}


def summarize(rows: list[dict], dense_acc: float) -> tuple[list[list[str]], list[dict]]:
    table, chosen = [], []
    for point in dict.fromkeys(r["point"] for r in rows):
        for method in METHODS:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="fashion_mnist", choices=sorted(DATAMODULES))
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--points", nargs="+", default=["tucker2:0.3", "svd:4x"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.003])
    parser.add_argument("--period", type=int, default=50, help="S_D in optimizer steps")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-lr", type=float, default=0.1)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--collapse", type=float, default=50.0, help="test accuracy %% below which a run collapsed")
    parser.add_argument("--out", default="study")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = DATAMODULES[args.data](batch_size=args.batch_size, seed=0)
    data.setup("fit")
    data.setup("test")
    dense = pretrain(args, data, out)
    dense_acc = accuracy(dense.backbone, data.test_dataloader())
    results_path = out / "runs.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    seen = {(r["point"], r["method"], r["seed"], r["lr"]) for r in done}
    for label in args.points:
        for method in args.methods:
            for seed in args.seeds:
                for lr in (args.lrs if method != "decompose" else [0.0]):
                    if (label, method, seed, lr) in seen:
                        continue
                    row = finetune(args, dense, data, label, method, seed, lr, out)
                    done.append(row)
                    with results_path.open("a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(f"{label} {method} seed={seed} lr={lr:g}: test {row['test_acc']:.2f} ({row['status']})",
                          flush=True)
    table, chosen = summarize(done, dense_acc)
    text = format_table(["point", "model ratio", "method", "lr", "test acc %", "vs dense", "failed", "failed (all lrs)"],
                        table)
    text += (f"\n(dense {args.backbone} width {args.width}: {dense_acc:.2f} %; {args.finetune_steps} fine-tuning steps, "
             f"S_D={args.period}, batch {args.batch_size}, seeds {args.seeds}, lr chosen on validation from {args.lrs})")
    print(text)
    (out / "summary.txt").write_text(text + "\n")
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(chosen[0]))
        writer.writeheader()
        writer.writerows(chosen)


if __name__ == "__main__":
    main()
