"""CIFAR-10 and CIFAR-100 from the official python version: 3×32×32 colour images."""
from __future__ import annotations

from pathlib import Path

import torch

from .downloads import download
from .files import FileDataModule
from .readers import read_cifar

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


class CIFAR10DataModule(FileDataModule):
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

    def __init__(self, *args, coarse: bool = False, **kwargs):
        """`coarse`: label the 20 superclasses (default False: the 100 classes); the other arguments are
        `ImageDataModule`'s."""
        super().__init__(*args, **kwargs)
        self.coarse = coarse
        self.num_classes = 20 if coarse else 100

    def read(self, found: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return read_cifar(found, train=train, coarse=self.coarse)
