"""Cost of one low-rank projection of every selected conv versus one SGD training step, measured in one run.

For each backbone (CIFAR-style, 3×32×32 inputs), one training step (forward, cross-entropy, backward, SGD with
momentum) and one projection (``project_planned_``: every selected conv, each scheme and SVD driver) are timed
interleaved, ``--repeats`` times after a warm-up; the table gives medians and the ratio projection / step.
The plan (layer selection and ranks) is made once beforehand, as ``LowRankProjection`` does.

Ranks: 0.5 of each layer's full rank; ``tiled_svd`` uses 16×16 tiles of rank 4; ``spatial_svd`` uses 0.45,
because at 0.5 every square 3×3 conv (S = T) is exactly at break-even (r·6S = 9S² params) and would stay dense.
On CPU both are timed with one intra-op thread unless ``--threads`` says otherwise: on a CPU shared with other jobs,
OpenMP workers waiting on busy cores make the many small batched SVDs (and the step) slower by one to two orders
of magnitude, which measures the neighbours rather than the method. Usage:

    python scripts/bench_projection.py                    # ResNet-32 and ResNet-56, batch 128, 7 repeats
    python scripts/bench_projection.py --quick --threads 2 --out /tmp/bench.json
    python scripts/bench_projection.py --device cuda --projection-devices same cpu   # decompose on the GPU or the CPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lrlightning import LowRankOptions, Solver, TiledSVD
from lrlightning.app.provenance import write_result
from lrlightning.plan import plan_layers
from lrlightning.projection import project_planned_
from lrlightning.schemes import CUSOLVER_DRIVERS, SVD_DRIVERS, resolve_driver
from lrlightning.training.summary import format_table
from lrlightning.zoo import build_backbone

from bench_common import timed

SCHEMES = {
    "svd": dict(scheme="svd", rank=0.5),
    "tucker2": dict(scheme="tucker2", rank=0.5),
    "spatial_svd": dict(scheme="spatial_svd", rank=0.45),
    "tiled_svd": dict(scheme=TiledSVD(tile_shape=(16, 16)), rank=4),
}


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor):
    """A function running one SGD step (forward, loss, backward, optimizer step) on the fixed batch."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def drivers_on(device: torch.device, drivers: list[str] | None) -> list[str]:
    """``drivers`` (default: every driver) that run on ``device``: cuSOLVER ones on CUDA only."""
    return [d for d in drivers or SVD_DRIVERS if device.type == "cuda" or d not in CUSOLVER_DRIVERS]


def projection_cases(model: nn.Module, drivers: list[str] | None, projection_devices: list[str]) -> list[dict]:
    """One case per scheme, projection device and driver: options, plan (made once) and a function projecting
    every planned conv."""
    cases, device = [], next(model.parameters()).device
    for name, settings in SCHEMES.items():
        for where in projection_devices:
            decomposed_on = device if where == "same" else torch.device(where)
            for driver in drivers_on(decomposed_on, drivers):
                options = LowRankOptions(**settings, solver=Solver(driver, None if where == "same" else where))
                start = time.perf_counter()
                plans, skipped = plan_layers(model, options, warn=False)
                plan_seconds = time.perf_counter() - start
                copied = decomposed_on.type != device.type
                cases.append({
                    "scheme": name, "rank": settings["rank"], "layers": len(plans),
                    "decomposed_on": f"{decomposed_on.type} (copied)" if copied else decomposed_on.type,
                    "driver": f"auto ({resolve_driver(driver, decomposed_on)})" if driver == "auto" else driver,
                    "left_dense": len(skipped), "plan_ms": 1000 * plan_seconds,
                    "run": lambda plans=plans, options=options: project_planned_(model, plans, options),
                    "times": [],
                })
    return cases


