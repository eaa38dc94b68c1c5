"""Synthetic images: reproducible from the seed, sized as asked."""
import torch

from lrlightning.app.data import SyntheticDataModule


def test_synthetic_datamodule_is_reproducible_and_sized(tmp_path):
    first = SyntheticDataModule(num_samples=100, image_size=10, in_channels=2, num_classes=4, val_size=20)
    second = SyntheticDataModule(num_samples=100, image_size=10, in_channels=2, num_classes=4, val_size=20)
    first.setup(None), second.setup(None)
    assert first.train_data[0].shape == (80, 2, 10, 10) and first.test_data[0].shape == (20, 2, 10, 10)
    assert torch.equal(first.train_data[0], second.train_data[0])
    assert not torch.equal(first.test_data[0][:20], first.val_data[0])
    x, _ = next(iter(first.train_dataloader()))
    assert x.shape == (80, 2, 10, 10) and x.dtype == torch.float32
