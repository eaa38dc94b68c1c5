"""Speed of factorized models against the dense model, side by side in one run.

For each backbone, scheme and compression target, the ranks are resolved once (``plan_layers``), the dense
model's weights are projected at those ranks and the model is factorized at the same ranks, BatchNorm is folded
into the convs of both models, and each inference mode times dense and factorized passes alternating, at every
batch size. Reported per batch size: median ms of one pass, speedup (dense / factorized ms) and efficiency
(speedup / MAC reduction). The target is either a per-layer rule (``--ratios``: each layer that many times fewer
params) or a whole-model budget (``--budget`` with ``--budget-metric``, see ``LowRankOptions``). CIFAR backbones run
at 3×32×32 with 10 classes, ``resnet18``/``resnet50``/``mobilenet_v2`` at 3×224×224 with 1000 classes;
``--image-size`` overrides the size. Modes: eager, channels_last, jit (trace + freeze), compile (``torch.compile``, needs a C++ compiler on
the CPU) and onnxruntime (ONNX export, CPU provider, needs the ``onnx`` extra). Usage:

    python scripts/bench_speed.py                                   # ResNet-32, all schemes, 2× and 4× per layer
    python scripts/bench_speed.py --backbones resnet18 --budget 3 --budget-metric macs --schemes tucker2 \\
        --modes eager onnxruntime
    python scripts/bench_speed.py --backbones resnet20 resnet32 resnet18 resnet50 --schemes svd tucker2 \\
        --ratios 4 --batch-sizes 1 32 --repeats 10 --out /tmp/speed.json
    python scripts/bench_speed.py --backbones resnet50 mobilenet_v2 --schemes svd --budget 2 --budget-metric macs \\
        --modes eager onnxruntime --batch-sizes 1 32 --repeats 5
    python scripts/bench_speed.py --device cuda --modes eager channels_last    # GPU (jit, onnxruntime: CPU only)
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import statistics
import sys
import warnings
from collections.abc import Callable

import torch

from lrlightning import Budget, Compression, Latency, LowRankOptions, TiledSVD, count_macs, count_params, factorize_planned, plan_layers
from lrlightning.speed.allocator import retain_freed_memory
from lrlightning.app.provenance import publish_table
from lrlightning.deploy.onnx import EXTRA
from lrlightning.projection import project_planned_
from lrlightning.speed.serving import folded
from lrlightning.speed.timing import interleaved_samples
from lrlightning.zoo import BACKBONES

from bench_common import input_shape, onnx_runner, seeded_backbone, wait_policy

SCHEMES = {"svd": "svd", "tucker2": "tucker2", "spatial_svd": "spatial_svd", "tiled_svd": TiledSVD(tile_shape=(16, 16))}
MODES = ("eager", "channels_last", "jit", "compile", "onnxruntime")
BUDGET_METRICS = ("params", "macs", "latency")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def onnxruntime_missing() -> list[str]:
    """The packages of the ``onnx`` extra that the onnxruntime mode needs and that are not installed."""
    return [name for name in EXTRA if importlib.util.find_spec(name) is None]


def mode_input(mode: str, example: torch.Tensor) -> torch.Tensor:
    """``example`` as ``mode`` takes it: channels_last for channels_last and compile."""
    return example.to(memory_format=torch.channels_last) if mode in ("channels_last", "compile") else example


def prepare(mode: str, model: torch.nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """``model`` as ``mode`` runs it on ``example`` (``mode_input``): eager, channels_last, jit (trace + freeze),
    compile (``torch.compile`` of the channels_last model) or onnxruntime (exported for ``example``'s shape, in an
    ONNX Runtime CPU session whose threads do not spin-wait after a pass, so they leave the cores to the other model
    timed alternately; ``bench_common.onnx_runner``)."""
    if mode in ("channels_last", "compile"):
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if mode == "compile":
            model = torch.compile(model, dynamic=False)
    elif mode == "jit":
        with torch.no_grad():
            model = torch.jit.freeze(torch.jit.trace(model, example))
    elif mode == "onnxruntime":
        return onnx_runner(model, example)
    return model


def timed_pair(dense: Callable[[torch.Tensor], object], factorized: Callable[[torch.Tensor], object],
               x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median ms of one pass of ``dense`` and of ``factorized`` on ``x``: ``repeats`` rounds of one pass each,
    which goes first alternating so that machine noise hits both alike, after warm-up passes
    (``lrlightning.speed.timing.interleaved_samples``)."""
    dense_ms, factorized_ms = interleaved_samples([dense, factorized], x, repeats, 0.0, repeats)
    return statistics.median(dense_ms), statistics.median(factorized_ms)


def target_options(scheme: str, target: float, args: argparse.Namespace, shape: tuple[int, int, int]) -> LowRankOptions:
    """The rank rule of one target: ``Compression(target)`` per layer, or a whole-model ``Budget(target)``."""
    if args.budget is None:
        return LowRankOptions(SCHEMES[scheme], Compression(target))
    extra = {"latency": Latency(batch_sizes=(max(args.batch_sizes),))} if args.budget_metric == "latency" else {}
    return LowRankOptions(SCHEMES[scheme], Budget(target, metric=args.budget_metric, input_shape=shape, **extra))


