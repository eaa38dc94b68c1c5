"""MobileNetV2 (Sandler et al. 2018) and its inverted residual block."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import PooledClassifier, check_positive_int, conv_bn_act


class InvertedResidual(nn.Module):
    """MobileNetV2 block (Sandler et al. 2018, Table 1): 1×1 expand conv-BN-ReLU6 to `expansion`·`in_channels`
    channels (left out when `expansion` is 1), 3×3 depthwise conv-BN-ReLU6 (groups = channels) carrying the
    stride, 1×1 linear projection conv-BN to `out_channels`; plus the input when `stride` is 1 and
    `in_channels == out_channels`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        check_positive_int("expansion", expansion)
        hidden = in_channels * expansion
        self.expand = (nn.Identity() if expansion == 1
                       else nn.Sequential(*conv_bn_act(2, in_channels, hidden, 1, act=nn.ReLU6)))
        self.depthwise = nn.Sequential(*conv_bn_act(2, hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        self.project = nn.Sequential(*conv_bn_act(2, hidden, out_channels, 1, act=None))
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetV2(PooledClassifier):
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
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"`width` must be a number > 0 (a channel multiplier, e.g. 0.5 or 1.0), got {width!r}")
        if not isinstance(small_input, bool):
            raise ValueError(f"`small_input` must be a bool, got {small_input!r}")
        channels = _round_channels(self.STEM_CHANNELS * width)
        self.stem = nn.Sequential(*conv_bn_act(2, in_channels, channels, 3, 1 if small_input else 2, act=nn.ReLU6))
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
        self.head = nn.Sequential(*conv_bn_act(2, channels, last_channels, 1, act=nn.ReLU6))
        self.add_classifier(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.head(self.blocks(self.stem(x))))


def _round_channels(channels: float, divisor: int = 8) -> int:
    """`channels` rounded to the nearest multiple of `divisor` (at least `divisor`), moved up one step when that
    loses more than 10 %."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded
