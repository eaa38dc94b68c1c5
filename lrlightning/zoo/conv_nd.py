"""CNNs on 1-D sequences and 3-D clips."""
from __future__ import annotations

import torch

from .blocks import LayoutCNN


class Conv1dNet(LayoutCNN):
    """M5-style 1-D CNN (Dai et al. 2017) for audio / time series: Conv1d(in_channels, width, 9, stride 2)-BN-ReLU,
    then three stages of a k=3 Conv1d-BN-ReLU (width, 2·width, 4·width channels) and a 2× max-pool (ceil mode),
    the middle stage with an extra 1×1 Conv1d-BN-ReLU, global average pool, linear classifier. 40 k parameters at
    the default `width=32`, 1 input channel, 10 classes.

    Input: (N, in_channels, L) of any length L >= 1, or an image batch (N, in_channels, H, W), read as the pixel
    sequence (N, in_channels, H·W) in row-major order (so a Fashion-MNIST batch is 784 steps long). Output:
    (N, num_classes) logits.
    """

    DIMS = 1
    LAYOUT = ((1, 9, 2), (1, 3), "M", (2, 3), (2, 1), "M", (4, 3), "M")

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__(num_classes, in_channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = torch.flatten(x, 2)
        elif x.dim() != 3:
            raise ValueError(f"input must be (N, C, L) or (N, C, H, W), got shape {tuple(x.shape)}")
        return super().forward(x)


class Conv3dNet(LayoutCNN):
    """Small 3-D CNN for video clips: Conv3d 3×3×3 to `width` channels, Conv3d 3×3×3 stride 2 to 2·width, Conv3d
    1×1×1 (pointwise) at 2·width, Conv3d 3×3×3 stride 2 to 4·width, each with BN and ReLU, global average pool,
    linear classifier. 72 k parameters at the default `width=16`, 3 input channels, 10 classes.

    Input: (N, in_channels, D, H, W), e.g. 8 frames of 32×32 px (total stride 4 in all three dimensions);
    output: (N, num_classes) logits.
    """

    DIMS = 3
    LAYOUT = ((1, 3), (2, 3, 2), (2, 1), (4, 3, 2))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__(num_classes, in_channels, width)
