"""Share of a training step spent loading data: batched in-memory loading versus a per-image pipeline.

Each step of each variant times `next(loader)` (indexing, augmentation, normalization) and then the training
step proper (forward, backward, SGD step) on the same model; the variants run interleaved, step by step, so
they see the same machine load. Share = data time / (data time + step time), from the means after `--warmup`.

Variants:
  batched, augment     the DataModule's train loader (crop + flip on the whole uint8 batch in the collate)
  batched, no augment  the same without augmentation (what the val/test loaders do)
  per-image, augment   torchvision-style: crop, flip and normalize image by image, then stack (for contrast)

    python scripts/bench_data.py                                   # ResNet-20, Fashion-MNIST, batch 128, 8 steps
    python scripts/bench_data.py --steps 30 --threads 2 --out bench_data.json
    python scripts/bench_data.py --dataset synthetic --steps 12 --out bench_data.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset

from lrlightning.app.data import DATAMODULES, ImageDataModule, normalize, random_crop, random_horizontal_flip
from lrlightning.app.provenance import write_result
from lrlightning.zoo import build_backbone

from bench_common import timed_training_step


class PerImageDataset(Dataset):
    """One augmented, normalized float image per index, as a per-sample transform pipeline would produce."""

    def __init__(self, datamodule: ImageDataModule):
        self.images, self.labels = datamodule.train_data
        self.datamodule = datamodule

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = random_crop(self.images[index : index + 1], self.datamodule.crop_padding)
        if self.datamodule.flip:
            image = random_horizontal_flip(image)
        return normalize(image, self.datamodule.mean, self.datamodule.std)[0], self.labels[index]


class Endless:
    """Batches from a DataLoader forever, starting a new epoch when one ends."""

    def __init__(self, loader: DataLoader):
        self.loader, self.iterator = loader, iter(loader)

    def __next__(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist", choices=sorted(DATAMODULES))
    parser.add_argument("--root", default=None, help="dataset folder (default: the DataModule's search order)")
    parser.add_argument("--backbone", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="results/data/bench_data.json", help="result file (see docs/results.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    options = {} if args.dataset in ("digits", "synthetic") else {"root": args.root}
    datamodule = DATAMODULES[args.dataset](batch_size=args.batch_size, **options)
    start = time.perf_counter()
    datamodule.prepare_data()
    datamodule.setup("fit")
    setup_s = time.perf_counter() - start

    no_augment = DATAMODULES[args.dataset](batch_size=args.batch_size, augment=False, **options)
    no_augment.train_data = datamodule.train_data
    per_image = DataLoader(PerImageDataset(datamodule), batch_size=args.batch_size, shuffle=True)
    variants = {
        "batched, augment": Endless(datamodule.train_dataloader()),
        "batched, no augment": Endless(no_augment.train_dataloader()),
        "per-image, augment": Endless(per_image),
    }

    model = build_backbone(args.backbone, datamodule.num_classes, datamodule.in_channels).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    times = {name: {"data": [], "step": []} for name in variants}
    for step in range(args.warmup + args.steps):
        for name, batches in variants.items():
            data_s, step_s = timed_training_step(model, optimizer, batches)
            if step >= args.warmup:
                times[name]["data"].append(data_s)
                times[name]["step"].append(step_s)

    rows = []
    for name, measured in times.items():
        data_ms, step_ms = 1e3 * statistics.fmean(measured["data"]), 1e3 * statistics.fmean(measured["step"])
        rows.append(
            {
                "variant": name,
                "data_ms": round(data_ms, 3),
                "data_ms_median": round(1e3 * statistics.median(measured["data"]), 3),
                "step_ms": round(step_ms, 2),
                "data_share": round(data_ms / (data_ms + step_ms), 5),
            }
        )

    header = f"{'variant':<22}{'data ms':>10}{'(median)':>10}{'step ms':>10}{'data share':>12}"
    caption = (f"{args.backbone} on {datamodule.name}, batch {args.batch_size}, {args.steps} steps per variant, "
               f"{args.threads} threads; setup (read + split) {setup_s:.2f} s")
    print(caption)
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['variant']:<22}{row['data_ms']:>10.2f}{row['data_ms_median']:>10.2f}"
            f"{row['step_ms']:>10.1f}{100 * row['data_share']:>11.2f}%"
        )

    result = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "setup_s": round(setup_s, 3),
        "rows": rows,
    }
    table = {"caption": caption, "columns": ["variant", "data ms", "(median)", "step ms", "data share"],
             "rows": [[r["variant"], f"{r['data_ms']:.2f}", f"{r['data_ms_median']:.2f}", f"{r['step_ms']:.1f}",
                       f"{100 * r['data_share']:.2f}%"] for r in rows]}
    write_result(args.out, f"Data loading of {args.backbone} on {datamodule.name}", "data", [table], data=result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
