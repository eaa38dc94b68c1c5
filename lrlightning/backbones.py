"""CNN backbones that need only torch, built by name: `build_backbone("resnet20", num_classes=10, in_channels=1)`.

| name | network | params |
| --- | --- | --- |
| `resnet20` … `resnet110` | CIFAR ResNet-20/32/44/56/110 (He et al. 2016, §4.2), shortcut A | 0.27–1.7 M, 10 classes |
| `resnet18`, `resnet50` | ImageNet ResNet-18/50 (He et al. 2016, Table 1), shortcut B | 11.7, 25.6 M, 1000 classes |
| `vgg` | VGG-11 with BatchNorm and one linear classifier | 9.2 M, 10 classes |
| `simple_cnn` | three conv-BN-ReLU layers, for tests | 24 k, 10 classes |

All take `num_classes`, `in_channels` and a `width` keyword (channels of the first stage), and end in a global
average pool, so any input of at least 8×8 px works. Other models (e.g. torchvision's, with the `vision` extra)
plug into `LitClassifier` as any `nn.Module`, for instance through Hydra
`backbone: {_target_: torchvision.models.resnet18, num_classes: 10}`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BACKBONES", "BasicBlock", "Bottleneck", "CifarResNet", "CifarVGG", "ImageNetResNet", "SimpleCNN",
           "build_backbone"]

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
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            raise ValueError(f"`shortcut` must be one of {list(SHORTCUTS)}, got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand conv-BN layers plus a shortcut:
    relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)), with `out_channels / 4` channels inside.

    The shortcut is the identity when shape is kept, otherwise a 1×1 conv + BN projection (option "B").
    """

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        if out_channels % self.expansion:
            raise ValueError(f"`out_channels` must be a multiple of {self.expansion}, got {out_channels!r}")
        inner = out_channels // self.expansion
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
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
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("width", width)
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = _stage(width, width, blocks_per_stage, 1, shortcut)
        self.layer2 = _stage(width, 2 * width, blocks_per_stage, 2, shortcut)
        self.layer3 = _stage(2 * width, 4 * width, blocks_per_stage, 2, shortcut)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ImageNetResNet(nn.Module):
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
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("width", width)
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
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class CifarVGG(nn.Module):
    """VGG-11 with BatchNorm for small images: eight 3×3 conv-BN-ReLU layers (width, 2·width, 4·width×2,
    8·width×4 channels) with four 2×2 max-pools (ceil mode, so 8 px inputs work), global average pool and one
    linear classifier. 9.2 M parameters at the default `width=64`.
    """

    LAYOUT = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8)

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("width", width)
        layers: list[nn.Module] = []
        channels = in_channels
        for item in self.LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, item * width, 3, padding=1, bias=False), nn.BatchNorm2d(item * width)]
                layers.append(nn.ReLU(inplace=True))
                channels = item * width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class SimpleCNN(nn.Module):
    """Tiny CNN for tests: conv(width)-pool, conv(2·width)-pool, conv(4·width), each 3×3 with BN and ReLU, then
    global average pool and linear classifier. 24 k parameters at the default `width=16`.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("width", width)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(2 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": partial(CifarResNet, 20),
    "resnet32": partial(CifarResNet, 32),
    "resnet44": partial(CifarResNet, 44),
    "resnet56": partial(CifarResNet, 56),
    "resnet110": partial(CifarResNet, 110),
    "resnet18": partial(ImageNetResNet, 18),
    "resnet50": partial(ImageNetResNet, 50),
    "vgg": CifarVGG,
    "simple_cnn": SimpleCNN,
}


def build_backbone(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the registered backbone `name` (see `BACKBONES`) with `num_classes` outputs for `in_channels`-channel
    images; `kwargs` go to its constructor (e.g. `width=32` for any of them, `shortcut="B"` for the CIFAR ResNets)."""
    if name not in BACKBONES:
        raise ValueError(f"`name` must be one of {list(BACKBONES)}, got {name!r}")
    return BACKBONES[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
    first = BasicBlock(in_channels, out_channels, stride, shortcut)
    return nn.Sequential(first, *(BasicBlock(out_channels, out_channels, 1, shortcut) for _ in range(blocks - 1)))


def _block(block: type[nn.Module], in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if block is BasicBlock:
        return BasicBlock(in_channels, out_channels, stride, shortcut="B")
    return block(in_channels, out_channels, stride)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan_out), unit BN scale, zero BN shift; linear layers keep torch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _check_positive_int(argument: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}")