def compressed_pair(base: torch.nn.Module, options: LowRankOptions):
    """(projected dense copy of ``base``, its factorized copy, number of factorized layers): ranks resolved once, so
    that projection and factorization use the same ones."""
    dense = copy.deepcopy(base)
    plans = plan_layers(dense, options)[0]
    project_planned_(dense, plans, options)
    return dense, factorize_planned(dense, plans, options).eval(), len(plans)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet32"], choices=list(BACKBONES))
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="height = width in px (default: 32 for CIFAR backbones, 224 for resnet18/resnet50/mobilenet_v2)")
    parser.add_argument("--batch-sizes", nargs="+", type=positive_int, default=[1, 32])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument("--ratios", nargs="+", type=float, default=None,
                         help="per-layer compression (dense / factorized params of each layer; default 2 4)")
    targets.add_argument("--budget", nargs="+", type=float, default=None,
                         help="whole-model compression in --budget-metric (dense / compressed)")
    parser.add_argument("--budget-metric", default="params", choices=BUDGET_METRICS)
    parser.add_argument("--modes", nargs="+", default=["eager", "channels_last", "jit"], choices=MODES)
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed passes of each model")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="intra-op threads of torch and onnxruntime (default: torch's own count)")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="keep freed CPU memory in the process (lrlightning.speed.allocator.retain_freed_memory)")
    parser.add_argument("--out", default="results/speed/bench_speed.json", help="result file (see docs/results.md)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    warnings.simplefilter("ignore", UserWarning)
    retained = args.retain_freed_memory and retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = list(dict.fromkeys(args.modes))
    if "onnxruntime" in modes and (onnxruntime_missing() or device.type != "cpu"):
        reason = (f"needs the `onnx` extra (missing: {', '.join(onnxruntime_missing())})" if onnxruntime_missing()
                  else f"runs on the CPU only, not on --device {args.device}")
        print(f"onnxruntime mode skipped: {reason}", flush=True)
        modes.remove("onnxruntime")
    rule, metric = ("compression", None) if args.budget is None else ("budget", args.budget_metric)
    target_values = args.budget if args.budget is not None else (args.ratios or [2.0, 4.0])
    batch_sizes = sorted(set(args.batch_sizes))
    rows, results = [], []
    for backbone in args.backbones:
        shape = input_shape(backbone, 3, args.image_size)
        size = shape[-1]
        base = seeded_backbone(backbone, shape).to(device)
        examples = {batch: torch.randn(batch, *shape, device=device) for batch in batch_sizes}
        for scheme, target in itertools.product(args.schemes, target_values):
            label = f"{target:g}x {metric or 'per layer'}"
            print(f"{backbone} {size}px {scheme} {label} ...", file=sys.stderr, flush=True)
            dense, model, layers = compressed_pair(base, target_options(scheme, target, args, shape))
            dense_folded, model_folded = (folded(copy.deepcopy(m).eval()) for m in (dense, model))
            with torch.no_grad():
                diff = (model_folded(examples[batch_sizes[0]]) - dense(examples[batch_sizes[0]])).abs().max().item()
            mac_reduction = count_macs(dense, shape) / count_macs(model, shape)
            for mode, batch in itertools.product(modes, batch_sizes):
                dense_ms, fact_ms = timed_pair(prepare(mode, dense_folded, examples[batch]),
                                               prepare(mode, model_folded, examples[batch]),
                                               mode_input(mode, examples[batch]), args.repeats)
                speedup = dense_ms / fact_ms
                results.append({
                    "backbone": backbone, "image_size": size, "batch_size": batch, "scheme": scheme, "rule": rule,
                    "target": target, "budget_metric": metric, "variant": "plain", "mode": mode,
                    "device": str(device), "layers_factorized": layers, "layers_kept_dense": 0,
                    "mac_reduction": mac_reduction, "param_reduction": count_params(dense) / count_params(model),
                    "ms_dense": dense_ms, "ms_factorized": fact_ms, "speedup": speedup,
                    "efficiency": speedup / mac_reduction, "images_per_s_dense": 1000 * batch / dense_ms,
                    "images_per_s_factorized": 1000 * batch / fact_ms, "max_abs_logit_diff": diff})
                rows.append([backbone, str(size), str(batch), scheme, label, mode, f"{mac_reduction:.2f}x",
                             f"{dense_ms:.2f}/{fact_ms:.2f}", f"{speedup:.2f}x", f"{speedup / mac_reduction:.2f}"])
    columns = ["backbone", "px", "batch", "scheme", "target", "mode", "MAC reduction", "ms dense/fact", "speedup",
               "efficiency"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU threads {torch.get_num_threads()}"
    if device.type == "cpu":
        where += ", freed memory retained" if retained else ", glibc's default allocator"
    where += wait_policy()
    footnote = (f"BatchNorm folded in both, {where}; medians of {args.repeats} passes, dense and factorized "
                f"alternating; efficiency = speedup / MAC reduction")
    publish_table(args.out, f"Speed of the factorized {', '.join(args.backbones)} ({where})", "speed", columns, rows,
                  footnote, results)


if __name__ == "__main__":
    main()
