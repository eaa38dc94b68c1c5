"""The CIFAR datamodules on small archives."""
import torch

from lrlightning.app.data import CIFAR100DataModule, CIFAR10DataModule


def test_cifar_datamodules_read_small_archives(tmp_path, dataset_files):
    archive = dataset_files.cifar(tmp_path / "cifar-10-python.tar.gz", "cifar10")
    cifar10 = CIFAR10DataModule(root=str(tmp_path), val_size=5, batch_size=8, download=False)
    cifar10.setup("fit")
    x, y = next(iter(cifar10.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(cifar10.val_data[1]) == 5 and len(cifar10.train_data[1]) == 15
    assert CIFAR10DataModule(root=str(archive), val_size=5, download=False).load(train=False)[0].shape[0] == 4

    dataset_files.cifar(tmp_path / "c100", "cifar100", archive=False)
    coarse = CIFAR100DataModule(root=str(tmp_path / "c100"), val_size=5, coarse=True, download=False)
    coarse.setup("test")
    assert coarse.num_classes == 20 and coarse.test_data[1].tolist() == [0, 1, 2, 3]
