"""Fixtures of the data tests: small dataset files in the real formats, and no default data location."""
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch


class DatasetFiles:
    """Small dataset files in the real formats: IDX (MNIST, Fashion-MNIST) and the CIFAR python pickles. Image
    ``i`` carries its number in its first two pixels, so tests can tell which images a split holds."""

    @staticmethod
    def idx_bytes(array: torch.Tensor) -> bytes:
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        return header + array.numpy().tobytes()

    def idx(self, path: Path, array: torch.Tensor) -> Path:
        """An IDX file of a uint8 array, gzipped when ``path`` ends in .gz."""
        raw = self.idx_bytes(array)
        path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
        return path

    @staticmethod
    def numbered_images(count: int, offset: int = 0) -> torch.Tensor:
        """uint8 (count, 28, 28) images whose first two pixels encode their number (offset + i)."""
        generator = torch.Generator().manual_seed(offset)
        images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        numbers = torch.arange(offset, offset + count)
        images[:, 0, 0], images[:, 0, 1] = (numbers % 256).to(torch.uint8), (numbers // 256).to(torch.uint8)
        return images

    @staticmethod
    def image_numbers(images: torch.Tensor) -> list[int]:
        """The numbers of (N, 1, 28, 28) images made by ``numbered_images``."""
        return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()

    def mnist_folder(self, folder: Path, train: int = 120, test: int = 40, suffix: str = ".gz") -> Path:
        """The four MNIST-format files: ``train`` training images (numbers 0..), ``test`` test images (1000..),
        label of image i = i % 10."""
        folder.mkdir(parents=True, exist_ok=True)
        self.idx(folder / f"train-images-idx3-ubyte{suffix}", self.numbered_images(train))
        self.idx(folder / f"train-labels-idx1-ubyte{suffix}", (torch.arange(train) % 10).to(torch.uint8))
        self.idx(folder / f"t10k-images-idx3-ubyte{suffix}", self.numbered_images(test, offset=1000))
        self.idx(folder / f"t10k-labels-idx1-ubyte{suffix}", (torch.arange(test) % 10).to(torch.uint8))
        return folder

    @staticmethod
    def cifar_batch(count: int, start: int, label_keys: dict[str, int]) -> dict:
        pixels = np.zeros((count, 3072), dtype=np.uint8)
        pixels[:, 0] = np.arange(start, start + count) % 256
        pixels[:, 1:] = np.random.default_rng(start).integers(0, 256, (count, 3071), dtype=np.uint8)
        labels = {key: [(start + i) % classes for i in range(count)] for key, classes in label_keys.items()}
        return {"data": pixels, **labels}

    def cifar_members(self, kind: str, per_batch: int = 4) -> dict[str, dict]:
        """The batches of a CIFAR-10 (5 × ``per_batch`` train) or CIFAR-100 (``kind`` "cifar100") python version."""
        if kind == "cifar10":
            members = {f"data_batch_{b}": self.cifar_batch(per_batch, (b - 1) * per_batch, {"labels": 10})
                       for b in range(1, 6)}
            return {**members, "test_batch": self.cifar_batch(per_batch, 200, {"labels": 10})}
        keys = {"fine_labels": 100, "coarse_labels": 20}
        return {"train": self.cifar_batch(5 * per_batch, 0, keys), "test": self.cifar_batch(per_batch, 200, keys),
                "meta": {}}

    def cifar(self, target: Path, kind: str, archive: bool = True, protocol: int = 2, **overrides: bytes) -> Path:
        """A CIFAR python version as the .tar.gz ``target`` or, ``archive=False``, extracted under ``target``;
        ``overrides`` replace members by raw bytes."""
        folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
        blobs = {name: pickle.dumps(batch, protocol=protocol) for name, batch in self.cifar_members(kind).items()}
        blobs.update(overrides)
        if not archive:
            (target / folder).mkdir(parents=True)
            for name, blob in blobs.items():
                (target / folder / name).write_bytes(blob)
            return target / folder
        with tarfile.open(target, "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return target


@pytest.fixture
def dataset_files() -> DatasetFiles:
    return DatasetFiles()


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    """Point every default search location of the file datasets at empty or missing folders."""
    monkeypatch.setenv("LRL_FASHION_MNIST", str(tmp_path / "env_empty"))
    monkeypatch.setenv("LRL_DATA_ROOT", str(tmp_path / "data_root_empty"))
    monkeypatch.setattr("lrlightning.app.data.mnist.DEBIAN_FASHION_MNIST", tmp_path / "no_debian_package")
