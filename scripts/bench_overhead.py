"""Training-time overhead of LowRankProjection: step time with and without the callback, side by side.

For every backbone and S_D (every_n_train_steps), Lightning fits of ``--steps`` optimizer steps on synthetic
CIFAR-size data run interleaved (dense, then each S_D, repeated ``--rounds`` times); the per-step time excludes
the first ``--skip`` steps. Periods longer than the run are reported amortized: the projection time measured
in the same run divided by S_D steps. ``--image-size``/``--num-classes`` set the synthetic data (default CIFAR size, 10 classes; e.g.
224 and 1000 for ``resnet50``); the table also gives a projection in training steps (projection s / dense step s).
``--statistics-bytes`` reports, per scheme, the memory of the input statistics an ``Activation`` objective gathers
(the ``moment_sum`` of every planned layer, ``lrlightning.projection.gather_statistics``); ``--profile`` times one
projection (``project_planned_``) group by group outside the fit, to show where its time goes. Usage:

    python scripts/bench_overhead.py                      # ResNet-32 and ResNet-56, S_D 1, 10, 200
    python scripts/bench_overhead.py --backbones resnet50 --image-size 224 --num-classes 1000 --batch-size 32 \
        --schemes svd tucker2 --periods 3 --steps 6 --skip 2 --rounds 1 --drivers auto --statistics-bytes --profile
    python scripts/bench_overhead.py --backbones resnet20 --steps 12 --rounds 1 --out overhead.json
    python scripts/bench_overhead.py --drivers auto --objectives weight activation activation-passes   # objectives
    python scripts/bench_overhead.py --accelerator gpu --drivers exact gram auto --projection-devices same cpu
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lrlightning import Activation, LowRankOptions, LowRankProjection, Solver, gather_statistics, plan_layers
from lrlightning.speed.allocator import retain_freed_memory
from lrlightning.app.module import LitClassifier
from lrlightning.app.provenance import publish_table
from lrlightning.speed.latency import synchronize
from lrlightning.projection import project_planned_
from lrlightning.zoo import build_backbone

from bench_common import wait_policy


class StepTimer(L.Callback):
    """Wall time of each training batch, from its start to the end of every callback's batch-end hook."""

    def __init__(self):
        self.times = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        synchronize(pl_module.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize(pl_module.device)
        self.times.append(time.perf_counter() - self.start)


OBJECTIVES = {"weight": "weight", "activation": Activation(),  # statistics recorded on the training passes
              "activation-passes": Activation(observe_training=False)}  # on separate passes before each projection


def step_seconds(backbone: str, loader: DataLoader, steps: int, skip: int, every: int | None, scheme: str,
                 driver: str = "auto", accelerator: str = "cpu", objective: str = "weight",
                 projection_device: str | None = None, num_classes: int = 10) -> tuple[float, float]:
    """(median step seconds, mean projection seconds) of one fit (``every`` None: no callback); a projection's
    time is that of the callback's whole batch-end hook at a projection step (input statistics included)."""
    torch.manual_seed(0)
    model = LitClassifier(backbone, num_classes=num_classes, in_channels=3, lr=0.05)
    timer = StepTimer()
    callbacks = [timer]
    projection = None
    if every is not None:
        projection = LowRankProjection(scheme, 0.5, every_n_train_steps=every, final_projection=False,
                                       validate_projected=False, objective=OBJECTIVES[objective],
                                       solver=Solver(driver=driver, device=projection_device))
        callbacks.insert(0, projection)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, accelerator=accelerator, devices=1, callbacks=callbacks)
    projection_times = []
    if projection is not None:
        original = projection.on_train_batch_end

        def timed(trainer, pl_module, *args, **kwargs):
            synchronize(pl_module.device)
            start, before = time.perf_counter(), projection.num_projections
            original(trainer, pl_module, *args, **kwargs)
            synchronize(pl_module.device)
            if projection.num_projections > before:
                projection_times.append(time.perf_counter() - start)

        projection.on_train_batch_end = timed
    trainer.fit(model, loader)
    mean_projection = statistics.fmean(projection_times) if projection_times else 0.0
    return statistics.median(timer.times[skip:]), mean_projection


