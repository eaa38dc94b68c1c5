"""scikit-learn's digits: a test set fixed across seeds."""
import pytest
import torch


def test_digits_datamodule_keeps_a_fixed_test_set():
    pytest.importorskip("sklearn", reason="DigitsDataModule needs the `digits` extra (scikit-learn)")
    from lrlightning.app.data import DigitsDataModule

    first, other = DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    first.setup(None), other.setup(None)
    assert first.train_data[0].shape == (1797 - 360 - 180, 1, 8, 8) and first.train_data[0].dtype == torch.uint8
    assert first.train_data[0].max() == 255
    assert torch.equal(first.test_data[0], other.test_data[0])
    assert not torch.equal(first.val_data[0], other.val_data[0])
    x, _ = next(iter(first.val_dataloader()))
    assert x.shape == (128, 1, 8, 8) and abs(x.mean().item()) < 0.2
