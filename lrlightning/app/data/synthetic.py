"""Random images of class templates plus noise, generated from a seed: data for tests, no files needed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ImageDataModule, check_int


class SyntheticDataModule(ImageDataModule):
    """Random images for tests: each class has a random template (4×4 blocks, mirror-symmetric, so crops and flips
    keep the class); an image is 0.5·template + 0.5·uniform noise. `num_samples` training images (of which
    `val_size` go to validation) and `val_size` test images, all generated from `seed`. `root` and `download` are
    unused.
    """

    name = "synthetic"
    mean, std = (0.5,), (0.2,)
    flip = True

    def __init__(
        self,
        num_samples: int = 512,
        image_size: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        root: str | None = None,
        batch_size: int = 128,
        val_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        augment: bool = True,
        download: bool = True,
    ):
        super().__init__(root, batch_size, val_size, seed, num_workers, augment, download)
        check_int("num_samples", num_samples, minimum=2)
        check_int("image_size", image_size, minimum=8)
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=2)
        self.num_samples, self.image_size, self.in_channels, self.num_classes = (
            num_samples,
            image_size,
            in_channels,
            num_classes,
        )
        self.mean, self.std = (0.5,) * in_channels, (0.2,) * in_channels
        self.crop_padding = max(1, image_size // 8)

    def load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        shape = (self.in_channels, self.image_size, self.image_size)
        half = torch.randint(0, 256, (self.num_classes, self.in_channels, 4, 2), generator=generator).float()
        coarse = torch.cat([half, half.flip(-1)], dim=-1)
        templates = F.interpolate(coarse, size=shape[1:], mode="nearest").long()
        if not train:
            generator.manual_seed(self.seed + 1)
        count = self.num_samples if train else self.val_size
        labels = torch.randint(0, self.num_classes, (count,), generator=generator)
        noise = torch.randint(0, 256, (count, *shape), generator=generator)
        return ((templates[labels] + noise) // 2).to(torch.uint8), labels