def statistics_bytes(backbone: str, scheme: str, num_classes: int, size: int, batch: int) -> dict:
    """Bytes of the input statistics ``objective=Activation()`` gathers for ``scheme`` at rank 0.5: the
    ``moment_sum`` of every planned layer (float64; its size does not depend on the batch), and all their tensors."""
    torch.manual_seed(0)
    model = build_backbone(backbone, num_classes=num_classes, in_channels=3)
    options = LowRankOptions(scheme, 0.5, Activation())
    plans = plan_layers(model, options, warn=False)[0]
    start = time.perf_counter()
    gathered = gather_statistics(model, plans, options, [torch.randn(batch, 3, size, size)])
    seconds = time.perf_counter() - start
    moments = {name: s.moment_sum.numel() * s.moment_sum.element_size() for name, s in gathered.items()}
    total = sum(t.numel() * t.element_size() for s in gathered.values()
                for t in (*s.tensors(), *([s.output_scale] if s.output_scale is not None else [])))
    largest = max(moments, key=moments.get)
    return {"backbone": backbone, "scheme": scheme, "layers": len(plans), "moment_sum_bytes": sum(moments.values()),
            "all_statistics_bytes": total, "largest_layer": largest, "largest_layer_bytes": moments[largest],
            "gather_seconds_one_batch": seconds, "gather_batch_size": batch,
            "per_layer_moment_sum_bytes": moments}


