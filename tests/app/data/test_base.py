"""ImageDataModule: the seeded train/val split, the loaders and their augmentation, the argument checks."""
import pytest
import torch

from lrlightning.app.data import FashionMNISTDataModule, SyntheticDataModule


def test_fashion_mnist_split_is_seeded_disjoint_and_keeps_the_test_set_apart(tmp_path, no_default_data,
                                                                             dataset_files):
    numbers = dataset_files.image_numbers
    root = dataset_files.mnist_folder(tmp_path / "fm", train=120, test=40)
    first = FashionMNISTDataModule(root=str(root), val_size=30, seed=1, download=False)
    again = FashionMNISTDataModule(root=str(root), val_size=30, seed=1, download=False)
    other = FashionMNISTDataModule(root=str(root), val_size=30, seed=2, download=False)
    for datamodule in (first, again, other):
        datamodule.setup("fit")
    train_ids, val_ids = numbers(first.train_data[0]), numbers(first.val_data[0])
    assert len(train_ids) == 90 and len(val_ids) == 30
    assert sorted(train_ids + val_ids) == list(range(120))
    assert val_ids == numbers(again.val_data[0])
    assert val_ids != numbers(other.val_data[0])
    assert first.val_data[1].tolist() == [i % 10 for i in val_ids]
    assert first.test_data is None
    first.setup("test")
    assert numbers(first.test_data[0]) == list(range(1000, 1040))


def test_train_batches_are_augmented_floats_and_eval_batches_are_deterministic(tmp_path, no_default_data,
                                                                               dataset_files):
    root = dataset_files.mnist_folder(tmp_path / "fm", train=120, test=40)
    datamodule = FashionMNISTDataModule(root=str(root), val_size=20, batch_size=32, download=False)
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (32,) and y.dtype == torch.int64
    assert [len(b[1]) for b in datamodule.train_dataloader()] == [32, 32, 32, 4]

    val_x, val_y = next(iter(datamodule.val_dataloader()))
    images, labels = datamodule.val_data
    torch.testing.assert_close(val_x, (images.float() / 255 - 0.2860) / 0.3530)
    assert torch.equal(val_y, labels)

    no_augment = FashionMNISTDataModule(root=str(root), val_size=20, batch_size=32, augment=False, download=False)
    no_augment.setup("fit")
    torch.manual_seed(0)
    images_a, labels_a = map(torch.cat, zip(*datamodule.train_dataloader()))
    torch.manual_seed(0)
    images_b, labels_b = map(torch.cat, zip(*no_augment.train_dataloader()))
    assert torch.equal(labels_a, labels_b)  # same order ...
    assert not torch.equal(images_a, images_b)  # ... so only the augmentation differs


def test_invalid_arguments_raise_value_errors_naming_them(tmp_path, no_default_data, dataset_files):
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1, got 0"):
        SyntheticDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"`val_size` must be an int >= 1, got -5"):
        FashionMNISTDataModule(val_size=-5)
    with pytest.raises(ValueError, match=r"`image_size` must be an int >= 8, got 4"):
        SyntheticDataModule(image_size=4)
    root = dataset_files.mnist_folder(tmp_path / "fm", train=50)
    with pytest.raises(ValueError, match=r"`val_size` must be smaller than the 50 training images of .*, got 50"):
        FashionMNISTDataModule(root=str(root), val_size=50, download=False).setup("fit")
