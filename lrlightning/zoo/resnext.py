"""Small ResNeXt (Xie et al. 2017) for CIFAR / Fashion-MNIST sized images, and its grouped bottleneck block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import PooledClassifier, check_positive_int, projection_shortcut


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck (Xie et al. 2017, Fig. 3c): 1×1 reduce to `bottleneck_width`, 3×3 conv in `groups`
    groups carrying the stride, 1×1 expand to `out_channels`, each with BN (ReLU after the first two), plus a
    shortcut: relu(bn3(conv3(...)) + shortcut(x)). The shortcut is the identity when shape is kept, otherwise a
    1×1 conv + BN projection.
    """

    def __init__(self, in_channels: int, bottleneck_width: int, out_channels: int, stride: int = 1, groups: int = 8):
        super().__init__()
        check_positive_int("groups", groups)
        if bottleneck_width % groups:
            raise ValueError(f"`bottleneck_width` must be a multiple of `groups` ({groups}), got {bottleneck_width!r}")
        self.conv1 = nn.Conv2d(in_channels, bottleneck_width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(bottleneck_width)
        self.conv2 = nn.Conv2d(bottleneck_width, bottleneck_width, 3, stride=stride, padding=1, groups=groups,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck_width)
        self.conv3 = nn.Conv2d(bottleneck_width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNeXt(PooledClassifier):
    """Small ResNeXt for CIFAR / Fashion-MNIST sized images: 3×3 conv-BN-ReLU stem to `width` channels, three
    stages of `blocks` `ResNeXtBlock`s with bottleneck widths `width`, 2·, 4·`width` split into `cardinality`
    groups (group widths 8/16/32 at the defaults), outputs 2·, 4·, 8·`width` channels, stride 1, 2, 2 on each
    stage's first block, global average pool, linear classifier.

    `width` must be a multiple of `cardinality`. 0.54 M parameters at the defaults (`width=64`, `cardinality=8`,
    `blocks=1`, 10 classes). Input: (N, in_channels, H, W) with H, W >= 4; output: (N, num_classes) logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cardinality: int = 8, blocks: int = 1,
                 width: int = 64):
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("cardinality", cardinality)
        check_positive_int("blocks", blocks)
        check_positive_int("width", width)
        if width % cardinality:
            raise ValueError(f"`width` must be a multiple of `cardinality` ({cardinality}) so each grouped 3×3 conv "
                             f"splits evenly, got width={width!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = width
        for index in range(3):
            inner, out_channels = width * 2**index, 2 * width * 2**index
            stage = [ResNeXtBlock(channels if i == 0 else out_channels, inner, out_channels,
                                  2 if i == 0 and index > 0 else 1, cardinality) for i in range(blocks)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
            channels = out_channels
        self.add_classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.classify(self.layer3(self.layer2(self.layer1(x))))
