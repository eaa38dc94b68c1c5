"""Exact low-rank factorization across the torchvision classification families, at random weights.

Each family is built by its torchvision constructor (``weights=None``, seeded initialization, eval mode, float32)
and run on 3×224×224 inputs. The selected layers' weights are projected in place (``project_``), then the projected
model is factorized (``factorize``) at the same scheme, rank and selection. Reported per family:

* exactness: max |factorized logit - projected logit| / max |projected logit| on one seeded batch of 2, and the
  same with both sets of logits centred on their batch mean (at random weights the logits of some families are
  mostly the last layer's bias, the same for every input);
* MACs per sample and parameters of the dense model (before projection) and of the factorized one, and their
  ratio dense / factorized;
* the Conv and Linear layers of each kind (pointwise 1×1, grouped, depthwise, k×k dense conv, Linear) that were
  factorized, out of all of that kind (the rest stay dense);
* the error of a family whose selection, projection or factorization raises (e.g. no layer selected).

Needs torchvision (the ``vision`` extra). Writes ``<out>/<date>-<scheme>.json`` (see docs/results.md). Usage:

    python scripts/bench_zoo.py
    python scripts/bench_zoo.py --models resnet18 mobilenet_v2 --scheme tucker2 --rank 0.5 --out /tmp/zoo
"""
from __future__ import annotations

import argparse
import datetime
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import lrlightning
from lrlightning import SCHEME_NAMES, Selection, count_macs, count_params, factorize, project_
from lrlightning.app.provenance import git_commit, publish_table
from lrlightning.export import structure_spec
from lrlightning.layers import is_conv
from lrlightning.names import named_modules

FAMILIES = ("vgg16_bn", "resnet18", "resnet50", "wide_resnet50_2", "googlenet", "squeezenet1_1", "densenet121",
            "convnext_tiny", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
            "regnet_y_400mf", "shufflenet_v2_x1_0", "mnasnet1_0")
CONSTRUCTOR_ARGS = {"googlenet": {"aux_logits": False, "init_weights": True}}
KINDS = ("pointwise", "grouped", "depthwise", "kxk", "linear")
KIND_LABELS = {"pointwise": "1x1", "grouped": "grouped", "depthwise": "depthwise", "kxk": "kxk", "linear": "linear"}
INPUT_SHAPE = (3, 224, 224)
BATCH_SIZE = 2


