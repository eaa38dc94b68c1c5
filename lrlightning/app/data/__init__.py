"""LightningDataModules for the image datasets, held in memory as uint8 tensors, with batched augmentation.

| key | class | images, classes | source (environment variable) |
| --- | --- | --- | --- |
| `fashion_mnist` | `FashionMNISTDataModule` | 1×28×28, 10 | IDX files (`$LRL_FASHION_MNIST`), Debian package |
| `mnist` | `MNISTDataModule` | 1×28×28, 10 | IDX files (`$LRL_DATA_ROOT/mnist`) |
| `cifar10` | `CIFAR10DataModule` | 3×32×32, 10 | python archive or folder (`$LRL_DATA_ROOT/cifar10`) |
| `cifar100` | `CIFAR100DataModule` | 3×32×32, 100 | python archive or folder (`$LRL_DATA_ROOT/cifar100`) |
| `digits` | `DigitsDataModule` | 1×8×8, 10 | scikit-learn's bundled digits (extra `digits`) |
| `synthetic` | `SyntheticDataModule` | configurable | class templates plus noise, generated from `seed` |
| `image_folder` | `ImageFolderDataModule` | configurable, one per class folder | JPEG/PNG/WebP class folders (`root`) |
| `cifar10_jpeg` | `CIFAR10JPEGDataModule` | 3×32×32, 10 | JPEG class folders, tar archive (`$LRL_CIFAR10_JPEG`) |

Where the file-based datasets are searched: `files`; the split and the loaders: `base`; augmentation:
`transforms` (random crop with zero padding 4 px for CIFAR, 2 px at 28 px, 1 px for digits). Image folders:
`folders` (layouts), `decode` (parallel decoding), `image_cache` (the uint8 decode cache), `archives` (extraction).
"""
from .base import ImageDataModule
from .cifar import CIFAR100DataModule, CIFAR10DataModule
from .cifar10_jpeg import CIFAR10JPEGDataModule
from .digits import DigitsDataModule
from .downloads import download
from .files import DataNotFoundError
from .image_folder import ImageFolderDataModule
from .mnist import DEBIAN_FASHION_MNIST, FashionMNISTDataModule, MNISTDataModule
from .synthetic import SyntheticDataModule
from .transforms import BatchTransform, normalize, random_crop, random_horizontal_flip

__all__ = [
    "DATAMODULES",
    "DEBIAN_FASHION_MNIST",
    "BatchTransform",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "CIFAR10JPEGDataModule",
    "DataNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "SyntheticDataModule",
    "download",
    "normalize",
    "random_crop",
    "random_horizontal_flip",
]

DATAMODULES: dict[str, type[ImageDataModule]] = {
    "fashion_mnist": FashionMNISTDataModule,
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
    "cifar100": CIFAR100DataModule,
    "digits": DigitsDataModule,
    "synthetic": SyntheticDataModule,
    "image_folder": ImageFolderDataModule,
    "cifar10_jpeg": CIFAR10JPEGDataModule,
}
