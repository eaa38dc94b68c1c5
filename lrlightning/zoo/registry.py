"""The backbones by name, as data: `BACKBONES` maps each registry name to its builder, `IMAGENET_BACKBONES` names
those built for ImageNet-shaped inputs; `build_backbone` builds one."""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from .conv_nd import Conv1dNet, Conv3dNet
from .mobilenet import MobileNetV2
from .resnet import CifarResNet, ImageNetResNet
from .resnext import ResNeXt
from .simple import SimpleCNN
from .vgg import CifarVGG

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

IMAGENET_BACKBONES = ("resnet18", "resnet50", "mobilenet_v2")  # meant for IMAGENET_INPUT, IMAGENET_CLASSES
IMAGENET_INPUT = (3, 224, 224)  # one image: channels, height, width
IMAGENET_CLASSES = 1000


def build_backbone(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the registered backbone `name` (see `BACKBONES`) with `num_classes` outputs for `in_channels`-channel
    images; `kwargs` go to its constructor (e.g. `width=32` for any of them, `shortcut="B"` for the CIFAR ResNets,
    `small_input=True` for `mobilenet_v2`, `cardinality=4` for `resnext`)."""
    if name not in BACKBONES:
        raise ValueError(f"`name` must be one of {list(BACKBONES)}, got {name!r}")
    return BACKBONES[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
