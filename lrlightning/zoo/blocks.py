"""What the zoo's networks share: the pooled linear classifier they end in, conv-BN-activation layers and stacks
of them laid out as data, the 1×1 projection shortcut, He initialization and the checks of their arguments."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..layers import CONVS

BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_POOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVERAGE_POOLS = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class PooledClassifier(nn.Module):
    """Base of the zoo's networks: the subclass computes features, `classify` turns them into logits through
    `pool` (global average) and `fc` (linear), which `add_classifier` adds."""

    def add_classifier(self, channels: int, num_classes: int, dims: int = 2) -> None:
        """Add `pool`, a `dims`-D global average pool, and `fc`, a linear layer from `channels` to `num_classes`;
        then initialize every weight (`init_weights`)."""
        self.pool = AVERAGE_POOLS[dims](1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of `features` (N, channels, *size)."""
        return self.fc(torch.flatten(self.pool(features), 1))


class LayoutCNN(PooledClassifier):
    """`features`, the conv-BN-activation layers and max-pools of the subclass's `LAYOUT` (`conv_stack`) in `DIMS`
    dimensions with activation `ACT`, then global average pool and linear classifier. Input: (N, in_channels,
    *size) with `DIMS` sizes; output: (N, num_classes) logits."""

    DIMS = 2
    LAYOUT: Sequence = ()
    ACT: Callable[[], nn.Module] = nn.ReLU

    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        check_network_arguments(num_classes, in_channels, width)
        layers, channels = conv_stack(self.DIMS, in_channels, width, self.LAYOUT, self.ACT)
        self.features = nn.Sequential(*layers)
        self.add_classifier(channels, num_classes, self.DIMS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def conv_stack(dims: int, in_channels: int, width: int, layout: Sequence, act: Callable[[], nn.Module] = nn.ReLU
               ) -> tuple[list[nn.Module], int]:
    """(layers, output channels) of `layout`, item by item: "M" a 2× max-pool (ceil mode); an int m a 3-wide conv
    to m·`width` channels; (m, k) or (m, k, s) a k-wide conv (stride s, default 1) to m·`width` channels; each conv
    `conv_bn_act` with `act`."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in layout:
        if item == "M":
            layers.append(MAX_POOLS[dims](2, ceil_mode=True))
            continue
        multiple, kernel_size, *stride = (item, 3) if isinstance(item, int) else item
        layers += conv_bn_act(dims, channels, multiple * width, kernel_size, *stride, act=act)
        channels = multiple * width
    return layers, channels


def conv_bn_act(dims: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                act: Callable[[], nn.Module] | None = nn.ReLU) -> list[nn.Module]:
    """`dims`-D conv (padding kernel_size // 2, no bias), BN and `act` (none when `act` is None)."""
    layers = [CONVS[dims](in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                          groups=groups, bias=False), BATCHNORMS[dims](out_channels)]
    return layers + [act()] if act is not None else layers


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Shortcut option "B": 1×1 conv (carrying the stride, no bias) + BN from `in_channels` to `out_channels`."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


def init_weights(model: nn.Module) -> None:
    """He-normal convolutions (fan_out; 1-D, 2-D and 3-D, grouped too), unit BN scale, zero BN shift; linear
    layers keep torch's default."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def check_positive_int(argument: str, value: object) -> None:
    """A ValueError naming `argument` unless `value` is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}")


def check_network_arguments(num_classes: object, in_channels: object, width: object) -> None:
    """`check_positive_int` of `num_classes`, `in_channels` and `width`, in this order."""
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    check_positive_int("width", width)
