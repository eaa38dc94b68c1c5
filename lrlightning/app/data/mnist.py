"""The IDX datasets (MNIST format): Fashion-MNIST and MNIST, 1×28×28 images of 10 classes."""
from __future__ import annotations

from pathlib import Path

import torch

from .downloads import download
from .files import FileDataModule
from .readers import read_idx

FASHION_MNIST_ENV = "LRL_FASHION_MNIST"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

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


class _IDXDataModule(FileDataModule):
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
