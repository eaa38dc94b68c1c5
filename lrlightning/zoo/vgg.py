"""VGG-11 with BatchNorm for small images."""
from __future__ import annotations

from functools import partial

from torch import nn

from .blocks import LayoutCNN


class CifarVGG(LayoutCNN):
    """VGG-11 with BatchNorm for small images: eight 3×3 conv-BN-ReLU layers (width, 2·width, 4·width×2,
    8·width×4 channels) with four 2×2 max-pools (ceil mode, so 8 px inputs work), global average pool and one
    linear classifier. 9.2 M parameters at the default `width=64`.
    """

    LAYOUT = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8)
    ACT = partial(nn.ReLU, inplace=True)

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__(num_classes, in_channels, width)
