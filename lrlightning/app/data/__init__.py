"""The image datamodules of the application (``conf/data/``) and the readers of their file formats."""
from .datamodules import (
    DATAMODULES,
    DEBIAN_FASHION_MNIST,
    BatchTransform,
    CIFAR100DataModule,
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    MNISTDataModule,
    SyntheticDataModule,
    download,
    normalize,
    random_crop,
    random_horizontal_flip,
)
