"""Budgets that ask for speed: the speedup a budget asked for against the speedup the exported model measures.

For each backbone, a ``budget_metric="latency"`` budget of ``--speedups`` is allocated from a latency table measured
on this machine (cached; the first allocation times every candidate), the weights are projected at the allocated
ranks, the model is factorized, and dense and factorized are timed interleaved at the table's batch size. A MAC
budget of ``--mac-budgets`` is measured the same way at ``--rank-multiples``, to show what rounding ranks to
multiples buys. Targets: the measured speedup within 10 % of the one asked for, and never below 1 (no slower than
dense). Usage:

    python scripts/bench_latency_budget.py                                   # ResNet-20 on 1x28x28 (Fashion-MNIST)
    python scripts/bench_latency_budget.py --backbones resnet18 --image-size 224 --in-channels 3 --batch-size 1
"""
from __future__ import annotations

import argparse
import copy
import re
import time
import warnings

import torch

from lrlightning import Budget, LowRankOptions, count_macs, factorize_planned
from lrlightning.allocator import retain_freed_memory
from lrlightning.app.provenance import publish_table
from lrlightning.backbones import build_backbone
from lrlightning.timing import time_interleaved
from lrlightning.plan import allocate_plan
from lrlightning.projection import project_planned_
from lrlightning.summary import format_table


def exported(model: torch.nn.Module, options: LowRankOptions) -> tuple[torch.nn.Module, dict, float]:
    """(factorized model, allocation, allocation seconds): allocate, project at those ranks, factorize."""
    start = time.perf_counter()
    plans, _, allocation = allocate_plan(model, options, warn=False)
    seconds = time.perf_counter() - start
    projected = copy.deepcopy(model)
    project_planned_(projected, plans, options)
    return factorize_planned(projected, plans, options).eval(), allocation, seconds


def refusal(message: str) -> str:
    """The reachable maximum an out-of-reach budget's error names, e.g. "refused: at most 1.19x faster"."""
    found = re.search(r"at most (\d+\.\d+x [a-z ]+)", message)
    return f"refused: at most {found.group(1).strip()}" if found else message


def measured_speedup(dense: torch.nn.Module, small: torch.nn.Module, shape: tuple[int, ...], batch: int,
                     rounds: int) -> tuple[float, float]:
    """(dense ms, factorized ms) as the allocation models them (BatchNorm not folded), medians of interleaved
    rounds (at least ``rounds``)."""
    example = torch.randn(batch, *shape)
    return tuple(t.median for t in time_interleaved([dense, small], example, rounds=rounds, round_seconds=0.2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet20"])
    parser.add_argument("--schemes", nargs="+", default=["tucker2", "svd"])
    parser.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0])
    parser.add_argument("--mac-budgets", nargs="*", type=float, default=[3.0])
    parser.add_argument("--rank-multiples", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the final measurement")
    parser.add_argument("--cache", default=None, help="latency cache dir (default: $LRLIGHTNING_CACHE or "
                        "~/.cache/lrlightning)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="keep freed CPU memory in the process (lrlightning.allocator.retain_freed_memory)")
    parser.add_argument("--out", default="results/budget/bench_latency_budget.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    retained = args.retain_freed_memory and retain_freed_memory()
    shape = (args.in_channels, args.image_size, args.image_size)
    latency = dict(latency_batch_size=args.batch_size, latency_device="cpu", latency_cache=args.cache)

    rows, data = [], []
    for backbone in args.backbones:
        torch.manual_seed(0)
        dense = build_backbone(backbone, num_classes=10, in_channels=args.in_channels).eval()
        macs = count_macs(dense, shape)
        for scheme in args.schemes:
            asks = [("latency", budget, 8) for budget in args.speedups]
            asks += [("macs", budget, multiple) for budget in args.mac_budgets for multiple in args.rank_multiples]
            for metric, budget, multiple in asks:
                options = LowRankOptions(scheme, Budget(budget, metric=metric, input_shape=shape,
                                                        rank_multiple=multiple, **latency))
                try:
                    small, allocation, seconds = exported(dense, options)
                except ValueError as error:
                    rows.append([backbone, scheme, f"{budget:g}x {metric}", str(multiple), "-", "-", "-", "-", "-",
                                 refusal(str(error))])
                    data.append({"backbone": backbone, "scheme": scheme, "metric": metric, "budget": budget,
                                 "rank_multiple": multiple, "error": str(error)})
                    continue
                dense_ms, small_ms = measured_speedup(dense, small, shape, args.batch_size, args.rounds)
                speedup, mac_reduction = dense_ms / small_ms, macs / count_macs(small, shape)
                layers = sum(rank is not None for rank in allocation.ranks.values())
                rows.append([backbone, scheme, f"{budget:g}x {metric}", str(multiple), f"{allocation.achieved:.2f}x",
                             f"{mac_reduction:.2f}x", f"{dense_ms:.2f}/{small_ms:.2f}", f"{speedup:.2f}x",
                             f"{speedup / mac_reduction:.2f}", f"{layers} layers, {seconds:.0f} s"])
                data.append({"backbone": backbone, "scheme": scheme, "metric": metric, "budget": budget,
                             "rank_multiple": multiple, "allocated": allocation.achieved, "mac_reduction": mac_reduction,
                             "dense_ms": dense_ms, "factorized_ms": small_ms, "speedup": speedup,
                             "layers_factorized": layers, "allocation_seconds": seconds,
                             "ranks": {k: v for k, v in allocation.ranks.items() if v is not None}})
                print(format_table(["backbone", "scheme", "asked", "multiple"], [rows[-1][:4]]), flush=True)
    columns = ["backbone", "scheme", "asked", "rank multiple", "allocated", "MAC reduction", "ms dense/fact",
               "measured speedup", "speedup / MACs", "layers factorized, allocation time"]
    memory = "freed memory retained" if retained else "glibc's default allocator"
    footnote = (f"(inputs {shape}, batch {args.batch_size}, CPU threads {torch.get_num_threads()}, {memory}; random "
                f"initialization; latency tables measured per layer in this run or read from the cache; dense and "
                f"factorized timed interleaved as allocated (BatchNorm unfolded), fastest of {args.rounds} rounds; targets: measured "
                "speedup within 10 % of a latency budget and never below 1)")
    publish_table(args.out, f"Latency budgets: asked against measured speedup ({', '.join(args.backbones)}, CPU)",
                  "budget", columns, rows, footnote, data)


if __name__ == "__main__":
    main()
