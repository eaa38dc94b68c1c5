"""Speed of factorized models against the dense model, side by side in one run.

For each scheme at each target compression (per layer, dense / factorized params), the dense model's weights are
projected, the model is factorized, BatchNorm is folded into the convs of both models, and each inference mode
is timed interleaved with the dense model in the same mode: latency at batch 1 and throughput at batch 64.
Efficiency = measured speedup at batch 64 / MAC reduction. ``guard`` keeps dense every factorized layer that
measured slower than its dense layer (``lrlightning.speed.keep_faster_layers``). Usage:

    python scripts/bench_speed.py                                   # ResNet-32, 3×32×32, all schemes, 2× and 4×
    python scripts/bench_speed.py --schemes svd tucker2 --ratios 4 --repeats 10 --out /tmp/speed.json
    python scripts/bench_speed.py --device cuda --modes eager channels_last    # GPU (jit modes are CPU-oriented)
"""
from __future__ import annotations

import argparse
import copy
import warnings

import torch

from lrlightning import count_macs, factorize, project_
from lrlightning.backbones import build_backbone
from lrlightning.app.provenance import write_result
from lrlightning.speed import fold_batchnorm, keep_faster_layers, latency_ms
from lrlightning.summary import format_table

SCHEME_OPTIONS = {"svd": {}, "tucker2": {}, "spatial_svd": {}, "tiled_svd": {"tile_shape": (16, 16)}}


def prepare(mode: str, model: torch.nn.Module, example: torch.Tensor):
    """(model, input) ready for timing in ``mode``: eager, channels_last, jit (trace + freeze), or compile
    (``torch.compile`` of the channels_last model; needs a C++ compiler on CPU)."""
    if mode in ("channels_last", "compile"):
        model, example = model.to(memory_format=torch.channels_last), example.to(memory_format=torch.channels_last)
        if mode == "compile":
            model = torch.compile(model, dynamic=False)
        return model, example
    if mode == "jit":
        with torch.no_grad():
            traced = torch.jit.freeze(torch.jit.trace(model, example))
        return traced, example
    return model, example


def timed_pair(dense, factorized, example, mode: str, repeats: int) -> tuple[float, float]:
    """Median ms of dense and factorized, alternating so machine noise hits both alike."""
    dense_model, dense_input = prepare(mode, dense, example)
    fact_model, fact_input = prepare(mode, factorized, example)
    dense_ms, fact_ms = [], []
    for _ in range(3):
        dense_ms.append(latency_ms(dense_model, dense_input, repeats))
        fact_ms.append(latency_ms(fact_model, fact_input, repeats))
    return min(dense_ms), min(fact_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="resnet32")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEME_OPTIONS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--modes", nargs="+", default=["eager", "channels_last", "jit"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=64, help="batch of the throughput measurement")
    parser.add_argument("--out", default="results/speed/bench_speed.json", help="result file (see docs/results.md)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)

    torch.manual_seed(0)
    device = torch.device(args.device)
    base = build_backbone(args.backbone, num_classes=10, in_channels=3).eval().to(device)
    shape = (3, 32, 32)
    big = args.batch_size
    batch1, batch_big = torch.randn(1, *shape, device=device), torch.randn(big, *shape, device=device)
    rows, results = [], []
    for scheme in args.schemes:
        for ratio in args.ratios:
            dense = copy.deepcopy(base)
            options = dict(rank=None, compression=ratio, **SCHEME_OPTIONS[scheme])
            project_(dense, scheme, **options)
            factorized = factorize(dense, scheme, **options).eval().to(device)
            guarded, report = keep_faster_layers(dense, factorized, batch_big, repeats=args.repeats)
            variants = {"plain": factorized, "guard": guarded}
            dense_folded = fold_batchnorm(dense)
            for variant, model in variants.items():
                folded = fold_batchnorm(model)
                with torch.no_grad():
                    diff = (folded(batch_big) - dense(batch_big)).abs().max().item()
                mac_reduction = count_macs(dense, shape) / count_macs(model, shape)
                for mode in args.modes:
                    dense_1, fact_1 = timed_pair(dense_folded, folded, batch1, mode, args.repeats)
                    dense_big, fact_big = timed_pair(dense_folded, folded, batch_big, mode, args.repeats)
                    speedup = dense_big / fact_big
                    throughput_dense, throughput_fact = 1000 * big / dense_big, 1000 * big / fact_big
                    result = {"scheme": scheme, "ratio": ratio, "variant": variant, "mode": mode,
                              "mac_reduction": mac_reduction, "latency_ms_dense_b1": dense_1,
                              "latency_ms_factorized_b1": fact_1, "batch": big, "device": str(device),
                              "throughput_dense_b64": throughput_dense,
                              "throughput_factorized_b64": throughput_fact, "speedup_b64": speedup,
                              "efficiency_b64": speedup / mac_reduction, "max_abs_logit_diff": diff,
                              "layers_kept_dense": sum(not r["factorized"] for r in report) if variant == "guard" else 0}
                    results.append(result)
                    rows.append([scheme, f"{ratio:g}x", variant, mode, f"{mac_reduction:.2f}x",
                                 f"{dense_1:.2f}/{fact_1:.2f}", f"{throughput_dense:.0f}/{throughput_fact:.0f}",
                                 f"{speedup:.2f}x", f"{speedup / mac_reduction:.2f}", str(result["layers_kept_dense"])])
    columns = ["scheme", "target", "variant", "mode", "MACs", "b1 ms dense/fact", f"b{big} img/s dense/fact",
               f"speedup b{big}", "efficiency", "kept dense"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU threads {torch.get_num_threads()}"
    footnote = f"({args.backbone}, BatchNorm folded in both, {where}, best of 3 interleaved medians of {args.repeats})"
    print(format_table(columns, rows))
    print(footnote)
    write_result(args.out, f"Speed of the factorized {args.backbone} ({where})", "speed",
                 [{"columns": columns, "rows": rows, "lines": [footnote]}], data=results)


if __name__ == "__main__":
    main()
