"""Budget allocation from weight errors against output errors, on a trained model: for each scheme and budget (whole
model ``--budgets`` times smaller in parameters), the ranks are allocated twice, from the layers' weight errors
(``objective="weight"``) and from their output errors on training batches (``objective="activation"``, the
statistics of ``--batches`` batches); the dense checkpoint is then decomposed at each allocation the same way
(activation-objective projection, BatchNorm re-estimated on 20 batches) and tested with no fine-tuning, side by
side. Fashion-MNIST and a ``lrl-train`` checkpoint of a ``LitClassifier``. Usage:

    python scripts/bench_allocation.py --checkpoint dense/checkpoints/last.ckpt
    python scripts/bench_allocation.py --checkpoint dense/checkpoints/last.ckpt --schemes tucker2 --budgets 6.35
"""
from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch

from lrlightning import Activation, Budget, LowRankOptions, count_params, factorize_planned
from lrlightning.app.data import FashionMNISTDataModule
from lrlightning.app.job import data_passes
from lrlightning.app.module import LitClassifier
from lrlightning.app.provenance import publish_table
from lrlightning.app.ranks import BACKBONE, backbone_plan


def test_accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="lrl-train checkpoint of the dense model")
    parser.add_argument("--schemes", nargs="+", default=["tucker2", "svd"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[6.35, 4.0])
    parser.add_argument("--batches", type=int, default=2, help="statistics batches (Activation.batches)")
    parser.add_argument("--budget-objectives", nargs="+", default=["max"], choices=["max", "sum"],
                        help="Budget.objective: the largest normalized error over layers, or their sum")
    parser.add_argument("--out", default="results/budget/bench_allocation.json", help="result file (see docs/results.md)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    torch.manual_seed(0)
    datamodule = FashionMNISTDataModule()
    datamodule.setup("fit")
    datamodule.setup("test")
    dense = LitClassifier.load_from_checkpoint(args.checkpoint, map_location="cpu")
    passes = data_passes(datamodule)
    dense_acc = test_accuracy(dense, datamodule.test_dataloader())
    rows, data = [], []
    for scheme, budget, kind in ((s, b, k) for s in args.schemes for b in args.budgets for k in args.budget_objectives):
        rule = Budget(budget, objective=kind)
        options = LowRankOptions(scheme, rule, objective=Activation(batches=args.batches))
        by_weight = backbone_plan(dense, LowRankOptions(scheme, rule))  # ranks from weight errors
        weight_ranks = {f"{BACKBONE}.{name}": rank for name, rank in by_weight.ranks.items()}
        allocations = {"weight": backbone_plan(dense, options, weight_ranks),
                       "output": backbone_plan(dense, options, passes=passes, seed=0)}
        for errors, plan in allocations.items():
            plans = list(plan.layers)
            model = copy.deepcopy(dense)
            stats = passes.finish(model.backbone, plans, options, 20, seed=0)
            small = factorize_planned(model.backbone, plans, options)
            outputs = [s.output_rel_error for s in stats]
            ratio = count_params(dense.backbone) / count_params(small)
            accuracy = test_accuracy(small, datamodule.test_dataloader())
            data.append({"scheme": scheme, "budget": budget, "budget_objective": kind, "errors": errors,
                         "model_ratio": ratio, "ranks": {p.name: p.rank for p in plans}, "output_rel_errors": outputs,
                         "test_acc_decomposed": accuracy, "test_acc_dense": dense_acc})
            rows.append([scheme, f"{budget:g}x", kind, errors, f"{ratio:.2f}x", f"{statistics.fmean(outputs):.3f}",
                         f"{max(outputs):.3f}", f"{100 * accuracy:.2f}"])
            print(rows[-1], flush=True)
    columns = ["scheme", "budget (params)", "objective", "allocated from", "model ratio", "mean output error",
               "max output error", "decomposed test acc %"]
    footnote = (f"(dense test accuracy {100 * dense_acc:.2f} %; both allocations decomposed with objective=activation "
                f"on {args.batches} training batches of the same seed, BatchNorm re-estimated on 20, no fine-tuning; "
                "output error: sqrt(E|(W - W_r)x|^2 / E|Wx|^2) per layer)")
    publish_table(args.out, "Budget allocation from weight errors against output errors", "budget", columns, rows,
                  footnote, data)


if __name__ == "__main__":
    main()
