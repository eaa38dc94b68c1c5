"""LightningDataModules for the image datasets, held in memory as uint8 tensors, with batched augmentation.

| key | class | images, classes | source (environment variable) |
| --- | --- | --- | --- |
| `fashion_mnist` | `FashionMNISTDataModule` | 1×28×28, 10 | IDX files (`$LRL_FASHION_MNIST`), Debian package |
| `mnist` | `MNISTDataModule` | 1×28×28, 10 | IDX files (`$LRL_DATA_ROOT/mnist`) |
| `cifar10` | `CIFAR10DataModule` | 3×32×32, 10 | python archive or folder (`$LRL_DATA_ROOT/cifar10`) |
| `cifar100` | `CIFAR100DataModule` | 3×32×32, 100 | python archive or folder (`$LRL_DATA_ROOT/cifar100`) |
| `digits` | `DigitsDataModule` | 1×8×8, 10 | scikit-learn's bundled digits (extra `digits`) |
| `synthetic` | `SyntheticDataModule` | configurable | class templates plus noise, generated from `seed` |

File-based datasets are searched in this order: the `root` argument, the dataset's environment variable, the
system folder (Fashion-MNIST only: `/usr/share/datasets/fashion-mnist`), the download folder (`root`, else
`$LRL_DATA_ROOT/<key>`, else `~/.cache/lrlightning/<key>`). A folder may hold the files directly or in
torchvision's layout (`FashionMNIST/raw`, `MNIST/raw`). If none has them and `download=True`, they are
downloaded into the download folder; otherwise `DataNotFoundError` says where it looked and how to get them.

The training set is split into train/val with `seed` (`val_size` images for validation); the test set is
separate. Every dataloader yields (x float32 N×C×H×W normalized, y int64 N): its `collate_fn` turns a whole
uint8 batch into model-ready tensors at once, with random crop (zero padding 4 px for CIFAR, 2 px at 28 px,
1 px for digits) and, where it makes sense, horizontal flip, on training batches only when `augment=True`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .readers import read_cifar, read_idx

__all__ = [
    "DATAMODULES",
    "BatchTransform",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DataNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "download",
    "normalize",
    "random_crop",
    "random_horizontal_flip",
]

log = logging.getLogger(__name__)

FASHION_MNIST_ENV = "LRL_FASHION_MNIST"
DATA_ROOT_ENV = "LRL_DATA_ROOT"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_ROOT = Path("~/.cache/lrlightning")
DOWNLOAD_TIMEOUT_S = 60.0

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


class DataNotFoundError(FileNotFoundError):
    """A dataset is in none of the searched folders and could not be downloaded."""


def download(
    url: str, destination: str | os.PathLike, md5: str | None = None, timeout: float = DOWNLOAD_TIMEOUT_S
) -> Path:
    """Download `url` to `destination` and return its path; never leaves a partial file there.

    Streams into a temporary file next to `destination`, checks the MD5 when given, then renames it into place.
    `timeout` (seconds) bounds each network wait. Raises `OSError` (e.g. `urllib.error.URLError`) when offline,
    `ValueError` on an MD5 mismatch.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial_path = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise ValueError(f"{url}: MD5 {digest.hexdigest()} differs from the expected {md5} (incomplete or altered)")
        os.replace(partial_path, destination)
    except BaseException:
        Path(partial_path).unlink(missing_ok=True)
        raise
    return destination


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop each image of a (N, C, H, W) batch at a random offset after zero-padding it by `padding` px per side.

    Same shape and dtype out; `padding=0` returns the input.
    """
    if padding == 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)).permute(0, 2, 3, 1)
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    rows = top + torch.arange(height).view(1, height, 1)
    cols = left + torch.arange(width).view(1, 1, width)
    return padded[torch.arange(n).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)


def random_horizontal_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a (N, C, H, W) batch left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> contiguous float32 (x/255 - mean[c]) / std[c]."""
    scale = 255.0 * torch.tensor(std).view(1, -1, 1, 1)
    shift = 255.0 * torch.tensor(mean).view(1, -1, 1, 1)
    return images.to(torch.float32, memory_format=torch.contiguous_format).sub_(shift).div_(scale)