def profile_projection(backbone: str, scheme: str, num_classes: int, driver: str, repeats: int = 2) -> dict:
    """Seconds of one projection (``project_planned_``, rank 0.5, weight objective) of all planned layers, and of
    each group of layers that share one batched decomposition (scheme, weight shape, groups), best of ``repeats``."""
    torch.manual_seed(0)
    model = build_backbone(backbone, num_classes=num_classes, in_channels=3)
    options = LowRankOptions(scheme, 0.5, solver=Solver(driver=driver))
    plans = plan_layers(model, options, warn=False)[0]
    groups = defaultdict(list)
    for plan in plans:
        groups[(plan.scheme, plan.shape, plan.groups)].append(plan)

    def best(chosen) -> float:
        times = []
        for _ in range(repeats):
            copied = copy.deepcopy(model)
            start = time.perf_counter()
            project_planned_(copied, chosen, options)
            times.append(time.perf_counter() - start)
        return min(times)

    whole = best(plans)
    rows = [{"scheme": key[0], "shape": list(key[1]), "groups": key[2], "layers": len(group),
             "ranks": sorted({str(p.rank) for p in group}), "seconds": best(group)} for key, group in groups.items()]
    rows.sort(key=lambda row: -row["seconds"])
    return {"backbone": backbone, "scheme": scheme, "driver": driver, "layers": len(plans), "seconds": whole,
            "groups": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet32", "resnet56"])
    parser.add_argument("--periods", nargs="+", type=int, default=[1, 10, 200])
    parser.add_argument("--schemes", "--scheme", nargs="+", default=["tucker2"], help="schemes, side by side")
    parser.add_argument("--drivers", nargs="+", default=["exact", "auto"], help="svd_driver values, side by side")
    parser.add_argument("--objectives", nargs="+", default=["weight"], choices=list(OBJECTIVES),
                        help="projection objectives, side by side")
    parser.add_argument("--projection-devices", nargs="+", default=["same"],
                        help="projection_device values side by side ('same': the weights' device, or e.g. cpu)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32, help="height = width of the synthetic images")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--statistics-bytes", action="store_true",
                        help="also report the memory of the input statistics of objective=Activation() per scheme")
    parser.add_argument("--profile", action="store_true",
                        help="also time one projection group by group (outside the fit), per scheme and driver")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="keep freed CPU memory in the process (lrlightning.speed.allocator), as lrl-train does")
    parser.add_argument("--out", default="results/overhead/bench_overhead.json", help="result file (see docs/results.md)")
    args = parser.parse_args()
    retained = args.retain_freed_memory and retain_freed_memory()

    generator = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    size = args.image_size
    data = TensorDataset(torch.randn(n, 3, size, size, generator=generator), torch.randint(0, args.num_classes, (n,), generator=generator))
    loader = DataLoader(data, batch_size=args.batch_size)
    rows, results = [], []
    for backbone in args.backbones:
        direct = [p for p in args.periods if p <= args.steps - args.skip]
        settings = [(scheme, driver, objective, where) for scheme in args.schemes for where in args.projection_devices
                    for objective in args.objectives for driver in args.drivers]
        variants = [(None, None, None, None, None), *((period, *setting) for setting in settings for period in direct)]
        samples = {variant: [] for variant in variants}
        projections = {setting: [] for setting in settings}
        for _ in range(args.rounds):
            for period, scheme, driver, objective, where in variants:
                print(f"{backbone} S_D={period} {scheme} {driver} {objective} {where} ...", flush=True)
                seconds, projection = step_seconds(backbone, loader, args.steps, args.skip, period, scheme,
                                                   driver or "auto", args.accelerator, objective or "weight",
                                                   None if where in (None, "same") else where, args.num_classes)
                samples[period, scheme, driver, objective, where].append(seconds)
                if projection:
                    projections[scheme, driver, objective, where].append(projection)
        dense = statistics.median(samples[None, None, None, None, None])
        for scheme, driver, objective, where in settings:
            projection = statistics.median(projections[scheme, driver, objective, where])
            for period in args.periods:
                if (period, scheme, driver, objective, where) in samples:
                    ratio, how = statistics.median(samples[period, scheme, driver, objective, where]) / dense, "measured"
                else:
                    ratio, how = 1.0 + projection / (period * dense), "amortized"
                results.append({"backbone": backbone, "image_size": size, "batch_size": args.batch_size,
                                "num_classes": args.num_classes, "scheme": scheme, "svd_driver": driver,
                                "objective": objective, "projection_device": where,
                                "every_n_train_steps": period, "dense_step_s": dense,
                                "projection_s": projection, "projection_in_steps": projection / dense,
                                "dense_step_samples_s": samples[None, None, None, None, None],
                                "projection_samples_s": projections[scheme, driver, objective, where],
                                "overhead": ratio - 1.0, "step_ratio": ratio, "how": how})
                rows.append([backbone, scheme, driver, objective, where, str(period), f"{dense * 1000:.0f}",
                             f"{projection * 1000:.1f}", f"{projection / dense:.2f}", f"{(ratio - 1.0) * 100:.2f}%",
                             f"x{ratio:.3f}", how])
    columns = ["backbone", "scheme", "svd_driver", "objective", "projection_device", "S_D", "dense step ms",
               "projection ms", "projection / step", "overhead", "step", "how"]
    extra = {}
    if args.statistics_bytes:
        extra["statistics_bytes"] = [statistics_bytes(backbone, scheme, args.num_classes, size, 2)
                                     for backbone in args.backbones for scheme in args.schemes]
        for entry in extra["statistics_bytes"]:
            print(f"{entry['backbone']} {entry['scheme']}: objective=Activation() input statistics "
                  f"{entry['moment_sum_bytes'] / 1e6:.1f} MB of moment_sum over {entry['layers']} layers "
                  f"({entry['all_statistics_bytes'] / 1e6:.1f} MB with row sums and scales; largest "
                  f"{entry['largest_layer']} {entry['largest_layer_bytes'] / 1e6:.1f} MB)", flush=True)
    if args.profile:
        extra["profile"] = [profile_projection(backbone, scheme, args.num_classes, driver)
                            for backbone in args.backbones for scheme in args.schemes for driver in args.drivers]
        for entry in extra["profile"]:
            print(f"{entry['backbone']} {entry['scheme']} {entry['driver']}: one projection of {entry['layers']} "
                  f"layers {entry['seconds']:.2f} s; groups (slowest first):", flush=True)
            for group in entry["groups"]:
                print(f"  {group['scheme']} {tuple(group['shape'])} g{group['groups']} x{group['layers']} ranks "
                      f"{','.join(group['ranks'])}: {group['seconds'] * 1000:.0f} ms", flush=True)
    machine = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU threads {torch.get_num_threads()}"
    machine += ", freed memory retained" if retained else ""
    machine += wait_policy()
    footnote = (f"(rank 0.5, batch {args.batch_size}, {size}x{size} synthetic images, {machine}; step: time of a "
                f"step with the callback / dense, a projection timed with its input statistics; projection / step: "
                f"one projection in dense training steps; targets: x1.15 at S_D=1, < 1% at S_D=200, < 2% with "
                f"objective=activation)")
    title = f"Training overhead of the callback, {', '.join(args.schemes)} ({machine})"
    publish_table(args.out, title, "overhead", columns, rows, footnote,
                  {"runs": results, **extra} if extra else results)


if __name__ == "__main__":
    main()
