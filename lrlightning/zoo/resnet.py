"""ResNets of He et al. 2016: the CIFAR ResNet-20 … 110 (§4.2) and the ImageNet ResNet-18/50 (Table 1), their
basic and bottleneck blocks and the parameter-free shortcut (option A)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import PooledClassifier, check_network_arguments, projection_shortcut
from .resnext import ResNeXtBlock

SHORTCUTS = ("A", "B")


class ChannelPadShortcut(nn.Module):
    """Parameter-free shortcut (option A): subsample by `stride`, zero-pad channels from `in_channels` to
    `out_channels` (half before, half after)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    The shortcut is the identity when shape is kept; otherwise option "A" (zero-padded identity, no parameters)
    or "B" (1×1 conv + BN projection).
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ChannelPadShortcut(in_channels, out_channels, stride)
        elif shortcut == "B":
            self.shortcut = projection_shortcut(in_channels, out_channels, stride)
        else:
            raise ValueError(f"`shortcut` must be one of {list(SHORTCUTS)}, got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(ResNeXtBlock):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand conv-BN layers plus a shortcut:
    relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)), with `out_channels / 4` channels inside:
    a `ResNeXtBlock` with one group.

    The shortcut is the identity when shape is kept, otherwise a 1×1 conv + BN projection (option "B").
    """

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        if out_channels % self.expansion:
            raise ValueError(f"`out_channels` must be a multiple of {self.expansion}, got {out_channels!r}")
        super().__init__(in_channels, out_channels // self.expansion, out_channels, stride, groups=1)


class CifarResNet(PooledClassifier):
    """CIFAR ResNet of He et al. 2016 (§4.2): depth 6n+2, three stages of n `BasicBlock`s with `width`, 2·width
    and 4·width channels (stride 1, 2, 2), global average pool, linear classifier.

    `shortcut="A"` (default, as in the paper's CIFAR runs) adds no parameters: ResNet-20/32/44/56/110 have
    0.27/0.46/0.66/0.85/1.7 M parameters. `shortcut="B"` uses 1×1 conv + BN projections where the shape changes
    (a few thousand parameters more). Input: (N, in_channels, H, W) with H, W >= 8; output: (N, num_classes) logits.
    """

    def __init__(
        self, depth: int, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A", width: int = 16
    ):
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"`depth` must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"`shortcut` must be one of {list(SHORTCUTS)}, got {shortcut!r}")
        check_network_arguments(num_classes, in_channels, width)
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _stage(width, width, blocks_per_stage, 1, shortcut)
        self.layer2 = _stage(width, 2 * width, blocks_per_stage, 2, shortcut)
        self.layer3 = _stage(2 * width, 4 * width, blocks_per_stage, 2, shortcut)
        self.add_classifier(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.classify(self.layer3(self.layer2(self.layer1(x))))


class ImageNetResNet(PooledClassifier):
    """ImageNet ResNet of He et al. 2016 (Table 1): 7×7 stride-2 conv-BN-ReLU stem with `width` channels, 3×3
    stride-2 max-pool, four stages of blocks with `width`, 2·, 4·, 8·`width` channels (times 4 for bottleneck
    blocks) and stride 1, 2, 2, 2 on the first block's 3×3 conv, global average pool, linear classifier.

    `depth` 18 uses `BasicBlock`s [2, 2, 2, 2], 50 uses `Bottleneck`s [3, 4, 6, 3]; shortcuts are 1×1 conv + BN
    projections where the shape changes (option B). At 1000 classes and `width=64`: 11,689,512 and 25,557,032
    parameters, as torchvision's `resnet18` and `resnet50`. Input: (N, in_channels, H, W), 224×224 px for the
    ImageNet setting (total stride 32); output: (N, num_classes) logits.
    """

    LAYOUTS = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}

    def __init__(self, depth: int, num_classes: int = 1000, in_channels: int = 3, width: int = 64):
        super().__init__()
        if depth not in self.LAYOUTS:
            raise ValueError(f"`depth` must be one of {list(self.LAYOUTS)}, got {depth!r}")
        check_network_arguments(num_classes, in_channels, width)
        block, blocks_per_stage = self.LAYOUTS[depth]
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = width
        for index, blocks in enumerate(blocks_per_stage):
            out_channels = width * 2**index * block.expansion
            blocks_of_stage = [_block(block, channels if i == 0 else out_channels, out_channels,
                                      2 if i == 0 and index > 0 else 1) for i in range(blocks)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks_of_stage))
            channels = out_channels
        self.add_classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.classify(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
    first = BasicBlock(in_channels, out_channels, stride, shortcut)
    return nn.Sequential(first, *(BasicBlock(out_channels, out_channels, 1, shortcut) for _ in range(blocks - 1)))


def _block(block: type[nn.Module], in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if block is BasicBlock:
        return BasicBlock(in_channels, out_channels, stride, shortcut="B")
    return block(in_channels, out_channels, stride)