class BatchTransform:
    """Collate function: (uint8 images N×C×H×W, int64 labels N) -> (normalized float32 images, labels), with
    random crop (`crop_padding` px, 0 = none) and random horizontal flip (`flip`) applied to the whole batch."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], crop_padding: int = 0, flip: bool = False):
        self.mean, self.std, self.crop_padding, self.flip = tuple(mean), tuple(std), crop_padding, flip

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        images = random_crop(images, self.crop_padding)
        if self.flip:
            images = random_horizontal_flip(images)
        return normalize(images, self.mean, self.std), labels


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
        root: folder with the dataset files (None: search the defaults, see the module docstring).
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

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        download: bool = True,
    ):
        super().__init__()
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("val_size", val_size, minimum=1)
        _check_int("seed", seed, minimum=0)
        _check_int("num_workers", num_workers, minimum=0)
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


class _FileDataModule(ImageDataModule):
    """Dataset read from files found in a list of folders, downloaded into the first writable choice if absent."""

    key = "dataset"
    env_var = DATA_ROOT_ENV
    source_url = ""
    install_hint = ""

    def prepare_data(self) -> None:
        """Find the files, downloading them when absent and `download=True` (runs on one process per node)."""
        self._locate()

    def search_dirs(self) -> list[Path]:
        """Folders searched, in order."""
        dirs = [self.root] if self.root is not None else []
        if os.environ.get(self.env_var):
            dirs.append(self._env_dir())
        return dirs + self._system_dirs() + [self.download_dir()]

    def download_dir(self) -> Path:
        """Where downloads go: `root`, else `$LRL_DATA_ROOT/<key>`, else `~/.cache/lrlightning/<key>`."""
        if self.root is not None:
            return self.root
        return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT).expanduser() / self.key

    def find(self, folder: Path):
        """The dataset's files in `folder` (in the form `read` takes), or None."""
        raise NotImplementedError

    def fetch(self, folder: Path) -> None:
        """Download the dataset into `folder`."""
        raise NotImplementedError

    def read(self, found, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return self.read(self._locate(), train)

    def _env_dir(self) -> Path:
        value = Path(os.environ[self.env_var]).expanduser()
        return value / self.key if self.env_var == DATA_ROOT_ENV else value

    def _system_dirs(self) -> list[Path]:
        return []

    def _locate(self):
        searched = list(dict.fromkeys(self.search_dirs()))
        for folder in searched:
            found = self.find(folder)
            if found is not None:
                log.info("%s: using %s", self.name, folder)
                return found
        if not self.download:
            raise self._not_found(searched, "download disabled (download=False)")
        target = self.download_dir()
        try:
            self.fetch(target)
        except (OSError, ValueError) as error:
            raise self._not_found(searched, f"download from {self.source_url} failed: {error}") from error
        found = self.find(target)
        if found is None:
            raise self._not_found(searched, f"download into {target} did not produce the expected files")
        return found

    def _not_found(self, searched: list[Path], reason: str) -> DataNotFoundError:
        env_way = (
            f"set {self.env_var}=/path/to/folder"
            if self.env_var != DATA_ROOT_ENV
            else f"set {DATA_ROOT_ENV}=/path/to/parent, with the files in its `{self.key}` subfolder"
        )
        third_way = f"{self.install_hint}, or " if self.install_hint else ""
        return DataNotFoundError(
            f"{self.name} not found. Looked in: {', '.join(map(str, searched))}; {reason}.\n"
            f"Get it in one of three ways:\n"
            f"  1. pass root=/path/to/folder (lrl-train: +data.root=...) for a folder holding {self._expected_files()};\n"
            f"  2. {env_way};\n"
            f"  3. {third_way}run once online with download=True (fetches {self.source_url} into "
            f"{self.download_dir()})."
        )

    def _expected_files(self) -> str:
        raise NotImplementedError


class _IDXDataModule(_FileDataModule):
    """Dataset stored as the four MNIST-format IDX files (optionally .gz)."""

    in_channels, image_size, num_classes = 1, 28, 10
    crop_padding = 2
    md5: dict[str, str] = {}
    torchvision_subdir = ""

    def find(self, folder: Path) -> dict[str, Path] | None:
        for candidate in (folder, folder / self.torchvision_subdir / "raw"):
            files = {}
            for role, stem in IDX_FILES.items():
                existing = [p for p in (candidate / f"{stem}.gz", candidate / stem) if p.is_file()]
                if not existing:
                    break
                files[role] = existing[0]
            else:
                return files
        return None

    def fetch(self, folder: Path) -> None:
        for stem in IDX_FILES.values():
            if not (folder / f"{stem}.gz").is_file():
                download(self.source_url + f"{stem}.gz", folder / f"{stem}.gz", md5=self.md5.get(f"{stem}.gz"))

    def read(self, found: dict[str, Path], train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        split = "train" if train else "test"
        images_file, labels_file = found[f"{split}_images"], found[f"{split}_labels"]
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{images_file} and {labels_file} do not match: images {tuple(images.shape)} need (N, H, W), "
                f"labels {tuple(labels.shape)} need (N,) with the same N"
            )
        return images.unsqueeze(1), labels.to(torch.int64)

    def _expected_files(self) -> str:
        return ", ".join(f"{stem}.gz" for stem in IDX_FILES.values())


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST (Zalando): 60000 train + 10000 test grayscale 28×28 images of 10 clothing classes.

    Searched in `root`, `$LRL_FASHION_MNIST`, `/usr/share/datasets/fashion-mnist` (Debian's
    `dataset-fashion-mnist`), then the download folder; downloaded from Zalando's S3 bucket when online.
    Augmentation: random crop with 2 px padding, horizontal flip.
    """

    name, key = "Fashion-MNIST", "fashion_mnist"
    env_var = FASHION_MNIST_ENV
    source_url = FASHION_MNIST_URL
    md5 = FASHION_MNIST_MD5
    install_hint = f"sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu; files go to {DEBIAN_FASHION_MNIST})"
    torchvision_subdir = "FashionMNIST"
    mean, std = (0.2860,), (0.3530,)
    flip = True

    def _system_dirs(self) -> list[Path]:
        return [DEBIAN_FASHION_MNIST]


class MNISTDataModule(_IDXDataModule):
    """MNIST handwritten digits: 60000 train + 10000 test grayscale 28×28 images, 10 classes.

    Searched in `root`, `$LRL_DATA_ROOT/mnist`, then the download folder; downloaded from the PyTorch mirror
    used by torchvision. Augmentation: random crop with 2 px padding (no flip: digits are not symmetric).
    """

    name, key = "MNIST", "mnist"
    source_url = MNIST_URL
    md5 = MNIST_MD5
    torchvision_subdir = "MNIST"
    mean, std = (0.1307,), (0.3081,)


class CIFAR10DataModule(_FileDataModule):
    """CIFAR-10: 50000 train + 10000 test colour 32×32 images, 10 classes, from the official python version.

    `root` may be the `cifar-10-python.tar.gz` archive, the extracted `cifar-10-batches-py` folder, or a folder
    holding either (read directly from the archive, nothing is extracted). Searched then in
    `$LRL_DATA_ROOT/cifar10` and the download folder. Augmentation: random crop with 4 px padding, horizontal
    flip. The archive is unpickled with a restricted unpickler (numpy arrays and plain containers only).
    """

    name, key = "CIFAR-10", "cifar10"
    num_classes, in_channels, image_size = 10, 3, 32
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    crop_padding, flip = 4, True
    source_url, md5 = CIFAR10_URL, CIFAR10_MD5
    archive, folder = "cifar-10-python.tar.gz", "cifar-10-batches-py"
    marker = "test_batch"

    def find(self, folder: Path) -> Path | None:
        if folder.is_file() and folder.name.endswith((".tar.gz", ".tgz", ".tar")):
            return folder
        for candidate in (folder / self.folder, folder):
            if (candidate / self.marker).is_file():
                return candidate
        return folder / self.archive if (folder / self.archive).is_file() else None

    def fetch(self, folder: Path) -> None:
        download(self.source_url, folder / self.archive, md5=self.md5)

    def read(self, found: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return read_cifar(found, train=train)

    def _expected_files(self) -> str:
        return f"{self.archive} or the extracted {self.folder}/"


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: 50000 train + 10000 test colour 32×32 images, 100 fine classes (`coarse=True`: the 20
    superclasses). Same sources and augmentation as `CIFAR10DataModule`, with `cifar-100-python.tar.gz` /
    `cifar-100-python` and `$LRL_DATA_ROOT/cifar100`.
    """

    name, key = "CIFAR-100", "cifar100"
    num_classes = 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    source_url, md5 = CIFAR100_URL, CIFAR100_MD5
    archive, folder = "cifar-100-python.tar.gz", "cifar-100-python"
    marker = "test"

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        download: bool = True,
        coarse: bool = False,
    ):
        super().__init__(root, batch_size, val_size, seed, num_workers, augment, download)
        self.coarse = coarse
        self.num_classes = 20 if coarse else 100

    def read(self, found: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return read_cifar(found, train=train, coarse=self.coarse)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes; needs the `digits` extra).

    A fixed set of 360 images is the test set (the same for every `seed`); `val_size` (default 180) more are
    held out from the rest. Pixel values 0..16 are scaled to 0..255. `root` and `download` are unused.
    Augmentation: random crop with 1 px padding, no flip.
    """

    name = "digits"
    num_classes, in_channels, image_size = 10, 1, 8
    mean, std = (0.3053,), (0.3759,)
    crop_padding = 1
    test_size = 360

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 180,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        download: bool = True,
    ):
        super().__init__(root, batch_size, val_size, seed, num_workers, augment, download)

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError("DigitsDataModule needs scikit-learn: pip install 'lrlightning[digits]'") from error
        digits = load_digits()
        images = torch.as_tensor(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        chosen = order[: self.test_size] if not train else order[self.test_size :]
        return images[chosen], labels[chosen]


class SyntheticDataModule(ImageDataModule):
    """Random images for tests: each class has a random template (4×4 blocks, mirror-symmetric, so crops and flips
    keep the class); an image is 0.5·template + 0.5·uniform noise. `num_samples` training images (of which
    `val_size` go to validation) and `val_size` test images, all generated from `seed`. `root` and `download` are
    unused.
    """

    name = "synthetic"
    mean, std = (0.5,), (0.2,)
    flip = True

    def __init__(
        self,
        num_samples: int = 512,
        image_size: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        download: bool = True,
    ):
        super().__init__(root, batch_size, val_size, seed, num_workers, augment, download)
        _check_int("num_samples", num_samples, minimum=2)
        _check_int("image_size", image_size, minimum=8)
        _check_int("in_channels", in_channels, minimum=1)
        _check_int("num_classes", num_classes, minimum=2)
        self.num_samples, self.image_size, self.in_channels, self.num_classes = (
            num_samples,
            image_size,
            in_channels,
            num_classes,
        )
        self.mean, self.std = (0.5,) * in_channels, (0.2,) * in_channels
        self.crop_padding = max(1, image_size // 8)

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        shape = (self.in_channels, self.image_size, self.image_size)
        half = torch.randint(0, 256, (self.num_classes, self.in_channels, 4, 2), generator=generator).float()
        coarse = torch.cat([half, half.flip(-1)], dim=-1)
        templates = F.interpolate(coarse, size=shape[1:], mode="nearest").long()
        if not train:
            generator.manual_seed(self.seed + 1)
        count = self.num_samples if train else self.val_size
        labels = torch.randint(0, self.num_classes, (count,), generator=generator)
        noise = torch.randint(0, 256, (count, *shape), generator=generator)
        return ((templates[labels] + noise) // 2).to(torch.uint8), labels


DATAMODULES: dict[str, type[ImageDataModule]] = {
    "fashion_mnist": FashionMNISTDataModule,
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "digits": DigitsDataModule,
    "synthetic": SyntheticDataModule,
}


def _check_int(argument: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{argument}` must be an int >= {minimum}, got {value!r}")
