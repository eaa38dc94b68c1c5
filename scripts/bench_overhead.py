"""Training-time overhead of LowRankProjection: step time with and without the callback, side by side.

For every backbone and S_D (every_n_train_steps), Lightning fits of ``--steps`` optimizer steps on synthetic
CIFAR-size data run interleaved (dense, then each S_D, repeated ``--rounds`` times); the per-step time excludes
the first ``--skip`` steps. Periods longer than the run are reported amortized: the projection time measured
in the same run divided by S_D steps. Usage:

    python scripts/bench_overhead.py                      # ResNet-32 and ResNet-56, S_D 1, 10, 200
    python scripts/bench_overhead.py --backbones resnet20 --steps 12 --rounds 1 --out overhead.json
    python scripts/bench_overhead.py --drivers auto --objectives weight activation   # the projection objectives
    python scripts/bench_overhead.py --accelerator gpu --drivers exact gram auto --projection-devices same cpu
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lrlightning import LowRankProjection, Solver
from lrlightning.allocator import retain_freed_memory
from lrlightning.app.module import LitClassifier
from lrlightning.app.provenance import publish_table
from lrlightning.latency import synchronize


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


def step_seconds(backbone: str, loader: DataLoader, steps: int, skip: int, every: int | None, scheme: str,
                 driver: str = "auto", accelerator: str = "cpu", objective: str = "weight",
                 projection_device: str | None = None) -> tuple[float, float]:
    """(median step seconds, mean projection seconds) of one fit (``every`` None: no callback); a projection's
    time is that of the callback's whole batch-end hook at a projection step (input statistics included)."""
    torch.manual_seed(0)
    model = LitClassifier(backbone, num_classes=10, in_channels=3, lr=0.05)
    timer = StepTimer()
    callbacks = [timer]
    projection = None
    if every is not None:
        projection = LowRankProjection(scheme, 0.5, every_n_train_steps=every, final_projection=False,
                                       validate_projected=False, objective=objective,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet32", "resnet56"])
    parser.add_argument("--periods", nargs="+", type=int, default=[1, 10, 200])
    parser.add_argument("--scheme", default="tucker2")
    parser.add_argument("--drivers", nargs="+", default=["exact", "auto"], help="svd_driver values, side by side")
    parser.add_argument("--objectives", nargs="+", default=["weight"], choices=["weight", "activation"],
                        help="projection objectives, side by side")
    parser.add_argument("--projection-devices", nargs="+", default=["same"],
                        help="projection_device values side by side ('same': the weights' device, or e.g. cpu)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="keep freed CPU memory in the process (lrlightning.allocator), as lrl-train does")
    parser.add_argument("--out", default="results/overhead/bench_overhead.json", help="result file (see docs/results.md)")
    args = parser.parse_args()
    retained = args.retain_freed_memory and retain_freed_memory()

    generator = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator))
    loader = DataLoader(data, batch_size=args.batch_size)
    rows, results = [], []
    for backbone in args.backbones:
        direct = [p for p in args.periods if p <= args.steps - args.skip]
        settings = [(driver, objective, where) for where in args.projection_devices for objective in args.objectives
                    for driver in args.drivers]
        variants = [(None, None, None, None), *((period, *setting) for setting in settings for period in direct)]
        samples = {variant: [] for variant in variants}
        projections = {setting: [] for setting in settings}
        for _ in range(args.rounds):
            for period, driver, objective, where in variants:
                seconds, projection = step_seconds(backbone, loader, args.steps, args.skip, period, args.scheme,
                                                   driver or "auto", args.accelerator, objective or "weight",
                                                   None if where in (None, "same") else where)
                samples[period, driver, objective, where].append(seconds)
                if projection:
                    projections[driver, objective, where].append(projection)
        dense = statistics.median(samples[None, None, None, None])
        for driver, objective, where in settings:
            projection = statistics.median(projections[driver, objective, where])
            for period in args.periods:
                if (period, driver, objective, where) in samples:
                    ratio, how = statistics.median(samples[period, driver, objective, where]) / dense, "measured"
                else:
                    ratio, how = 1.0 + projection / (period * dense), "amortized"
                results.append({"backbone": backbone, "scheme": args.scheme, "svd_driver": driver,
                                "objective": objective, "projection_device": where,
                                "every_n_train_steps": period, "dense_step_s": dense,
                                "projection_s": projection, "overhead": ratio - 1.0, "step_ratio": ratio,
                                "how": how})
                rows.append([backbone, driver, objective, where, str(period), f"{dense * 1000:.0f}",
                             f"{projection * 1000:.1f}", f"{(ratio - 1.0) * 100:.2f}%", f"x{ratio:.3f}", how])
    columns = ["backbone", "svd_driver", "objective", "projection_device", "S_D", "dense step ms", "projection ms",
               "overhead", "step", "how"]
    machine = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU threads {torch.get_num_threads()}"
    machine += ", freed memory retained" if retained else ""
    footnote = (f"({args.scheme}, rank 0.5, batch {args.batch_size}, {machine}; step: time of a step with the "
                f"callback / dense, a projection timed with its input statistics; targets: x1.15 at S_D=1, < 1% at "
                f"S_D=200, < 2% with objective=activation)")
    title = f"Training overhead of the callback, {args.scheme} ({machine})"
    publish_table(args.out, title, "overhead", columns, rows, footnote,
                  results)


if __name__ == "__main__":
    main()