def bench_backbone(name: str, batch_size: int, repeats: int, warmup: int, device: torch.device,
                   drivers: list[str] | None = None, projection_devices: tuple[str, ...] = ("same",)) -> dict:
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=10, in_channels=3).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    step = training_step(model, optimizer, images, labels)
    cases = projection_cases(model, drivers, list(projection_devices))
    step_times = []
    for index in range(warmup + repeats):
        measured = index >= warmup
        seconds = timed(step, device)
        if measured:
            step_times.append(seconds)
        order = cases if index % 2 == 0 else cases[::-1]
        for case in order:
            seconds = timed(case["run"], device)
            if measured:
                case["times"].append(seconds)
    step_ms = 1000 * statistics.median(step_times)
    rows = []
    for case in cases:
        projection_ms = 1000 * statistics.median(case["times"])
        rows.append({
            "backbone": name, "scheme": case["scheme"], "driver": case["driver"], "rank": case["rank"],
            "decomposed_on": case["decomposed_on"],
            "layers": case["layers"], "left_dense": case["left_dense"], "plan_ms": case["plan_ms"],
            "projection_ms": projection_ms, "projection_ms_all": [1000 * t for t in case["times"]],
            "step_ms": step_ms, "ratio": projection_ms / step_ms,
        })
    return {"backbone": name, "step_ms": step_ms, "step_ms_all": [1000 * t for t in step_times], "rows": rows}


def fastest_line(rows: list[dict], backbone: str, scheme: str) -> str:
    """Which driver and device project ``scheme`` fastest on ``backbone``, and its time against auto's."""
    mine = [r for r in rows if r["backbone"] == backbone and r["scheme"] == scheme]
    best = min(mine, key=lambda r: r["projection_ms"])
    auto = [r for r in mine if r["driver"].startswith("auto")]
    versus = ", ".join(f"auto on {r['decomposed_on']} x{r['projection_ms'] / best['projection_ms']:.2f} of it"
                       for r in auto)
    return (f"fastest {backbone} {scheme}: {best['driver']} on {best['decomposed_on']} "
            f"({best['projection_ms']:.1f} ms, {best['ratio']:.3f} of a step); {versus}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet32", "resnet56"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="measured repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 measured repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--drivers", nargs="+", default=None, choices=SVD_DRIVERS,
                        help="svd_driver values (default: every one that runs where the weights decompose)")
    parser.add_argument("--projection-devices", nargs="+", default=["same"],
                        help="projection_device values side by side ('same': the weights' device, or e.g. cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on CPU)")
    parser.add_argument("--out", default="results/projection/bench_projection.json",
                        help="result file (see docs/results.md)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    device = torch.device(args.device)
    for where in args.projection_devices:
        decomposed_on = device if where == "same" else torch.device(where)
        if not drivers_on(decomposed_on, args.drivers):
            parser.error(f"--drivers {' '.join(args.drivers)} has none that runs on {decomposed_on.type} "
                         f"(--projection-devices {where}); cuSOLVER drivers {CUSOLVER_DRIVERS} run on CUDA only")
    threads = args.threads if args.threads is not None else 1 if device.type == "cpu" else None
    if threads is not None:
        torch.set_num_threads(threads)

    results = [bench_backbone(name, args.batch_size, repeats, args.warmup, device, args.drivers,
                              tuple(args.projection_devices)) for name in args.backbones]
    rows = [row for result in results for row in result["rows"]]
    header = ["backbone", "scheme", "decomposed on", "driver", "rank", "layers", "projection ms", "step ms",
              "projection/step"]
    cells = [[r["backbone"], r["scheme"], r["decomposed_on"], r["driver"], str(r["rank"]), str(r["layers"]),
              f"{r['projection_ms']:.1f}",
              f"{r['step_ms']:.1f}", f"{r['ratio']:.3f}"] for r in rows]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    caption = (f"One projection of every selected conv vs one SGD step (batch {args.batch_size}, 3x32x32, {where}, "
               f"median of {repeats})")
    worst = max(rows, key=lambda r: r["ratio"])
    largest = (f"largest ratio: {worst['ratio']:.3f} ({worst['backbone']} {worst['scheme']} {worst['driver']} on "
               f"{worst['decomposed_on']})")
    fastest = [fastest_line(rows, backbone, scheme) for backbone in args.backbones for scheme in SCHEMES]
    print(caption)
    print(format_table(header, cells))
    print(largest)
    print("\n".join(fastest))
    payload = {
        "device": where, "batch_size": args.batch_size, "repeats": repeats, "warmup": args.warmup,
        "schemes": {name: {k: v if isinstance(v, (str, int, float)) else repr(v) for k, v in s.items()}
                    for name, s in SCHEMES.items()},
        "backbones": [{k: v for k, v in result.items() if k != "rows"} for result in results],
        "results": rows,
    }
    write_result(args.out, f"One projection of every selected conv against one training step ({where})", "projection",
                 [{"caption": caption, "columns": header, "rows": cells, "lines": [largest, *fastest]}],
                 data=payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
