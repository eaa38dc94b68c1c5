"""CNN backbones that need only torch, built by name: `build_backbone("resnet20", num_classes=10, in_channels=1)`.

| name | network | params |
| --- | --- | --- |
| `resnet20` … `resnet110` | CIFAR ResNet-20/32/44/56/110 (He et al. 2016, §4.2), shortcut A | 0.27–1.7 M, 10 classes |
| `resnet18`, `resnet50` | ImageNet ResNet-18/50 (He et al. 2016, Table 1), shortcut B | 11.7, 25.6 M, 1000 classes |
| `vgg` | VGG-11 with BatchNorm and one linear classifier | 9.2 M, 10 classes |
| `simple_cnn` | three conv-BN-ReLU layers, for tests | 24 k, 10 classes |
| `mobilenet_v2` | MobileNetV2 (Sandler et al. 2018), inverted residuals, depthwise 3×3 convs | 3.50 M, 1000 classes |
| `resnext` | small ResNeXt: three stages of bottlenecks with grouped 3×3 convs (cardinality 8) | 0.54 M, 10 classes |
| `conv1d` | M5-style 1-D CNN for sequences (N, C, L); images are read as pixel sequences | 40 k, 10 classes |
| `conv3d` | small 3-D CNN for clips (N, C, D, H, W) | 72 k, 10 classes |

All take `num_classes`, `in_channels` and a `width` keyword (channels of the first stage; for `mobilenet_v2` a
multiplier of the paper's channels, 2.24 M parameters at 10 classes), and end in a global average pool, so the 2-D
ones take any image of at least 8×8 px (`mobilenet_v2` is meant for 224×224 px, or 28×28 / 32×32 px with
`small_input=True`); `conv1d` also takes images, as pixel sequences. Other models (e.g. torchvision's, with the
`vision` extra) plug into `LitClassifier` as any `nn.Module`, for instance through Hydra
`backbone: {_target_: torchvision.models.resnet18, num_classes: 10}`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CONVS

__all__ = ["BACKBONES", "BasicBlock", "Bottleneck", "CifarResNet", "CifarVGG", "Conv1dNet", "Conv3dNet",
           "ImageNetResNet", "InvertedResidual", "MobileNetV2", "ResNeXt", "ResNeXtBlock", "SimpleCNN",
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


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018, Table 1): 1×1 expand conv-BN-ReLU6 to `expansion`·`in_channels`
    channels (left out when `expansion` is 1), 3×3 depthwise conv-BN-ReLU6 (groups = channels) carrying the
    stride, 1×1 linear projection conv-BN to `out_channels`; plus the input when `stride` is 1 and
    `in_channels == out_channels`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        _check_positive_int("expansion", expansion)
        hidden = in_channels * expansion
        self.expand = (nn.Identity() if expansion == 1
                       else nn.Sequential(*_conv_bn_act(2, in_channels, hidden, 1, act=nn.ReLU6)))
        self.depthwise = nn.Sequential(*_conv_bn_act(2, hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        self.project = nn.Sequential(*_conv_bn_act(2, hidden, out_channels, 1, act=None))
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 of Sandler et al. 2018 (Table 2): 3×3 stride-2 conv-BN-ReLU6 stem to 32 channels, 17
    `InvertedResidual` blocks in seven stages (expansion t, channels c, blocks n, stride s of the first block)
    `SETTINGS`, 1×1 conv-BN-ReLU6 to 1280 channels, global average pool, linear classifier (no dropout).

    `width` multiplies every channel count, rounded to a multiple of 8 (at least 90 % of the product), as in the
    paper's reference code; the last conv keeps 1280 channels for `width` < 1. At `width=1.0` and 1000 classes:
    3,504,872 parameters, as torchvision's `mobilenet_v2`. Input: (N, in_channels, H, W), 224×224 px for the
    ImageNet setting (total stride 32, 7×7 before the pool). `small_input=True` gives the stem and the second
    stage (c=24) stride 1 (total stride 8), so 28×28 and 32×32 images still reach the last stage at 4×4 px.
    Output: (N, num_classes) logits.
    """

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
    STEM_CHANNELS = 32
    LAST_CHANNELS = 1280

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, small_input: bool = False):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"`width` must be a number > 0 (a channel multiplier, e.g. 0.5 or 1.0), got {width!r}")
        if not isinstance(small_input, bool):
            raise ValueError(f"`small_input` must be a bool, got {small_input!r}")
        channels = _round_channels(self.STEM_CHANNELS * width)
        self.stem = nn.Sequential(*_conv_bn_act(2, in_channels, channels, 3, 1 if small_input else 2, act=nn.ReLU6))
        blocks: list[nn.Module] = []
        for index, (expansion, stage_channels, repeats, stride) in enumerate(self.SETTINGS):
            if small_input and index == 1:
                stride = 1
            out_channels = _round_channels(stage_channels * width)
            for i in range(repeats):
                blocks.append(InvertedResidual(channels, out_channels, stride if i == 0 else 1, expansion))
                channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        last_channels = _round_channels(self.LAST_CHANNELS * max(1.0, width))
        self.head = nn.Sequential(*_conv_bn_act(2, channels, last_channels, 1, act=nn.ReLU6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck (Xie et al. 2017, Fig. 3c): 1×1 reduce to `bottleneck_width`, 3×3 conv in `groups`
    groups carrying the stride, 1×1 expand to `out_channels`, each with BN (ReLU after the first two), plus a
    shortcut: relu(bn3(conv3(...)) + shortcut(x)). The shortcut is the identity when shape is kept, otherwise a
    1×1 conv + BN projection.
    """

    def __init__(self, in_channels: int, bottleneck_width: int, out_channels: int, stride: int = 1, groups: int = 8):
        super().__init__()
        _check_positive_int("groups", groups)
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
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNeXt(nn.Module):
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
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("cardinality", cardinality)
        _check_positive_int("blocks", blocks)
        _check_positive_int("width", width)
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
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Conv1dNet(nn.Module):
    """M5-style 1-D CNN (Dai et al. 2017) for audio / time series: Conv1d(in_channels, width, 9, stride 2)-BN-ReLU,
    then three stages of a k=3 Conv1d-BN-ReLU (width, 2·width, 4·width channels) and a 2× max-pool (ceil mode),
    the middle stage with an extra 1×1 Conv1d-BN-ReLU, global average pool, linear classifier. 40 k parameters at
    the default `width=32`, 1 input channel, 10 classes.

    Input: (N, in_channels, L) of any length L >= 1, or an image batch (N, in_channels, H, W), read as the pixel
    sequence (N, in_channels, H·W) in row-major order (so a Fashion-MNIST batch is 784 steps long). Output:
    (N, num_classes) logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("width", width)
        self.features = nn.Sequential(
            *_conv_bn_act(1, in_channels, width, 9, 2),
            *_conv_bn_act(1, width, width, 3),
            nn.MaxPool1d(2, ceil_mode=True),
            *_conv_bn_act(1, width, 2 * width, 3),
            *_conv_bn_act(1, 2 * width, 2 * width, 1),
            nn.MaxPool1d(2, ceil_mode=True),
            *_conv_bn_act(1, 2 * width, 4 * width, 3),
            nn.MaxPool1d(2, ceil_mode=True),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = torch.flatten(x, 2)
        elif x.dim() != 3:
            raise ValueError(f"input must be (N, C, L) or (N, C, H, W), got shape {tuple(x.shape)}")
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Conv3dNet(nn.Module):
    """Small 3-D CNN for video clips: Conv3d 3×3×3 to `width` channels, Conv3d 3×3×3 stride 2 to 2·width, Conv3d
    1×1×1 (pointwise) at 2·width, Conv3d 3×3×3 stride 2 to 4·width, each with BN and ReLU, global average pool,
    linear classifier. 72 k parameters at the default `width=16`, 3 input channels, 10 classes.

    Input: (N, in_channels, D, H, W), e.g. 8 frames of 32×32 px (total stride 4 in all three dimensions);
    output: (N, num_classes) logits.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("width", width)
        self.features = nn.Sequential(
            *_conv_bn_act(3, in_channels, width, 3),
            *_conv_bn_act(3, width, 2 * width, 3, 2),
            *_conv_bn_act(3, 2 * width, 2 * width, 1),
            *_conv_bn_act(3, 2 * width, 4 * width, 3, 2),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
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
    "mobilenet_v2": MobileNetV2,
    "resnext": ResNeXt,
    "conv1d": Conv1dNet,
    "conv3d": Conv3dNet,
}


def build_backbone(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the registered backbone `name` (see `BACKBONES`) with `num_classes` outputs for `in_channels`-channel
    images; `kwargs` go to its constructor (e.g. `width=32` for any of them, `shortcut="B"` for the CIFAR ResNets,
    `small_input=True` for `mobilenet_v2`, `cardinality=4` for `resnext`)."""
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
    return _conv_bn_act(2, in_channels, out_channels, 3)


_BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _conv_bn_act(dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU) -> list[nn.Module]:
    """`dims`-D conv (padding kernel_size // 2, no bias), BN and `act` (none when `act` is None)."""
    layers = [CONVS[dims](in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                           groups=groups, bias=False), _BATCHNORMS[dims](out_channels)]
    return layers + [act()] if act is not None else layers


def _round_channels(channels: float, divisor: int = 8) -> int:
    """`channels` rounded to the nearest multiple of `divisor` (at least `divisor`), moved up one step when that
    loses more than 10 %."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan_out; 1-D, 2-D and 3-D, grouped too), unit BN scale, zero BN shift; linear
    layers keep torch's default."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _check_positive_int(argument: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}")
