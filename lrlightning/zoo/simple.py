"""A tiny CNN for tests."""
from __future__ import annotations

from .blocks import LayoutCNN


class SimpleCNN(LayoutCNN):
    """Tiny CNN for tests: conv(width)-pool, conv(2·width)-pool, conv(4·width), each 3×3 with BN and ReLU, then
    global average pool and linear classifier. 24 k parameters at the default `width=16`.
    """

    LAYOUT = (1, "M", 2, "M", 4)

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__(num_classes, in_channels, width)
