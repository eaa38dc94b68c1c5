"""Deployed size and speed: dense and factorized models as ONNX fp32 and int8 files, timed side by side in ONNX Runtime.

For each backbone, the weights (random, BatchNorm statistics set by two train-mode passes) are projected at ranks
allocated for ``--mac-budget`` times fewer MACs (``svd`` by default), the model is factorized, and the dense and the
factorized model are exported (``lrlightning.deploy.onnx.export_onnx``: BatchNorm folded, dynamic batch, checked
against PyTorch) and quantized to int8 (``lrlightning.deploy.int8.quantize_int8``: static QDQ, per-channel weights,
calibrated on ``--calibration-batches`` random batches, ``Int8Config`` from ``--weight-range``, ``--activations`` and
``--layers``: by default chosen for this CPU, each layer in int8 only where measured faster at ``--batch-sizes``).
The four files are then timed interleaved in ONNX Runtime (CPU, torch's thread count, no spin-waiting) at each of
``--batch-sizes``: median ms over the rounds, speedups as per-round ratios against dense fp32, and the share of the
composed gain the factorized int8 file keeps: its speedup / (factorized fp32 speedup x dense int8 speedup), per
round. ``--compare-settings`` also times the factorized model quantized at every weight range and activation type
(all layers in int8), so that the choice made for this CPU is confirmed by timing. Targets (ResNet-18 at 224, about
3x fewer MACs): factorized int8 keeps >= 0.9 of the composed gain at batch 1 and 32, and is >= 10x smaller.

``--run RUN_DIR`` publishes instead the ``deploy`` entry of an ``lrl-train ... deploy=int8`` run (trained weights,
test accuracy on real data), e.g. the quickstart's. Usage:

    python scripts/bench_deploy.py                                  # ResNet-18, 3x224x224, 1000 classes
    python scripts/bench_deploy.py --backbones resnet20 --image-size 28 --in-channels 1 --num-classes 10
    python scripts/bench_deploy.py --run outputs/2026-12-03/15-00-00 --out results/deploy/quickstart.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lrlightning import Budget, LowRankOptions, count_macs, factorize_planned
from lrlightning.app.collect import overrides_of
from lrlightning.app.deploy import DEPLOY_ROUNDS
from lrlightning.app.provenance import publish_table
from lrlightning.deploy.int8 import quantize_int8
from lrlightning.deploy.int8_config import Int8Config
from lrlightning.speed.cpu import cpu_label
from lrlightning.deploy.onnx import SessionModule, export_onnx, session
from lrlightning.plan import allocate_plan
from lrlightning.projection import project_planned_
from lrlightning.speed.timing import Spread, interleaved_samples, paired_ratios
from lrlightning.zoo import build_backbone

from bench_common import wait_policy

LABELS = ("dense_fp32", "factorized_fp32", "dense_int8", "factorized_int8")


def settled_batchnorm(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """``model`` with BatchNorm running statistics from two train-mode passes on random batches, in eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *shape))
    return model.eval()


def publish_run(run_dir: Path, out: str) -> None:
    """The deploy rows of an ``lrl-train`` run's ``summary.json`` as a result table."""
    summary = json.loads((run_dir / "summary.json").read_text())
    entry = summary.get("deploy")
    if not isinstance(entry, dict) or "rows" not in entry:
        raise SystemExit(f"{run_dir / 'summary.json'} holds no deploy rows (run lrl-train with deploy=int8)")
    rows = entry["rows"]
    batch = entry["latency_batch_size"]
    dense_size = rows["dense_fp32"]["size_bytes"]
    table = [[label.replace("_", " "), f"{row['size_bytes'] / 1e6:.2f} MB", f"{dense_size / row['size_bytes']:.2f}x",
              f"{row['latency_ms']:.2f}", f"{row['latency_ms_batch1']:.2f}",
              f"{row['speedup']:.2f}x ({row['speedup_low']:.2f}-{row['speedup_high']:.2f})",
              f"{row['speedup_batch1']:.2f}x", f"{100 * row['test_acc']:.2f} %"] for label, row in rows.items()]
    columns = ["model", "file", "smaller", f"ms, batch {batch}", "ms, batch 1", f"speedup vs dense fp32, batch {batch}",
               "speedup, batch 1", "test accuracy (ONNX Runtime)"]
    cost = entry.get("int8_accuracy_cost", {})
    footnote = (f"(the run's {summary['method']} {summary['scheme']} model, {summary['layers_compressed']} layers "
                f"factorized, {summary['mac_reduction']:.2f}x fewer MACs, trained {summary.get('global_step')} steps "
                f"at commit {summary.get('commit')}; {entry['runtime']}, {entry['threads']} threads, files timed "
                f"interleaved; int8 calibrated on {entry.get('calibration_batches')} training batches, "
                f"{int8_text(entry)}; accuracy cost "
                f"of int8: dense {100 * cost.get('dense', float('nan')):.2f} pt, factorized "
                f"{100 * cost.get('factorized', float('nan')):.2f} pt; overrides: {overrides_of(run_dir) or 'none'})")
    data = {"run": str(run_dir), "summary": {k: summary.get(k) for k in (
        "method", "scheme", "rule", "ranks", "mac_reduction", "model_compression_ratio", "test_acc_factorized",
        "speedup", "latency_batch_size", "commit", "date", "machine", "budget_check")}, "deploy": entry}
    publish_table(out, "Deployed: the quickstart model in ONNX Runtime, fp32 and int8 (trained, Fashion-MNIST)",
                  "deploy", columns, table, footnote, data)


