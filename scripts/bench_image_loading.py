"""Cost of the image-folder datamodule on CIFAR-10 JPEGs: the first decode, and loading against training steps.

Into a fresh folder (a temporary one unless `--workdir`): extracts the `cifar10_jpeg` archive (timed), decodes
the 60,000 JPEGs into an empty cache (the first run: list, decode in `--decode-workers` processes, write the
cache; timed), then sets up a second datamodule from the cache (what every later run pays; timed). On that one it
times, step by step, `next(loader)` of the training loader (indexing, random crop from 4 px padding, flip,
normalization: the loading of every epoch after the first) and the training step proper (forward, backward, SGD
step of `--backbone`). Ratio = mean loader time per batch / mean training step time, after `--warmup` steps.

    python scripts/bench_image_loading.py                      # ResNet-20, batch 128, 20 steps
    python scripts/bench_image_loading.py --steps 40 --out results/data/image_loading.json
    python scripts/bench_image_loading.py --archive /path/to/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from lrlightning.app.data import CIFAR10JPEGDataModule
from lrlightning.app.data.decode import default_workers
from lrlightning.app.provenance import write_result
from lrlightning.zoo import build_backbone

from bench_common import timed, timed_training_step

TARGET_RATIO = 0.05
TARGET_DECODE_S = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archive", default=None, help="CIFAR-10 JPEG tar archive (default: as data=cifar10_jpeg)")
    parser.add_argument("--workdir", default=None, help="folder for the extracted files and the cache "
                                                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--decode-workers", type=int, default=default_workers())
    parser.add_argument("--out", default="results/data/bench_image_loading.json", help="result file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    system_load_start = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench_image_loading.") as scratch:
        work = Path(args.workdir or scratch)
        options = {"root": str(work / "cifar10_jpeg"), "archive": args.archive, "cache_dir": str(work / "cache"),
                   "batch_size": args.batch_size, "decode_workers": args.decode_workers}
        first = CIFAR10JPEGDataModule(**options)
        extract_s = timed(first.folder)
        if first.cache_file().exists():
            first.cache_file().unlink()
        decode_s = timed(first.prepare_data)
        del first
        datamodule = CIFAR10JPEGDataModule(**options)
        cached_s = timed(datamodule.setup)
        images = sum(len(d[1]) for d in (datamodule.train_data, datamodule.val_data, datamodule.test_data))
        cache_mb = datamodule.cache_file().stat().st_size / 2**20

        model = build_backbone(args.backbone, datamodule.num_classes, datamodule.in_channels).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        loader = iter(datamodule.train_dataloader())
        load_times, step_times = [], []
        for step in range(args.warmup + args.steps):
            load_s, step_s = timed_training_step(model, optimizer, loader)
            if step >= args.warmup:
                load_times.append(load_s)
                step_times.append(step_s)

    system_load_end = os.getloadavg()[0]
    load_ms, step_ms = 1e3 * statistics.fmean(load_times), 1e3 * statistics.fmean(step_times)
    ratio = load_ms / step_ms
    result = {
        "images": images, "backbone": args.backbone, "batch_size": args.batch_size, "steps": args.steps,
        "warmup": args.warmup, "threads": args.threads, "decode_workers": args.decode_workers,
        "extract_s": round(extract_s, 2), "first_decode_s": round(decode_s, 2), "cached_setup_s": round(cached_s, 3),
        "cache_mb": round(cache_mb, 1), "load_ms": round(load_ms, 3),
        "load_ms_median": round(1e3 * statistics.median(load_times), 3), "step_ms": round(step_ms, 2),
        "step_ms_median": round(1e3 * statistics.median(step_times), 2), "ratio": round(ratio, 5),
        "load_average_1min": [round(system_load_start, 2), round(system_load_end, 2)],
    }
    rows = [
        ["extract the archive", f"{extract_s:.1f} s", ""],
        [f"first decode of {images} JPEGs ({args.decode_workers} processes, into the cache)", f"{decode_s:.1f} s",
         f"<= {TARGET_DECODE_S:.0f} s"],
        [f"later setup: read the cache ({cache_mb:.0f} MiB), split, statistics", f"{cached_s:.2f} s", ""],
        [f"loader per batch of {args.batch_size} (mean; median {result['load_ms_median']:.2f} ms)",
         f"{load_ms:.2f} ms", ""],
        [f"{args.backbone} training step (mean; median {result['step_ms_median']:.1f} ms)", f"{step_ms:.1f} ms", ""],
        ["loader / training step", f"{100 * ratio:.2f} %", f"<= {100 * TARGET_RATIO:.0f} %"],
    ]
    caption = (f"CIFAR-10 JPEG (data=cifar10_jpeg), {args.backbone}, batch {args.batch_size}, {args.steps} timed "
               f"steps after {args.warmup}, {args.threads} threads; 1-min load average {system_load_start:.1f} at the "
               f"start, {system_load_end:.1f} at the end")
    print(caption)
    width = max(len(row[0]) for row in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:>10}  {row[2]}")
    table = {"caption": caption, "columns": ["what", "time", "target"], "rows": rows}
    write_result(args.out, "Image-folder loading of CIFAR-10 JPEGs", "data", [table], data=result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
