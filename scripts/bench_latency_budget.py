"""Budgets that ask for speed: the speedup a budget asked for against the speedup the exported model measures.

For each backbone, a ``budget_metric="latency"`` budget of ``--speedups`` is allocated from a latency table measured
on this machine at each of ``--batch-sizes`` (cached; the first allocation times every candidate; with several, the
allocation must meet the budget at each), the weights are projected at the allocated ranks, the model is factorized,
and dense and factorized are timed interleaved at each of ``--measure-batch-sizes`` (default: ``--batch-sizes``) in
each of ``--modes``: ``eager`` (torch, as allocated:
BatchNorm unfolded) and ``onnxruntime`` (both models exported to ONNX once, with a dynamic batch, and run in an
onnxruntime CPU session that does not spin-wait; needs the ``onnx`` extra) and ``onnxruntime-int8`` (the factorized
model as the int8 file ``lrl-train deploy=int8`` ships, against dense fp32; with ``--latency-precision int8`` the
budget is allocated for exactly that). Each measured speedup is the median of
per-round ratios dense / factorized (rounds interleaved, which model goes first alternating), with its interquartile
range. A MAC budget of ``--mac-budgets`` is measured the same way at ``--rank-multiples``, to show what rounding ranks
to multiples buys. ``resnet18``/``resnet50``/``mobilenet_v2`` run at 3×224×224 with 1000 classes, the others at
``--in-channels``×``--image-size``² with 10 classes. Targets: the measured speedup within 10 % of the one asked for,
and never below 1 (no slower than dense). Usage:

    python scripts/bench_latency_budget.py                                   # ResNet-20 on 1x28x28 (Fashion-MNIST)
    python scripts/bench_latency_budget.py --backbones resnet18 --image-size 224 --in-channels 3 --batch-sizes 1
    python scripts/bench_latency_budget.py --schemes tucker2 --speedups 1.3 --mac-budgets --batch-sizes 1 128
    python scripts/bench_latency_budget.py --backbones resnet50 mobilenet_v2 --batch-sizes 1 --speedups 1.5 \\
        --mac-budgets --measure-batch-sizes 1 32 --modes eager onnxruntime --cache /tmp/lrl-cache
    python scripts/bench_latency_budget.py --backbones resnet18 --schemes svd --speedups 2 --mac-budgets \
        --batch-sizes 1 --latency-backend onnxruntime --modes onnxruntime     # a budget allocated in ONNX Runtime
    python scripts/bench_latency_budget.py --backbones resnet18 --schemes svd --speedups 3 --mac-budgets \
        --latency-backend onnxruntime --latency-precision int8 --modes onnxruntime-int8   # ranks and int8 together
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable

import torch

from lrlightning import Budget, Latency, LowRankOptions, count_macs, factorize_planned
from lrlightning.speed.allocator import retain_freed_memory
from lrlightning.app.provenance import publish_table
from lrlightning.plan import allocate_plan
from lrlightning.projection import project_planned_
from lrlightning.training.summary import format_table
from lrlightning.speed.timing import Spread, interleaved_samples, paired_ratios

from bench_common import input_shape, onnx_runner, refusal, seeded_backbone, wait_policy

MODES = ("eager", "onnxruntime", "onnxruntime-int8")


def exported(model: torch.nn.Module, options: LowRankOptions) -> tuple[torch.nn.Module, dict, float]:
    """(factorized model, allocation, allocation seconds): allocate, project at those ranks, factorize."""
    start = time.perf_counter()
    plans, _, allocation = allocate_plan(model, options, warn=False)
    seconds = time.perf_counter() - start
    projected = copy.deepcopy(model)
    project_planned_(projected, plans, options)
    return factorize_planned(projected, plans, options).eval(), allocation, seconds


def runners(mode: str, dense: torch.nn.Module, small: torch.nn.Module, shape: tuple[int, ...]
            ) -> tuple[Callable[[torch.Tensor], object], Callable[[torch.Tensor], object]]:
    """For ``mode``, (dense, factorized) called like modules on a batch: the models themselves (eager), or both
    exported to ONNX once, with a dynamic batch, in onnxruntime CPU sessions (``bench_common.onnx_runner``)."""
    if mode == "eager":
        return dense, small
    example = torch.randn(2, *shape)
    if mode == "onnxruntime-int8":  # the factorized model as the int8 file that ships, against dense fp32
        return onnx_runner(dense, example, dynamic_batch=True), int8_runner(small, shape)
    return onnx_runner(dense, example, dynamic_batch=True), onnx_runner(small, example, dynamic_batch=True)


def int8_runner(model: torch.nn.Module, shape: tuple[int, ...]) -> Callable[[torch.Tensor], object]:
    """``model`` exported (``export_onnx``) and quantized as ``lrl-train deploy=int8`` does (``quantize_int8``,
    ``Int8Config()``, calibrated on 4 random batches of 8), in an ONNX Runtime CPU session."""
    import tempfile
    from pathlib import Path

    from lrlightning.deploy.int8 import quantize_int8
    from lrlightning.deploy.onnx import SessionModule, export_onnx, session

    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(model, torch.randn(4, *shape), Path(folder) / "m.onnx")
        int8 = quantize_int8(fp32.path, Path(folder) / "m.int8.onnx", [torch.randn(8, *shape) for _ in range(4)],
                             {"cache": CACHE[0]})
        return SessionModule(session(Path(int8.path).read_bytes()))


CACHE = [None]  # the --cache directory, for the int8 file's per-layer timings


def paired_times(dense: Callable[[torch.Tensor], object], small: Callable[[torch.Tensor], object], x: torch.Tensor,
                 rounds: int, round_seconds: float = 0.2) -> tuple[Spread, Spread, Spread]:
    """(dense ms, factorized ms, speedup dense / factorized) on ``x`` over ``rounds`` interleaved rounds, each
    timing both over as many passes as the faster one runs in about ``round_seconds`` (at least one), which goes
    first alternating round by round (``lrlightning.speed.timing.interleaved_samples``). Speedup: per-round ratios
    (``paired_ratios``)."""
    dense_ms, small_ms = interleaved_samples([dense, small], x, rounds, round_seconds, rounds)
    return Spread.of(dense_ms), Spread.of(small_ms), paired_ratios(dense_ms, small_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet20"])
    parser.add_argument("--schemes", nargs="+", default=["tucker2", "svd"])
    parser.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0])
    parser.add_argument("--mac-budgets", nargs="*", type=float, default=[3.0])
    parser.add_argument("--rank-multiples", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--in-channels", type=int, default=1, help="image channels of the non-ImageNet backbones")
    parser.add_argument("--image-size", type=int, default=None,
                        help="height = width (default 28; the ImageNet backbones 224 unless given)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32],
                        help="the batch sizes a latency budget is allocated for (Latency.batch_sizes)")
    parser.add_argument("--measure-batch-sizes", nargs="+", type=int, default=None,
                        help="batches the exported models are timed at (default: --batch-sizes)")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=MODES)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the final measurement")
    parser.add_argument("--large-batch-rounds", type=int, default=None,
                        help="rounds at measured batches >= 8 (default: --rounds)")
    parser.add_argument("--latency-precision", choices=("fp32", "int8"), default="fp32",
                        help="Latency.precision of the budgets (int8 needs --latency-backend onnxruntime)")
    parser.add_argument("--latency-backend", choices=("eager", "onnxruntime"), default="eager",
                        help="where the latency table times layers (Latency.backend; default: %(default)s)")
    parser.add_argument("--cache", default=None, help="latency cache dir (default: $LRLIGHTNING_CACHE or "
                        "~/.cache/lrlightning)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="keep freed CPU memory in the process (lrlightning.speed.allocator.retain_freed_memory)")
    parser.add_argument("--out", default="results/budget/bench_latency_budget.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    retained = args.retain_freed_memory and retain_freed_memory()
    latency = dict(latency=Latency(batch_sizes=tuple(args.batch_sizes), device="cpu", cache=args.cache,
                                   backend=args.latency_backend, precision=args.latency_precision))
    CACHE[0] = args.cache
    batches = sorted(set(args.measure_batch_sizes or args.batch_sizes))
    modes = list(dict.fromkeys(args.modes))

    rows, data, shapes = [], [], {}
    for backbone in args.backbones:
        shape = shapes[backbone] = input_shape(backbone, args.in_channels, args.image_size, default_size=28)
        dense = seeded_backbone(backbone, shape)
        macs = count_macs(dense, shape)
        examples = {batch: torch.randn(batch, *shape) for batch in batches}
        for scheme in args.schemes:
            asks = [("latency", budget, 8) for budget in args.speedups]
            asks += [("macs", budget, multiple) for budget in args.mac_budgets for multiple in args.rank_multiples]
            for metric, budget, multiple in asks:
                print(f"{backbone} {shape} {scheme} {budget:g}x {metric} (rank multiple {multiple}) ...",
                      file=sys.stderr, flush=True)
                options = LowRankOptions(scheme, Budget(budget, metric=metric, input_shape=shape,
                                                        rank_multiple=multiple, **latency))
                entry = {"backbone": backbone, "input_shape": list(shape), "scheme": scheme, "metric": metric,
                         "budget": budget, "rank_multiple": multiple, "latency_batch_sizes": args.batch_sizes,
                         "latency_backend": args.latency_backend, "latency_precision": args.latency_precision}
                try:
                    small, allocation, seconds = exported(dense, options)
                except ValueError as error:
                    rows.append([backbone, scheme, f"{budget:g}x {metric}", str(multiple), "-", "-", "-", "-", "-",
                                 "-", "-", refusal(str(error))])
                    data.append({**entry, "error": str(error)})
                    print(f"  {refusal(str(error))}", file=sys.stderr, flush=True)
                    continue
                mac_reduction = macs / count_macs(small, shape)
                layers = sum(rank is not None for rank in allocation.ranks.values())
                check = allocation.check.as_dict() if allocation.check is not None else None
                checked = (f"{allocation.check.measured.median:.2f}x {allocation.check.verdict}"
                           if allocation.check is not None else "-")
                measurements = []
                for mode in modes:
                    dense_runner, small_runner = runners(mode, dense, small, shape)
                    for batch in batches:
                        rounds = args.large_batch_rounds if batch >= 8 and args.large_batch_rounds else args.rounds
                        dense_ms, small_ms, speedup = paired_times(dense_runner, small_runner, examples[batch],
                                                                   rounds)
                        measurements.append({"mode": mode, "batch_size": batch, "rounds": rounds,
                                             "dense_ms": dense_ms.as_dict(), "factorized_ms": small_ms.as_dict(),
                                             "speedup": speedup.as_dict(),
                                             "not_slower_than_dense": speedup.median >= 1.0,
                                             "within_10_percent": (abs(speedup.median / budget - 1) <= 0.1
                                                                   if metric == "latency" else None)})
                        rows.append([backbone, scheme, f"{budget:g}x {metric}", str(multiple),
                                     f"{allocation.achieved:.2f}x", checked, f"{mac_reduction:.2f}x", mode, str(batch),
                                     f"{dense_ms.median:.2f}/{small_ms.median:.2f}",
                                     f"{speedup.median:.2f}x ({speedup.low:.2f}-{speedup.high:.2f})",
                                     f"{layers} layers, {seconds:.0f} s"])
                        print(format_table(["backbone", "scheme", "asked", "mode", "batch", "ms", "speedup"],
                                           [[*rows[-1][:3], mode, str(batch), rows[-1][9], rows[-1][10]]]),
                              file=sys.stderr, flush=True)
                    del dense_runner, small_runner
                data.append({**entry, "allocated": allocation.achieved, "allocation_check": check,
                             "latency_table": allocation.table, "mac_reduction": mac_reduction,
                             "layers_factorized": layers, "allocation_seconds": seconds,
                             "measurements": measurements,
                             "ranks": {k: v for k, v in allocation.ranks.items() if v is not None}})
    columns = ["backbone", "scheme", "asked", "rank multiple", "allocated", "checked at allocation", "MAC reduction",
               "mode", "batch", "ms dense/fact", "measured speedup (IQR)", "layers factorized, allocation time"]
    memory = "freed memory retained" if retained else "glibc's default allocator"
    inputs = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    footnote = "(" + "; ".join([
        f"inputs {inputs}",
        f"latency table ({args.latency_backend}) and allocation at batch {', '.join(map(str, args.batch_sizes))}",
        f"CPU threads {torch.get_num_threads()}, {memory}{wait_policy()}",
        "random initialization",
        "latency tables measured per layer in this run or read from the cache",
        "checked at allocation: the library's own whole-model timing of the allocation and its verdict",
        "measured: dense and factorized timed interleaved after export, eager as allocated (BatchNorm unfolded), "
        "onnxruntime on the exported ONNX graphs (CPU provider)",
        f"median of per-round ratios over {args.rounds} rounds ({args.large_batch_rounds or args.rounds} at batch "
        ">= 8) with the interquartile range",
        "targets: measured speedup within 10 % of a latency budget and never below 1",
    ]) + ")"
    publish_table(args.out, f"Latency budgets: asked against measured speedup ({', '.join(args.backbones)}, CPU)",
                  "budget", columns, rows, footnote, data)


if __name__ == "__main__":
    main()
