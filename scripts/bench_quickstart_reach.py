"""The quickstart's request against what this CPU can reach: the allocation `lrl-train point=tucker2_faster` makes,
run on the machine at hand, beside the fastest allocation its layers allow.

The model and request come from the Hydra preset itself (ResNet-20 on 1×28×28, Tucker-2, `Budget(1.3,
metric="latency")` at batch 128, eager), with random weights: latency does not depend on the weight values. For
each of `--memory-formats` and each of `--runs` (a fresh latency cache each time, as on a new machine):

- reach: `Budget(1000, out_of_reach="closest")` with every selected layer at its fastest candidate, the whole model
  timed against dense (median of per-round ratios, interquartile range);
- request: the preset's budget as `lrl-train` allocates it, with its verdict ("met", "short": out of reach, the
  fastest allocation kept, "missed", "noisy"), measured speedup and MAC reduction;
- the seconds a fresh latency table took.

The CPU's model and instruction sets (AVX2, AVX-512, VNNI, AMX) head the table and go into the result file. Usage:

    python scripts/bench_quickstart_reach.py                       # channels_last (the default) and contiguous
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_quickstart_reach.py --runs 5 --memory-formats channels_last
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
import warnings
from dataclasses import replace
from datetime import date

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lrlightning import LowRankOptions, count_macs, factorize_planned
from lrlightning.speed.allocator import retain_freed_memory
from lrlightning.app.cli import CONF_DIR
from lrlightning.app.provenance import publish_table
from lrlightning.speed.cpu import cpu_features, cpu_model, features_text, int8_path
from lrlightning.app.ranks import with_budget_defaults
from lrlightning.plan import allocate_plan
from lrlightning.speed.serving import MEMORY_FORMATS
from lrlightning.zoo import build_backbone

INPUT_SHAPE = (1, 28, 28)  # Fashion-MNIST, the quickstart's data


def preset_rule(overrides: list[str]):
    """The quickstart point's ``Budget``, as ``lrl-train point=tucker2_faster`` builds it for 1×28×28 inputs."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["point=tucker2_faster", *overrides])
    rank = {**OmegaConf.to_container(cfg.lowrank.rank, resolve=True), "input_shape": list(INPUT_SHAPE)}
    return cfg, instantiate(with_budget_defaults({"rank": rank}, None, cfg.latency_batch_sizes)["rank"], _convert_="all")


def allocation_row(model: torch.nn.Module, options: LowRankOptions) -> dict:
    """Allocate ``options`` on ``model``: its check, MAC reduction and seconds."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plans, _, allocation = allocate_plan(model, options, warn=False)
    seconds = time.perf_counter() - start
    small = factorize_planned(model, plans, options)
    return {"check": allocation.check, "seconds": seconds, "table": allocation.table,
            "mac_reduction": count_macs(model, INPUT_SHAPE) / count_macs(small, INPUT_SHAPE)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory-formats", nargs="+", default=list(MEMORY_FORMATS), choices=MEMORY_FORMATS)
    parser.add_argument("--runs", type=int, default=1, help="fresh allocations per memory format")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides of the quickstart config")
    parser.add_argument("--out", default=None,
                        help="result file (default results/speed/<date>-quickstart-reach-<cpu>.json)")
    args = parser.parse_args()
    cfg, rule = preset_rule(args.override)
    if cfg.get("retain_freed_memory"):
        retain_freed_memory()
    torch.manual_seed(0)
    model = build_backbone("resnet20", num_classes=10, in_channels=INPUT_SHAPE[0]).eval()
    scheme = cfg.lowrank.scheme
    features = features_text(cpu_features())
    print(f"CPU {cpu_model()} ({features}; int8 path {int8_path()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    rows, data = [], []
    for memory_format in args.memory_formats:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory() as cache:
                base = replace(rule, latency=replace(rule.latency, cache=cache, memory_format=memory_format))
                request = allocation_row(model, LowRankOptions(scheme, base))
                reach = allocation_row(model, LowRankOptions(scheme, replace(base, factor=1000.0,
                                                                              out_of_reach="closest")))
            asked, fastest = request["check"], reach["check"]
            rows.append([memory_format, str(run + 1), fastest.measured.text(suffix="x"), f"{rule.factor:g}x",
                         asked.verdict, asked.measured.text(suffix="x"), f"{request['mac_reduction']:.2f}x",
                         f"{request['seconds']:.0f} s"])
            data.append({"memory_format": memory_format, "run": run + 1, "reach": fastest.as_dict(),
                         "reach_mac_reduction": reach["mac_reduction"], "request": asked.as_dict(),
                         "request_mac_reduction": request["mac_reduction"], "fresh_allocation_seconds":
                         request["seconds"], "table": request["table"]})
            print(" | ".join(rows[-1]), flush=True)
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    out = args.out or f"results/speed/{date.today().isoformat()}-quickstart-reach-{slug}.json"
    columns = ["eager memory format", "run", "reachable speedup (fastest allocation)", "asked",
               "verdict", "measured speedup", "MAC reduction", "fresh allocation"]
    footnote = (f"ResNet-20 on {INPUT_SHAPE[0]}x{INPUT_SHAPE[1]}x{INPUT_SHAPE[2]}, {scheme}, batch "
                f"{rule.latency.batch_size}, eager serving form (BatchNorm folded), fresh latency cache per run; "
                f"speedups are medians of per-round ratios dense / factorized with their interquartile range. CPU: "
                f"{cpu_model()} ({features}), {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
                f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}.")
    publish_table(out, f"Reach of the quickstart's latency request on {cpu_model()}", "speed",
                  columns, rows, footnote, data=data)


if __name__ == "__main__":
    main()