def rank_value(text: str) -> int | float:
    """A ``--rank``: an int (a fixed rank) or a float in (0, 1] (a fraction of each layer's full rank)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int or a float, got {text!r}") from None


CALIBRATION_BATCHES = 2  # train-mode passes that set BatchNorm statistics, so random-weight logits depend on the input


def build_family(name: str, seed: int) -> nn.Module:
    """The torchvision model ``name`` with random weights drawn after ``torch.manual_seed(seed)``, its BatchNorm
    running statistics set by ``CALIBRATION_BATCHES`` train-mode passes on random batches (momentum None: their
    average), in eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, **CONSTRUCTOR_ARGS.get(name, {})).float()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(CALIBRATION_BATCHES):
            model(torch.randn(BATCH_SIZE, *INPUT_SHAPE))
    return model.eval()


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, a conv's kind (``"depthwise"``: groups > 1 with one input channel per group; ``"pointwise"``:
    every kernel dimension 1; ``"grouped"``: other groups > 1; ``"kxk"``: other dense convs), or None for any
    other module."""
    if isinstance(module, nn.Linear):
        return "linear"
    if not is_conv(module):
        return None
    if module.groups > 1 and module.in_channels == module.groups:
        return "depthwise"
    if math.prod(module.kernel_size) == 1:
        return "pointwise"
    return "grouped" if module.groups > 1 else "kxk"


def dense_layers(model: nn.Module) -> dict[str, str]:
    """``{canonical layer name: kind}`` of every Conv and Linear layer of ``model``, in model order."""
    kinds = {name: layer_kind(module) for name, module in named_modules(model).items()}
    return {name: kind for name, kind in kinds.items() if kind is not None}


def layer_counts(kinds: dict[str, str], factorized: set[str]) -> dict[str, dict[str, int]]:
    """Per kind, how many layers of ``kinds`` are in ``factorized`` and how many stay dense."""
    counts = {kind: {"factorized": 0, "dense": 0} for kind in KINDS}
    for name, kind in kinds.items():
        counts[kind]["factorized" if name in factorized else "dense"] += 1
    return counts


def max_ratio(difference: torch.Tensor, reference: torch.Tensor) -> float | None:
    """max |difference| / max |reference|, None when the reference is all zeros."""
    scale = reference.abs().max().item()
    return difference.abs().max().item() / scale if scale > 0 else None


def exactness(projected: nn.Module, factorized: nn.Module, batch: torch.Tensor) -> dict[str, float | None]:
    """Max |logit difference| between ``factorized`` and ``projected`` on ``batch``: absolute, over the max |projected
    logit| (``rel_diff``) and, both sets of logits centred on their batch mean, over the max |centred projected
    logit| (``rel_diff_centred``: the part of the logits that depends on the input, without the constant the last
    bias adds); ``input_spread``: max |centred projected logit| over max |projected logit|."""
    with torch.no_grad():
        reference, result = projected(batch), factorized(batch)
    centred, result_centred = reference - reference.mean(0), result - result.mean(0)
    return {"max_abs_diff": (result - reference).abs().max().item(), "max_abs_logit": reference.abs().max().item(),
            "rel_diff": max_ratio(result - reference, reference),
            "rel_diff_centred": max_ratio(result_centred - centred, centred),
            "input_spread": max_ratio(centred, reference)}


def factorize_family(model: nn.Module, scheme: str, rank: int | float, selection: Selection,
                     batch: torch.Tensor) -> dict[str, Any]:
    """Project ``model`` in place, factorize it, and measure exactness, MACs and parameters of the factorized model
    and the names of its factorized layers; the messages of the warnings raised on the way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = project_(model, scheme=scheme, rank=rank, layers=selection)
        factorized = factorize(model, scheme=scheme, rank=rank, layers=selection).eval()
    return {**exactness(model, factorized, batch), "macs_factorized": count_macs(factorized, INPUT_SHAPE),
            "params_factorized": count_params(factorized), "projected": len(stats),
            "factorized_layers": sorted(structure_spec(factorized)),
            "warnings": sorted({str(w.message) for w in caught})}


