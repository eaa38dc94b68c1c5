"""Batched augmentation and normalization of uint8 image batches: what a dataloader's ``collate_fn`` applies to a
whole (N, C, H, W) batch at once."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Crop each image of a (N, C, H, W) batch at a random offset after zero-padding it by `padding` px per side.

    Same shape and dtype out; `padding=0` returns the input.
    """
    if padding == 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)).permute(0, 2, 3, 1)
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    rows = top + torch.arange(height).view(1, height, 1)
    cols = left + torch.arange(width).view(1, 1, width)
    return padded[torch.arange(n).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)


def random_horizontal_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of a (N, C, H, W) batch left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) in [0, 255] -> contiguous float32 (x/255 - mean[c]) / std[c]."""
    scale = 255.0 * torch.tensor(std).view(1, -1, 1, 1)
    shift = 255.0 * torch.tensor(mean).view(1, -1, 1, 1)
    return images.to(torch.float32, memory_format=torch.contiguous_format).sub_(shift).div_(scale)


class BatchTransform:
    """Collate function: (uint8 images N×C×H×W, int64 labels N) -> (normalized float32 images, labels), with
    random crop (`crop_padding` px, 0 = none) and random horizontal flip (`flip`) applied to the whole batch."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], crop_padding: int = 0, flip: bool = False):
        self.mean, self.std, self.crop_padding, self.flip = tuple(mean), tuple(std), crop_padding, flip

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        images = random_crop(images, self.crop_padding)
        if self.flip:
            images = random_horizontal_flip(images)
        return normalize(images, self.mean, self.std), labels
