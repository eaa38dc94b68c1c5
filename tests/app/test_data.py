"""The registry of datamodules and the shape of their images."""

from lrlightning.app.data import DATAMODULES


def test_properties_and_registry():
    expected = {
        "fashion_mnist": (10, 1, 28),
        "mnist": (10, 1, 28),
        "cifar10": (10, 3, 32),
        "cifar100": (100, 3, 32),
        "digits": (10, 1, 8),
        "synthetic": (10, 3, 32),
        "cifar10_jpeg": (10, 3, 32),
    }
    assert set(DATAMODULES) == set(expected) | {"image_folder"}  # needs a root: tests/app/data/test_image_folder.py
    for key, properties in expected.items():
        datamodule = DATAMODULES[key]()
        assert (datamodule.num_classes, datamodule.in_channels, datamodule.image_size) == properties
