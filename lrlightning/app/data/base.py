"""`ImageDataModule`: an in-memory uint8 image dataset with a seeded train/val split and batched augmentation.

The training set is split into train/val with `seed` (`val_size` images for validation); the test set is
separate. Every dataloader yields (x float32 N×C×H×W normalized, y int64 N): its `collate_fn` turns a whole
uint8 batch into model-ready tensors at once, with random crop and, where it makes sense, horizontal flip, on
training batches only when `augment=True`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .transforms import BatchTransform


class _TensorBatches(Dataset):
    """Map-style dataset indexed by a list of indices: returns the whole batch (images[indices], labels[indices])."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


class ImageDataModule(LightningDataModule):
    """Base class: an in-memory uint8 image dataset with a seeded train/val split and batched augmentation.

    Args:
        root: folder with the dataset files (None: search the defaults, see `lrlightning.app.data.files`).
        batch_size: images per batch (default 128).
        val_size: training images held out for validation (count, >= 1; default 5000).
        seed: seed of the train/val split.
        num_workers: DataLoader worker processes (default 0: augmentation runs in the training process).
        augment: random crop and flip on training batches (default True).
        download: download from the official source when the files are not found (default True).

    Subclasses set `name`, `num_classes`, `in_channels`, `image_size`, `mean`, `std`, `crop_padding`, `flip` and
    implement `load(train)`. After `setup`, `train_data`, `val_data` and `test_data` hold (uint8 images, int64
    labels) tensors.
    """

    name = "dataset"
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding = 0
    flip = False

    def __init__(self, root: str | None = None, batch_size: int = 128, val_size: int = 5000, seed: int = 0,
                 num_workers: int = 0, augment: bool = True, download: bool = True):
        super().__init__()
        check_int("batch_size", batch_size, minimum=1)
        check_int("val_size", val_size, minimum=1)
        check_int("seed", seed, minimum=0)
        check_int("num_workers", num_workers, minimum=0)
        self.root = None if root is None else Path(root).expanduser()
        self.batch_size, self.val_size, self.seed = batch_size, val_size, seed
        self.num_workers, self.augment, self.download = num_workers, augment, download
        self.train_data: tuple[torch.Tensor, torch.Tensor] | None = None
        self.val_data: tuple[torch.Tensor, torch.Tensor] | None = None
        self.test_data: tuple[torch.Tensor, torch.Tensor] | None = None

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the training (`train=True`) or test set as (uint8 N×C×H×W, int64 N)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load the training set and split it (stage "fit" or "validate"), the test set ("test"), or all (None)."""
        if stage in (None, "fit", "validate") and self.train_data is None:
            images, labels = self._checked(*self.load(train=True), "training set")
            if self.val_size >= len(labels):
                raise ValueError(
                    f"`val_size` must be smaller than the {len(labels)} training images of {self.name}, "
                    f"got {self.val_size}"
                )
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            val, train = order[: self.val_size], order[self.val_size :]
            self.train_data, self.val_data = (images[train], labels[train]), (images[val], labels[val])
        if stage in (None, "test") and self.test_data is None:
            self.test_data = self._checked(*self.load(train=False), "test set")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._require("train_data", "fit"), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require("val_data", "fit"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require("test_data", "test"), train=False)

    def batch_transform(self, train: bool) -> BatchTransform:
        """The collate function of the training (`train=True`) or evaluation loaders."""
        augment = train and self.augment
        return BatchTransform(self.mean, self.std, self.crop_padding if augment else 0, self.flip and augment)

    def _loader(self, data: tuple[torch.Tensor, torch.Tensor], train: bool) -> DataLoader:
        dataset = _TensorBatches(*data)
        order = RandomSampler(dataset) if train else SequentialSampler(dataset)
        return DataLoader(
            dataset,
            batch_size=None,
            sampler=BatchSampler(order, self.batch_size, drop_last=False),
            collate_fn=self.batch_transform(train),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _require(self, attribute: str, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = getattr(self, attribute)
        if data is None:
            raise RuntimeError(f"{type(self).__name__}.{attribute} is not loaded: call setup({stage!r}) first")
        return data

    def _checked(self, images: torch.Tensor, labels: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"{self.name} {what}: images must be uint8 of shape (N, {', '.join(map(str, expected))}), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{self.name} {what}: {images.shape[0]} images but {labels.numel()} labels")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{self.name} {what}: labels outside [0, {self.num_classes})")
        return images, labels.to(torch.int64)


def check_int(argument: str, value: object, minimum: int) -> None:
    """Raise a ValueError naming `argument` unless `value` is an int (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{argument}` must be an int >= {minimum}, got {value!r}")
