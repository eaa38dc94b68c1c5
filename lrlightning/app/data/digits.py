"""scikit-learn's bundled 8×8 handwritten digits (extra `digits`)."""
from __future__ import annotations

import torch

from .base import ImageDataModule


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes; needs the `digits` extra).

    A fixed set of 360 images is the test set (the same for every `seed`); `val_size` (default 180) more are
    held out from the rest. Pixel values 0..16 are scaled to 0..255. `root` and `download` are unused.
    Augmentation: random crop with 1 px padding, no flip.
    """

    name = "digits"
    num_classes, in_channels, image_size = 10, 1, 8
    mean, std = (0.3053,), (0.3759,)
    crop_padding = 1
    test_size = 360

    def __init__(self, *args, val_size: int = 180, **kwargs):
        """The arguments of `ImageDataModule`, with 180 validation images by default."""
        super().__init__(*args, val_size=val_size, **kwargs)

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError("DigitsDataModule needs scikit-learn: pip install 'lrlightning[digits]'") from error
        digits = load_digits()
        images = torch.as_tensor(digits.images * (255 / 16)).round().to(torch.uint8).unsqueeze(1)
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        chosen = order[: self.test_size] if not train else order[self.test_size :]
        return images[chosen], labels[chosen]
