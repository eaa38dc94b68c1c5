"""`ImageFolderDataModule`: a folder of class folders of JPEG, PNG or WebP files, decoded once into a uint8 cache.

The folder is `root/<class>/*` (split into train/val/test by `val_size` and `test_size`) or `root/train/<class>/*`
with `root/test/<class>/*` (the training images split into train/val by `val_size`); see `folders`. Splits are
drawn with `seed` and stratified (each split holds the classes in about their overall proportions). The images
are decoded in parallel over the CPU's cores into the cache of `image_cache` on first use and read from it
afterwards; normalization uses the channel mean and std of the training split.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from .base import ImageDataModule, check_int
from .decode import decode_all
from .folders import find_classes, list_folder
from .image_cache import DecodedFolder, cache_path, describe, file_key, read_cache, write_cache

log = logging.getLogger(__name__)

DEFAULT_TEST_SIZE = 0.1


class ImageFolderDataModule(ImageDataModule):
    """Images in class folders (JPEG, PNG, WebP: anything Pillow reads), decoded once into a uint8 cache.

    Args:
        root: the folder: `root/<class>/*`, or `root/train/<class>/*` with `root/test/<class>/*`.
        image_size: side of the square images in px (default 32); files of another size are resized to it
            (bilinear, aspect ratio not kept).
        in_channels: 3 (RGB, default) or 1 (grayscale).
        batch_size: images per batch (default 128).
        val_size: validation images taken from the training images: a count (int >= 1) or a fraction in (0, 1)
            (default 0.1).
        test_size: test images of a `root/<class>/*` folder, as `val_size` (None: 0.1); not allowed with the
            train/test layout, whose test set is `root/test`.
        seed: seed of the splits.
        num_workers: DataLoader worker processes (default 0).
        augment: random crop and flip on training batches (default True).
        crop_padding: zero padding of the random crop in px (None: image_size // 8, at least 1; 0: no crop).
        flip: random horizontal flip when augmenting (default True).
        skip_unreadable: leave out files that are not readable images, with a warning giving their count
            (default False: such a file is an error naming it).
        decode_workers: processes that decode the images (None: the CPU's cores).
        cache_dir: folder of the decode cache (None: `$LRLIGHTNING_CACHE/image_folder`, default
            `~/.cache/lrlightning/image_folder`).

    `class_names` lists the classes (the sorted class folder names; label i is `class_names[i]`); `num_classes`
    is their count. Both are known before `setup`. After `setup`, `mean` and `std` hold the channel statistics of
    the training split (0-1 scale).
    """

    name = "image folder"
    known_classes: tuple[str, ...] | None = None  # a preset's classes: known before the folder is found, checked then

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 32,
        in_channels: int = 3,
        batch_size: int = 128,
        val_size: int | float = 0.1,
        test_size: int | float | None = None,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        crop_padding: int | None = None,
        flip: bool = True,
        skip_unreadable: bool = False,
        decode_workers: int | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__(root, batch_size, 1, seed, num_workers, augment, download=False)
        check_int("image_size", image_size, minimum=1)
        if in_channels not in (1, 3):
            raise ValueError(f"`in_channels` must be 1 (grayscale) or 3 (RGB), got {in_channels!r}")
        if crop_padding is not None:
            check_int("crop_padding", crop_padding, minimum=0)
        if decode_workers is not None:
            check_int("decode_workers", decode_workers, minimum=1)
        self.val_size = check_size("val_size", val_size)
        self.test_size = None if test_size is None else check_size("test_size", test_size)
        self.image_size, self.in_channels = image_size, in_channels
        self.crop_padding = max(1, image_size // 8) if crop_padding is None else crop_padding
        self.flip, self.skip_unreadable, self.decode_workers = bool(flip), bool(skip_unreadable), decode_workers
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self._class_names: list[str] | None = None
        self._prepared: DecodedFolder | None = None

    @property
    def class_names(self) -> list[str]:
        """The class names, sorted: label i is `class_names[i]`."""
        if self._class_names is None:
            self._class_names = list(self.known_classes or find_classes(self.folder())[0])
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def folder(self) -> Path:
        """The image folder (`root`)."""
        if self.root is None:
            raise ValueError(f"{type(self).__name__} needs `root`: a folder of class folders (lrl-train: "
                             f"data.root=/path/to/folder)")
        return self.root

    def cache_file(self) -> Path:
        """The decode cache file of this folder, image size and channels."""
        return cache_path(self.folder(), self.image_size, self.in_channels, self.cache_dir)

    def prepare_data(self) -> None:
        """Decode the folder into the cache unless it is there and current (runs on one process per node; nothing
        once the data is set up)."""
        if self.train_data is None:
            self._prepared = self.decoded()

    def decoded(self) -> DecodedFolder:
        """The decoded folder: from the cache when it matches the folder's files, else decoded and cached."""
        root = self.folder()
        listing = list_folder(root)
        if self.known_classes is not None and tuple(listing.class_names) != self.known_classes:
            raise ValueError(f"{self.name}: the class folders of {root} must be {list(self.known_classes)}, got "
                             f"{listing.class_names}")
        if self.test_size is not None and listing.has_test:
            raise ValueError(f"`test_size` applies to a folder of class folders; {root} has train/ and test/ "
                             f"folders, whose test/ is the test set: leave test_size unset (null), got "
                             f"{self.test_size!r}")
        path = self.cache_file()
        meta = describe(root, self.image_size, self.in_channels, file_key(listing.entries))
        decoded = read_cache(path, meta)
        if decoded is None:
            images, failed = decode_all(listing.paths, self.image_size, self.in_channels, self.decode_workers,
                                        desc=f"decoding {root.name}")
            unreadable = {listing.entries[i][0]: failed[i] for i in sorted(failed)}
            if unreadable and not self.skip_unreadable:
                raise self._unreadable(unreadable)
            labels, splits = np.asarray(listing.labels, dtype=np.int64), np.asarray(listing.splits, dtype=np.int8)
            if failed:
                keep = np.setdiff1d(np.arange(len(labels)), np.fromiter(failed, dtype=np.int64, count=len(failed)))
                images, labels, splits = images[keep], labels[keep], splits[keep]
            decoded = DecodedFolder(images, labels, splits, listing.class_names, unreadable)
            self._check_classes(decoded, listing.has_test)
            write_cache(path, decoded, meta)
            log.info("%s: cached %d images in %s", self.name, len(labels), path)
        elif decoded.skipped and not self.skip_unreadable:
            raise self._unreadable(decoded.skipped)
        if decoded.skipped:
            warnings.warn(f"{root}: skipped {len(decoded.skipped)} unreadable files (skip_unreadable=True), e.g. "
                          f"{root / next(iter(decoded.skipped))}", stacklevel=2)
        self._class_names = decoded.class_names
        return decoded

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images (train and val; `train=True`) or the test images as (uint8 N×C×H×W, int64 N); with
        the single-folder layout the test images are those `setup` sets apart."""
        self.setup()
        if train:
            images = torch.cat([self.train_data[0], self.val_data[0]])
            return images, torch.cat([self.train_data[1], self.val_data[1]])
        return self.test_data

    def setup(self, stage: str | None = None) -> None:
        """Split the decoded folder into `train_data`, `val_data` and `test_data` (all at once, whatever `stage`)
        and set `mean` and `std` from the training split."""
        if self.train_data is not None:
            return
        decoded, self._prepared = self._prepared or self.decoded(), None
        images, labels = torch.from_numpy(decoded.images), torch.from_numpy(decoded.labels)
        splits = torch.from_numpy(decoded.splits)
        train, val, test = self.split_indices(labels, splits)
        self.train_data = self._checked(images[train], labels[train], "training split")
        self.val_data = self._checked(images[val], labels[val], "validation split")
        self.test_data = self._checked(images[test], labels[test], "test split")
        self.mean, self.std = channel_stats(self.train_data[0])
        log.info("%s: %d train, %d val, %d test images, %d classes; mean %s, std %s", self.name, len(train),
                 len(val), len(test), self.num_classes, self.mean, self.std)

    def split_indices(self, labels: torch.Tensor, splits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(train, val, test) indices: val (and, for a single folder, test) drawn first from a stratified order."""
        pool = torch.nonzero(splits == 0).flatten()
        test = torch.nonzero(splits == 1).flatten()
        held = [("val_size", self.val_size)]
        if len(test) == 0:
            held.append(("test_size", DEFAULT_TEST_SIZE if self.test_size is None else self.test_size))
        counts = [(argument, count_of(size, len(pool))) for argument, size in held]
        if sum(count for _, count in counts) >= len(pool):
            asked = ", ".join(f"{argument}={size!r} ({count} images)" for (argument, size), (_, count)
                              in zip(held, counts))
            raise ValueError(f"{self.folder()}: {asked} leave no training images of the {len(pool)} available; "
                             f"lower them")
        order = pool[stratified_order(labels[pool], self.seed)]
        val_count = counts[0][1]
        val = order[:val_count]
        if len(test) == 0:
            test, order = order[val_count:val_count + counts[1][1]], order[val_count + counts[1][1]:]
        else:
            order = order[val_count:]
        return order.sort().values, val.sort().values, test.sort().values

    def _check_classes(self, decoded: DecodedFolder, has_test: bool) -> None:
        for split, name in enumerate(("train", "test") if has_test else ("",)):
            present = np.bincount(decoded.labels[decoded.splits == split], minlength=len(decoded.class_names))
            for label in np.flatnonzero(present == 0):
                folder = self.folder() / name / decoded.class_names[label]
                raise ValueError(f"class folder {folder} holds no readable images (all skipped as unreadable)")

    def _unreadable(self, unreadable: dict[str, str]) -> ValueError:
        name, reason = next(iter(unreadable.items()))
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        return ValueError(f"{self.folder() / name} is not a readable image ({reason}){more}; remove it, or pass "
                          f"skip_unreadable=True (lrl-train: +data.skip_unreadable=true) to leave such files out")


def check_size(argument: str, value: object) -> int | float:
    """`value` if it is a count (int >= 1) or a fraction (float in (0, 1)); else a ValueError naming `argument`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{argument}` must be a count (int >= 1) or a fraction in (0, 1), got {value!r}")
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0 < value < 1:
        raise ValueError(f"`{argument}` must be a count (int >= 1) or a fraction in (0, 1), got {value!r}")
    return value


def count_of(size: int | float, total: int) -> int:
    """Images that `size` (count, or fraction of `total`, at least 1) stands for."""
    return size if isinstance(size, int) else max(1, round(size * total))


def stratified_order(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A random order of positions 0..N-1 (from `seed`) in which every prefix holds each class in about its share
    of `labels` (int64 N): classes are interleaved by each image's rank within its shuffled class."""
    count = len(labels)
    shuffle = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    shuffled = labels[shuffle]
    by_class = torch.argsort(shuffled, stable=True)
    sizes = torch.bincount(shuffled)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty(count, dtype=torch.int64)
    rank[by_class] = torch.arange(count) - starts[shuffled[by_class]]
    position = (rank.double() + 0.5) / sizes[shuffled].double()
    return shuffle[torch.argsort(position, stable=True)]


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0-1 scale) of uint8 (N, C, H, W) images, from each channel's histogram (exact, no
    float copy of the images); a constant channel gets std 1."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        histogram = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        histogram /= histogram.sum()
        mean = float((histogram * values).sum())
        variance = float((histogram * (values - mean) ** 2).sum())
        means.append(mean)
        stds.append(variance ** 0.5 if variance > 0 else 1.0)
    return tuple(means), tuple(stds)