def measure_family(name: str, scheme: str, rank: int | float, linear: bool, seed: int) -> dict[str, Any]:
    """One family's row: dense MACs per sample and params, the factorized model's (``factorize_family``) with
    ratios dense / factorized, layer counts by kind and wall seconds; ``error`` (``Type: message``) instead of the
    factorized numbers when a step raises."""
    start = time.perf_counter()
    row: dict[str, Any] = {"family": name, "linear": linear}
    try:
        model = build_family(name, seed)
    except Exception as error:
        return {**row, "error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - start}
    kinds = dense_layers(model)
    row.update(macs_dense=count_macs(model, INPUT_SHAPE), params_dense=count_params(model))
    batch = torch.randn((BATCH_SIZE, *INPUT_SHAPE), generator=torch.Generator().manual_seed(seed))
    factorized: set[str] = set()
    try:
        result = factorize_family(model, scheme, rank, Selection(linear=linear), batch)
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {error}"
    else:
        factorized = set(result["factorized_layers"])
        row.update(result, macs_ratio=row["macs_dense"] / result["macs_factorized"],
                   params_ratio=row["params_dense"] / result["params_factorized"])
    row["layers"] = layer_counts(kinds, factorized)
    row["unknown_factorized"] = sorted(factorized - set(kinds))
    row["seconds"] = time.perf_counter() - start
    return row


def kind_cell(counts: dict[str, int]) -> str:
    """``factorized/total`` of one kind, ``-`` when the model has none."""
    total = counts["factorized"] + counts["dense"]
    return f"{counts['factorized']}/{total}" if total else "-"


def ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def table_row(row: dict[str, Any], error_width: int) -> list[str]:
    """One family's table cells; an error is cut to ``error_width`` characters."""
    layers = row.get("layers") or {kind: {"factorized": 0, "dense": 0} for kind in KINDS}
    dense = [row["family"] + (" (+linear)" if row["linear"] else "")]
    if "macs_dense" in row:
        dense += [f"{row['macs_dense'] / 1e9:.3f}", f"{row['params_dense'] / 1e6:.2f}"]
    else:
        dense += ["-", "-"]
    kinds = [kind_cell(layers[kind]) for kind in KINDS]
    if "error" in row:
        message = row["error"].splitlines()[0]
        message = message if len(message) <= error_width else message[:error_width - 3] + "..."
        return dense + ["-"] * 7 + kinds + [f"{row['seconds']:.1f}", message]
    return dense + [f"{row['macs_factorized'] / 1e9:.3f}", f"{row['macs_ratio']:.2f}x",
                    f"{row['params_factorized'] / 1e6:.2f}", f"{row['params_ratio']:.2f}x",
                    *(ratio_cell(row[key]) for key in ("rel_diff", "rel_diff_centred", "input_spread")),
                    *kinds, f"{row['seconds']:.1f}", "ok"]


def environment() -> dict[str, Any]:
    """Versions of torch, torchvision and lrlightning, and torch's intra-op thread count."""
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "lrlightning": lrlightning.__version__, "threads": torch.get_num_threads()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), metavar="FAMILY",
                        help="torchvision constructor names (default: the 15 families)")
    parser.add_argument("--linear-for", nargs="*", default=["convnext_tiny"], metavar="FAMILY",
                        help="families whose Linear layers are selected too (Selection(linear=True))")
    parser.add_argument("--scheme", default="svd", choices=SCHEME_NAMES)
    parser.add_argument("--rank", type=rank_value, default=0.25,
                        help="fixed rank (int) or fraction of each layer's full rank (float in (0, 1])")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the input batch")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--error-width", type=int, default=60, help="characters of an error shown in the table")
    parser.add_argument("--out", default="results/zoo", help="folder of the result file (see docs/results.md)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start, commit = time.perf_counter(), git_commit()
    rows = []
    for name in args.models:
        row = measure_family(name, args.scheme, args.rank, name in args.linear_for, args.seed)
        rows.append(row)
        print(f"{name}: {'error' if 'error' in row else 'ok'} in {row['seconds']:.1f} s", flush=True)
    total = time.perf_counter() - start
    columns = ["family", "dense GMACs", "dense Mparams", "fact. GMACs", "MACs ratio", "fact. Mparams",
               "params ratio", "rel. logit diff", "centred", "input spread", *(KIND_LABELS[kind] for kind in KINDS),
               "s", "status"]
    table = [table_row(row, args.error_width) for row in rows]
    footnote = (f"(scheme {args.scheme}, rank {args.rank:g}; torchvision {torchvision.__version__} random weights, "
                f"seed {args.seed}, eval, float32, MACs per 3x224x224 sample; rel. logit diff: max |factorized - "
                f"projected| / max |projected| on a batch of {BATCH_SIZE}; centred: the same with both sets of "
                f"logits centred on their batch mean; input spread: max |centred projected| / max |projected| (near "
                f"float32 precision, the logits hardly depend on the input and the centred ratio is rounding); "
                f"per kind: factorized/total layers, the rest dense; {total:.0f} s in all)")
    if git_commit() != commit:
        footnote += f" (the checkout changed during the run, which started at commit {commit})"
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    path = Path(args.out) / f"{date}-{args.scheme}.json"
    data = {"scheme": args.scheme, "rank": args.rank, "seed": args.seed, "input_shape": list(INPUT_SHAPE),
            "batch_size": BATCH_SIZE, "seconds": total, "commit_at_start": commit, "environment": environment(),
            "rows": rows}
    publish_table(path, f"Factorizing the torchvision families ({args.scheme}, rank {args.rank:g})", "zoo",
                  columns, table, footnote, data)


if __name__ == "__main__":
    main()
