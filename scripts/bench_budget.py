"""The global budget against uniform ranks: the whole-model compression each achieves and the summed normalized
squared error of the projected layers (sum over layers of ||W - W_r||² / ||W||², the quantity the allocation
minimizes), side by side on pretrained-like weights.

For each backbone and scheme, uniform ranks at ``--fractions`` give a whole-model ratio (params or MACs); the budget
rule is then asked for exactly that ratio. ``--factors`` asks the budget for those ratios directly instead (no uniform
comparison): asked against reached, where reached is counted on the factorized model (``count_params``/``count_macs``
of the exported layers), and a budget out of reach is reported as refused. Weights: the random initialization by
default (flat spectra), or the backbone of a Lightning checkpoint written by ``lrl-train`` (``--checkpoint``), for
trained weights. Inputs: ``resnet18``/``resnet50``/``mobilenet_v2`` at 3×224×224 with 1000 classes, ``conv3d`` at
3×``--depth``×size×size, ``conv1d`` at 1×``--length``, the others at ``--in-channels``×size×size with 10 classes
(size: ``--image-size``, default 224 for the ImageNet backbones, else 32). Usage:

    python scripts/bench_budget.py                                   # ResNet-20 and ResNet-32, svd and tucker2
    python scripts/bench_budget.py --backbones resnet20 --checkpoint outputs/.../checkpoints/last.ckpt --in-channels 1
    python scripts/bench_budget.py --backbones resnet50 mobilenet_v2 resnext conv3d --factors 2 3 --fractions
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from lrlightning import Budget, LowRankOptions, count_macs, count_params, factorize_planned
from lrlightning.app.provenance import publish_table
from lrlightning.plan import allocate_plan, candidate_layers
from lrlightning.projection import project_planned_

from bench_common import input_shape, refusal, seeded_backbone


def load_backbone(name: str, shape: tuple[int, ...], checkpoint: str | None) -> torch.nn.Module:
    """The seeded backbone ``name``, with the backbone weights of a Lightning ``checkpoint`` when given."""
    model = seeded_backbone(name, shape)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    return model


def measure(model: torch.nn.Module, options: LowRankOptions, metric: str, shape: tuple[int, ...]) -> dict:
    """Whole-model ratio in ``metric``, summed squared error, layers compressed and planning seconds."""
    start = time.perf_counter()
    plans, _, allocation = allocate_plan(model, options, warn=False)
    seconds = time.perf_counter() - start
    projected = copy.deepcopy(model)
    stats = project_planned_(projected, plans, options)
    small = factorize_planned(projected, plans, options)
    params = count_params(model) / count_params(small)
    macs = count_macs(model, shape) / count_macs(small, shape)
    kinds = sorted({p.scheme for p in plans})
    return {"ratio": params if metric == "params" else macs, "params_ratio": params, "macs_ratio": macs,
            "predicted": allocation.achieved if allocation is not None else None,
            "error": sum(s.rel_error ** 2 for s in stats), "layers": len(plans),
            "selectable": len(candidate_layers(model, options)[0]),
            "schemes": kinds, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet20", "resnet32"])
    parser.add_argument("--schemes", nargs="+", default=["svd", "tucker2"])
    parser.add_argument("--metrics", nargs="+", default=["params", "macs"], choices=["params", "macs"])
    parser.add_argument("--fractions", nargs="*", type=float, default=[0.3, 0.5],
                        help="uniform rank fractions the budget is compared with (none: skip the comparison)")
    parser.add_argument("--factors", nargs="*", type=float, default=[],
                        help="budgets asked for directly (dense / compressed in each metric)")
    parser.add_argument("--in-channels", type=int, default=3, help="image channels of the non-ImageNet backbones")
    parser.add_argument("--image-size", type=int, default=None, help="default 224 (ImageNet backbones), else 32")
    parser.add_argument("--depth", type=int, default=8, help="frames of the conv3d input (3, D, H, W)")
    parser.add_argument("--length", type=int, default=8000, help="samples of the conv1d input (C, L)")
    parser.add_argument("--factors-out", default=None,
                        help="result file of --factors (default: --out with -factors before .json)")
    parser.add_argument("--checkpoint", default=None, help="Lightning checkpoint whose backbone weights to use")
    parser.add_argument("--out", default="results/budget/bench_budget.json", help="result file (see docs/results.md)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)

    rows, data, asked_rows, asked_data, shapes = [], [], [], [], {}
    for backbone in args.backbones:
        shape = shapes[backbone] = input_shape(backbone, args.in_channels, args.image_size, 32, args.depth,
                                               args.length)
        model = load_backbone(backbone, shape, args.checkpoint)
        dense_params, dense_macs = count_params(model), count_macs(model, shape)
        for scheme in args.schemes:
            for metric in args.metrics:
                for factor in args.factors:
                    print(f"{backbone} {shape} {scheme} {factor:g}x {metric} ...", flush=True)
                    options = LowRankOptions(scheme, Budget(factor, metric=metric, input_shape=shape))
                    entry = {"backbone": backbone, "input_shape": list(shape), "scheme": scheme, "metric": metric,
                             "asked": factor, "dense_params": dense_params, "dense_macs": dense_macs}
                    try:
                        reached = measure(model, options, metric, shape)
                    except ValueError as error:
                        asked_data.append({**entry, "error": str(error)})
                        asked_rows.append([backbone, "x".join(map(str, shape)), scheme, metric, f"{factor:g}x", "-",
                                           "-", "-", "-", "-", refusal(str(error))])
                        continue
                    miss = reached["ratio"] / factor - 1
                    asked_data.append({**entry, **reached, "relative_miss": miss, "within_5_percent": abs(miss) <= 0.05})
                    asked_rows.append([backbone, "x".join(map(str, shape)), scheme, metric, f"{factor:g}x",
                                       f"{reached['ratio']:.3f}x", f"{miss:+.1%}",
                                       f"{reached['params_ratio']:.2f}x / {reached['macs_ratio']:.2f}x",
                                       f"{reached['layers']}/{reached['selectable']}", "+".join(reached["schemes"]),
                                       f"{reached['seconds']:.1f}"])
                    print(asked_rows[-1], flush=True)
            if not args.fractions:
                continue
            for metric in args.metrics:
                for fraction in args.fractions:
                    uniform = measure(model, LowRankOptions(scheme, fraction), metric, shape)
                    print(f"{backbone} {scheme} {metric} uniform {fraction:g}: {uniform['ratio']:.2f}x", flush=True)
                    options = LowRankOptions(scheme, Budget(uniform["ratio"], metric=metric, input_shape=shape))
                    allocated = measure(model, options, metric, shape)
                    data.append({"backbone": backbone, "scheme": scheme, "metric": metric, "fraction": fraction,
                                 "uniform": uniform, "budget": allocated})
                    rows.append([backbone, scheme, metric, f"{fraction:g}", f"{uniform['ratio']:.2f}x",
                                 f"{allocated['ratio']:.2f}x", f"{allocated['ratio'] / uniform['ratio'] - 1:+.1%}",
                                 f"{uniform['error']:.2f}", f"{allocated['error']:.2f}",
                                 f"{allocated['error'] / uniform['error']:.2f}", f"{uniform['layers']}/{allocated['layers']}",
                                 f"{allocated['seconds']:.1f}"])
    columns = ["backbone", "scheme", "metric", "uniform rank", "uniform ratio", "budget ratio", "budget vs asked",
               "uniform error", "budget error", "error ratio", "layers (uniform/budget)", "allocation s"]
    weights = f"weights of {args.checkpoint}" if args.checkpoint else "random initialization"
    inputs = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    if args.fractions:
        footnote = (f"(inputs {inputs}; {weights}; error: sum over layers of ||W - W_r||^2 / ||W||^2; the budget asks "
                    "for the uniform ratio; targets: budget within 5% of the request)")
        publish_table(args.out, f"Global budget against uniform ranks ({weights})", "budget", columns, rows, footnote,
                      data)
    if args.factors:
        out = args.factors_out or (args.out.removesuffix(".json") + "-factors.json" if args.fractions else args.out)
        columns = ["backbone", "input", "scheme", "metric", "asked", "reached", "vs asked", "params / MACs reduction",
                   "layers factorized/selectable", "schemes", "allocation s"]
        footnote = (f"({weights}; reached: dense / factorized {', '.join(args.metrics)} counted on the exported model "
                    "(count_params, count_macs per sample of the input); the whole model counts, layers left dense "
                    "and non-conv parameters included; target: reached within 5% of asked)")
        publish_table(out, f"Whole-model budgets: asked against reached ({', '.join(args.backbones)})", "budget",
                      columns, asked_rows, footnote, asked_data)


if __name__ == "__main__":
    main()
