"""Why eager factorized ResNet-20 gains what it gains: dense against factorized at batch 128 on 1×28×28, per layer
and whole, in each serving form.

Whole models are timed interleaved in four forms (``lrlightning.speed.serving``): as trained (NCHW, BatchNorm unfolded),
channels_last, BatchNorm folded, and both (what eager latency budgets time). Each conv is then timed alone on its
real input, dense against its factorized chain, contiguous and channels_last. Ratios are medians of per-round
ratios with their interquartile range; the CPU's model and instruction sets go into the result file. Usage:

    python scripts/profile_eager.py                   # Tucker-2 at half the channels (2.7x fewer MACs)
    python scripts/profile_eager.py --rank 0.3
"""
from __future__ import annotations

import argparse
import re
from datetime import date

import torch

from lrlightning import factorize
from lrlightning.app.provenance import write_result
from lrlightning.speed.cpu import cpu_features, cpu_model, features_text
from lrlightning.layers import FactorizedLayer
from lrlightning.speed.serving import serving_form, serving_input
from lrlightning.speed.measure import layer_inputs
from lrlightning.training.summary import format_table
from lrlightning.speed.timing import Spread, interleaved_samples, paired_ratios
from lrlightning.zoo import build_backbone

FORMS = {"as trained (NCHW)": ("contiguous", False), "channels_last": ("channels_last", False),
         "BatchNorm folded": ("contiguous", True), "folded + channels_last": ("channels_last", True)}


class OwnInput(torch.nn.Module):
    """``model`` run on its own ``example`` (the batch in its memory format) whatever it is called with, so that
    forms fed in different memory formats can be timed interleaved."""

    def __init__(self, model: torch.nn.Module, example: torch.Tensor):
        super().__init__()
        self.model, self.example = model, example

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.model(self.example)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=float, default=0.5, help="uniform Tucker-2 rank fraction")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = build_backbone("resnet20", num_classes=10, in_channels=1).eval()
    small = factorize(dense, "tucker2", args.rank).eval()
    x = torch.randn(args.batch_size, 1, 28, 28)
    features = features_text(cpu_features())
    print(f"CPU {cpu_model()} ({features}), {torch.get_num_threads()} threads")
    whole_rows, whole_data, models, plain = [], {}, [], None
    for label, (memory_format, fold) in FORMS.items():
        fed = serving_input(x, memory_format)
        models += [OwnInput(serving_form(model, memory_format, fold), fed) for model in (dense, small)]
    samples = interleaved_samples(models, x, rounds=11, round_seconds=0.05, max_rounds=33)
    for index, label in enumerate(FORMS):
        dense_ms, small_ms = samples[2 * index], samples[2 * index + 1]
        plain = plain or dense_ms
        speedup, against_plain = paired_ratios(dense_ms, small_ms), paired_ratios(plain, dense_ms)
        whole_rows.append([label, Spread.of(dense_ms).text(), Spread.of(small_ms).text(), speedup.text(suffix="x"),
                           against_plain.text(suffix="x")])
        whole_data[label] = {"dense_ms": Spread.of(dense_ms).as_dict(), "factorized_ms": Spread.of(small_ms).as_dict(),
                             "speedup": speedup.as_dict(), "dense_vs_as_trained": against_plain.as_dict()}
    print(format_table(["whole model", "dense ms", "factorized ms", "speedup", "dense vs as trained"], whole_rows))
    names = [name for name, module in small.named_modules() if isinstance(module, FactorizedLayer)]
    inputs = layer_inputs(dense, names, x)
    layer_rows, layer_data = [], []
    for name in names:
        row = [name, "x".join(map(str, dense.get_submodule(name).weight.shape)), str(small.get_submodule(name).rank)]
        entry = {"layer": name}
        for memory_format in ("contiguous", "channels_last"):
            pair = [serving_form(model.get_submodule(name), memory_format, False) for model in (dense, small)]
            dense_ms, small_ms = interleaved_samples(pair, serving_input(inputs[name], memory_format), rounds=7)
            ratio = paired_ratios(dense_ms, small_ms)
            row += [f"{Spread.of(dense_ms).median:.2f} / {Spread.of(small_ms).median:.2f}", f"{ratio.median:.2f}x"]
            entry[memory_format] = {"dense_ms": Spread.of(dense_ms).as_dict(),
                                    "factorized_ms": Spread.of(small_ms).as_dict(), "speedup": ratio.as_dict()}
        layer_rows.append(row)
        layer_data.append(entry)
        print(" | ".join(row), flush=True)
    dense_sum = sum(e["channels_last"]["dense_ms"]["median"] for e in layer_data)
    whole_dense = whole_data["folded + channels_last"]["dense_ms"]["median"]
    notes = [f"CPU: {cpu_model()} ({features}), {torch.get_num_threads()} threads; ResNet-20 on 1x28x28 at batch "
             f"{args.batch_size}, uniform tucker2 rank {args.rank}.",
             f"The factorized convs, timed alone (channels_last), take {dense_sum:.1f} ms dense of the "
             f"{whole_dense:.1f} ms of the whole folded channels_last pass; the rest (first conv, activations, "
             "additions, pooling, classifier) does not shrink with the ranks."]
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")
    out = args.out or f"results/speed/{date.today().isoformat()}-eager-profile-resnet20-{slug}.json"
    tables = [{"caption": "Whole model, four serving forms (interleaved)", "columns": [
        "whole model", "dense ms", "factorized ms", "speedup", "dense vs as trained"], "rows": whole_rows},
              {"caption": "Each factorized conv alone on its real input (ms dense / factorized)", "columns": [
                  "layer", "shape", "rank", "contiguous ms", "speedup", "channels_last ms", "speedup"],
               "rows": layer_rows, "lines": notes}]
    print("\n".join(notes))
    written = write_result(out, f"Eager ResNet-20 per layer on {cpu_model()}", "speed", tables,
                           data={"whole": whole_data, "layers": layer_data})
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
