"""The IDX datamodules: broken files named, and the real Fashion-MNIST when the Debian package is installed."""
import pytest
import torch

import lrlightning.app.data.mnist as mnist_module
from lrlightning.app.data import FashionMNISTDataModule


def test_truncated_file_in_a_datamodule_names_it_and_loads_nothing(tmp_path, no_default_data, dataset_files):
    root = dataset_files.mnist_folder(tmp_path / "fm", suffix="")
    labels = root / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    datamodule = FashionMNISTDataModule(root=str(root), val_size=10, download=False)
    with pytest.raises(ValueError, match=rf"{labels}: truncated"):
        datamodule.setup("fit")
    assert datamodule.train_data is None and datamodule.val_data is None


def test_mismatched_image_and_label_counts_are_reported(tmp_path, no_default_data, dataset_files):
    root = dataset_files.mnist_folder(tmp_path / "fm")
    dataset_files.idx(root / "train-labels-idx1-ubyte.gz", torch.zeros(119, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz and .*train-labels-idx1-ubyte.gz do not match"):
        FashionMNISTDataModule(root=str(root), val_size=10, download=False).setup("fit")


@pytest.mark.skipif(
    not mnist_module.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_real_fashion_mnist_from_the_debian_package():
    datamodule = FashionMNISTDataModule(download=False)
    datamodule.setup("fit")
    datamodule.setup("test")
    assert datamodule.train_data[0].shape == (55000, 1, 28, 28) and datamodule.val_data[0].shape == (5000, 1, 28, 28)
    assert datamodule.test_data[0].shape == (10000, 1, 28, 28)
    assert torch.bincount(datamodule.test_data[1]).tolist() == [1000] * 10
    x, _ = next(iter(datamodule.val_dataloader()))
    assert abs(x.mean().item()) < 0.1 and 0.9 < x.std().item() < 1.1
