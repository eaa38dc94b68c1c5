"""Where the file datasets are searched, and the one error that says where it looked and how to get them."""
import urllib.error
import urllib.request

import pytest
import torch

import lrlightning.app.data.mnist as mnist_module
from lrlightning.app.data import DataNotFoundError, FashionMNISTDataModule, MNISTDataModule


def test_missing_fashion_mnist_gives_one_error_with_the_three_ways(tmp_path, no_default_data):
    datamodule = FashionMNISTDataModule(root=str(tmp_path / "empty_root"), download=False)
    with pytest.raises(DataNotFoundError) as error:
        datamodule.prepare_data()
    message = str(error.value)
    assert "Fashion-MNIST not found" in message and "download disabled (download=False)" in message
    assert "root=/path/to/folder" in message
    assert "LRL_FASHION_MNIST=" in message
    assert "apt-get install dataset-fashion-mnist" in message and "download=True" in message
    assert str(tmp_path / "empty_root") in message and str(tmp_path / "no_debian_package") in message
    with pytest.raises(DataNotFoundError):
        datamodule.setup("fit")
    assert datamodule.train_data is None


def test_failed_download_gives_the_same_error_and_leaves_no_files(tmp_path, no_default_data, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "root"
    expected = r"(?s)download from http://fashion-mnist.*failed: .*no network.*three ways"
    with pytest.raises(DataNotFoundError, match=expected):
        FashionMNISTDataModule(root=str(root)).prepare_data()
    assert not root.exists() or list(root.iterdir()) == []


def test_search_order_root_then_env_then_system_folder(tmp_path, no_default_data, monkeypatch, dataset_files):
    debian = dataset_files.mnist_folder(tmp_path / "debian", train=30)
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_MNIST", debian)
    assert FashionMNISTDataModule(root=str(tmp_path / "empty"), download=False).load(train=True)[0].shape[0] == 30

    env = dataset_files.mnist_folder(tmp_path / "env", train=20, suffix="")
    monkeypatch.setenv("LRL_FASHION_MNIST", str(env))
    assert FashionMNISTDataModule(download=False).load(train=True)[0].shape[0] == 20

    dataset_files.mnist_folder(tmp_path / "root" / "FashionMNIST" / "raw", train=10)  # torchvision's layout
    assert FashionMNISTDataModule(root=str(tmp_path / "root"), download=False).load(train=True)[0].shape[0] == 10


def test_mnist_uses_the_data_root_subfolder(tmp_path, no_default_data, monkeypatch, dataset_files):
    monkeypatch.setenv("LRL_DATA_ROOT", str(tmp_path))
    dataset_files.mnist_folder(tmp_path / "mnist", train=25)
    images, labels = MNISTDataModule(download=False).load(train=True)
    assert images.shape == (25, 1, 28, 28) and labels.dtype == torch.int64