def int8_text(entry: dict) -> str:
    """How a run's ``deploy`` entry quantized: its settings and which layers stayed in float."""
    settings = entry.get("int8") or {}
    if not settings:
        return "settings not recorded"
    left = entry["rows"].get("factorized_int8", entry["rows"].get("dense_int8", {})).get("float_layers", [])
    return (f"{settings['weight_range']} weight range, {settings['activations']} activations, layers "
            f"{settings['layers']} ({settings['why']}); factorized layers left in float: {', '.join(left) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet18"])
    parser.add_argument("--scheme", default="svd")
    parser.add_argument("--mac-budget", type=float, default=3.0, help="dense / factorized MACs (default: 3)")
    parser.add_argument("--rank-multiple", type=int, default=8, help="ranks rounded to multiples of it (default: 8)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--calibration-batch-size", type=int, default=8)
    parser.add_argument("--weight-range", default="auto", choices=["auto", "full", "reduced"])
    parser.add_argument("--activations", default="auto", choices=["auto", "uint8", "int8"])
    parser.add_argument("--layers", default="measured", choices=["measured", "all"])
    parser.add_argument("--compare-settings", action="store_true",
                        help="also time the factorized model at every weight range and activation type")
    parser.add_argument("--rounds", type=int, default=DEPLOY_ROUNDS)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's count)")
    parser.add_argument("--run", type=Path, default=None, help="publish this lrl-train run dir's deploy entry")
    parser.add_argument("--out", default="results/deploy/bench_deploy.json")
    args = parser.parse_args()
    if args.run is not None:
        publish_run(args.run, args.out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (args.in_channels, args.image_size, args.image_size)
    rows, data = [], []
    for backbone in args.backbones:
        torch.manual_seed(0)
        dense = settled_batchnorm(build_backbone(backbone, num_classes=args.num_classes,
                                                 in_channels=args.in_channels), shape)
        options = LowRankOptions(args.scheme, Budget(args.mac_budget, metric="macs", input_shape=shape,
                                                         rank_multiple=args.rank_multiple))
        plans, _, _ = allocate_plan(dense, options, warn=False)
        project_planned_(dense, plans, options)
        small = factorize_planned(dense, plans, options).eval()
        mac_reduction = count_macs(dense, shape) / count_macs(small, shape)
        print(f"{backbone}: {len(plans)} layers factorized, {mac_reduction:.2f}x fewer MACs", file=sys.stderr,
              flush=True)
        config = Int8Config(args.weight_range, args.activations, layers=args.layers)
        variants = {f"factorized_int8_{weights}_{activations}": Int8Config(weights, activations, layers="all")
                    for weights in ("full", "reduced") for activations in ("uint8", "int8")
                    } if args.compare_settings else {}
        labels = [*LABELS, *variants]
        with tempfile.TemporaryDirectory() as folder:
            example = torch.randn(4, *shape)
            calibration = [torch.randn(args.calibration_batch_size, *shape) for _ in range(args.calibration_batches)]
            files, seconds = {}, {}
            for name, model in (("dense", dense), ("factorized", small)):
                start = time.perf_counter()
                files[f"{name}_fp32"] = export_onnx(model, example, Path(folder) / f"{name}.onnx")
                seconds[f"{name}_fp32"] = time.perf_counter() - start
                for label, settings in {f"{name}_int8": config, **(variants if name == "factorized" else {})}.items():
                    start = time.perf_counter()
                    files[label] = quantize_int8(files[f"{name}_fp32"].path, Path(folder) / f"{label}.onnx",
                                                 calibration, settings, args.batch_sizes)
                    seconds[label] = time.perf_counter() - start
            runners = {label: SessionModule(session(files[label].path)) for label in labels}
            with torch.no_grad():
                logits = dense(example)
            agreement = {label: float(torch.corrcoef(torch.stack([torch.from_numpy(runners[label](example)).flatten(),
                                                                   logits.flatten()]))[0, 1]) for label in labels}
            measured, composed = {}, {}
            for batch in args.batch_sizes:
                print(f"  timing at batch {batch} ...", file=sys.stderr, flush=True)
                samples = dict(zip(labels, interleaved_samples([runners[label] for label in labels],
                                                               torch.randn(batch, *shape), args.rounds, 0.2,
                                                               args.rounds)))
                measured[batch] = {label: {"ms": Spread.of(samples[label]).as_dict(),
                                           "speedup": paired_ratios(samples["dense_fp32"], samples[label]).as_dict()}
                                   for label in labels}
                composed[batch] = Spread.of([f32 * d8 / (f8 * d32) for d32, f32, d8, f8 in zip(
                    *(samples[label] for label in LABELS))]).as_dict()
            dense_size = files["dense_fp32"].size_bytes
            for label in labels:
                file = files[label]
                speedups = [measured[batch][label]["speedup"] for batch in args.batch_sizes]
                share = label == "factorized_int8"
                rows.append([backbone, label.replace("_", " "), f"{file.size_bytes / 1e6:.1f} MB",
                             f"{dense_size / file.size_bytes:.2f}x",
                             *[f"{measured[batch][label]['ms']['median']:.1f}" for batch in args.batch_sizes],
                             *[f"{s['median']:.2f}x ({s['low']:.2f}-{s['high']:.2f})" for s in speedups],
                             *[f"{composed[batch]['median']:.2f}" if share else "" for batch in args.batch_sizes],
                             f"{agreement[label]:.3f}"])
                int8 = getattr(file, "settings", None)
                data.append({"backbone": backbone, "model": label, "scheme": args.scheme,
                             "mac_budget": args.mac_budget, "rank_multiple": args.rank_multiple,
                             "mac_reduction": mac_reduction, "input_shape": list(shape),
                             "size_bytes": file.size_bytes, "size_ratio": dense_size / file.size_bytes,
                             "seconds_to_write": seconds[label], "logit_correlation_with_dense": agreement[label],
                             "file": file.as_dict() | {"path": Path(file.path).name},
                             "latency": {str(batch): measured[batch][label] for batch in args.batch_sizes},
                             "composed_gain_share": ({str(b): composed[b] for b in args.batch_sizes} if share
                                                     else None),
                             "int8_settings": int8,
                             "targets_met": ({"composed_gain_0.9": all(composed[b]["median"] >= 0.9
                                                                       for b in args.batch_sizes),
                                              "size_10x": dense_size / file.size_bytes >= 10.0}
                                             if share else None)})
    columns = ["backbone", "model", "file", "smaller", *[f"ms, batch {b}" for b in args.batch_sizes],
               *[f"speedup vs dense fp32, batch {b}" for b in args.batch_sizes],
               *[f"share of composed gain, batch {b}" for b in args.batch_sizes], "logits ~ PyTorch"]
    footnote = (f"({args.scheme} at {args.mac_budget:g}x fewer MACs, ranks multiples of {args.rank_multiple}, "
                f"inputs {shape}, random weights with BatchNorm "
                f"statistics from two train-mode passes; CPU {cpu_label()}; int8: ONNX Runtime static QDQ, per-channel "
                f"int8 weights, {config.why()}; layers: {args.layers} (measured: a layer in int8 only where it timed "
                f"faster alone, at batch {', '.join(map(str, args.batch_sizes))}); calibrated on "
                f"{args.calibration_batches} random batches of {args.calibration_batch_size}; "
                f"ONNX Runtime CPU, {torch.get_num_threads()} threads, no spin-waiting{wait_policy()}; the "
                f"files timed interleaved over {args.rounds} rounds, median ms and per-round speedup with its "
                "interquartile range; share of composed gain: factorized int8 speedup / (factorized fp32 speedup x "
                "dense int8 speedup), per round (target >= 0.9); logits ~ PyTorch: correlation of the file's logits "
                "with the projected dense PyTorch model's on 4 random inputs (the factorized model computes the same "
                "function); factorized int8 <full|reduced> <uint8|int8>: every layer in int8 at that weight range "
                "and activation type)")
    publish_table(args.out, f"Deployed models in ONNX Runtime, fp32 and int8 ({', '.join(args.backbones)}, CPU)",
                  "deploy", columns, rows, footnote, data)


if __name__ == "__main__":
    main()
