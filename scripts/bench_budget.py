"""The global budget against uniform ranks: the whole-model compression each achieves and the summed normalized
squared error of the projected layers (sum over layers of ||W - W_r||² / ||W||², the quantity the allocation
minimizes), side by side on pretrained-like weights.

For each backbone and scheme, uniform ranks at ``--fractions`` give a whole-model ratio (params or MACs); the budget
rule is then asked for exactly that ratio. Weights: the random initialization by default (flat spectra), or the
backbone of a Lightning checkpoint written by ``lrl-train`` (``--checkpoint``), for trained weights. Usage:

    python scripts/bench_budget.py                                   # ResNet-20 and ResNet-32, svd and tucker2
    python scripts/bench_budget.py --backbones resnet20 --checkpoint outputs/.../checkpoints/last.ckpt --in-channels 1
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from lrlightning import Budget, LowRankOptions, count_macs, count_params, factorize, plan_layers, project_
from lrlightning.app.provenance import publish_table
from lrlightning.backbones import build_backbone


def load_backbone(name: str, in_channels: int, checkpoint: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=10, in_channels=in_channels)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
    return model.eval()


def measure(model: torch.nn.Module, options: LowRankOptions, metric: str, shape: tuple[int, ...]) -> dict:
    """Whole-model ratio in ``metric``, summed squared error, layers compressed and planning seconds."""
    start = time.perf_counter()
    plans = plan_layers(model, options, warn=False)[0]
    seconds = time.perf_counter() - start
    projected = copy.deepcopy(model)
    stats = project_(projected, options.scheme, rank={p.name: p.rank for p in plans})
    small = factorize(projected, options.scheme, rank={p.name: p.rank for p in plans})
    ratio = (count_params(model) / count_params(small) if metric == "params"
             else count_macs(model, shape) / count_macs(small, shape))
    return {"ratio": ratio, "error": sum(s.rel_error ** 2 for s in stats), "layers": len(plans), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["resnet20", "resnet32"])
    parser.add_argument("--schemes", nargs="+", default=["svd", "tucker2"])
    parser.add_argument("--metrics", nargs="+", default=["params", "macs"], choices=["params", "macs"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--checkpoint", default=None, help="Lightning checkpoint whose backbone weights to use")
    parser.add_argument("--out", default="results/budget/bench_budget.json", help="result file (see docs/results.md)")
    args = parser.parse_args()
    shape = (args.in_channels, args.image_size, args.image_size)

    rows, data = [], []
    for backbone in args.backbones:
        model = load_backbone(backbone, args.in_channels, args.checkpoint)
        for scheme in args.schemes:
            for metric in args.metrics:
                for fraction in args.fractions:
                    uniform = measure(model, LowRankOptions(scheme, fraction), metric, shape)
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
    footnote = (f"(inputs {shape}; {weights}; error: sum over layers of ||W - W_r||^2 / ||W||^2; the budget asks for "
                "the uniform ratio; targets: budget within 5% of the request)")
    publish_table(args.out, f"Global budget against uniform ranks ({weights})", "budget", columns, rows, footnote,
                  data)


if __name__ == "__main__":
    main()
