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

One module a family: `resnet` (with the blocks and shortcuts), `vgg`, `simple`, `mobilenet`, `resnext`, `conv_nd`
(`conv1d`, `conv3d`); `blocks` holds the builders they share, `registry` the names.
"""
from .conv_nd import Conv1dNet, Conv3dNet
from .mobilenet import InvertedResidual, MobileNetV2
from .registry import BACKBONES, IMAGENET_BACKBONES, IMAGENET_CLASSES, IMAGENET_INPUT, build_backbone
from .resnet import SHORTCUTS, BasicBlock, Bottleneck, ChannelPadShortcut, CifarResNet, ImageNetResNet
from .resnext import ResNeXt, ResNeXtBlock
from .simple import SimpleCNN
from .vgg import CifarVGG

__all__ = ["BACKBONES", "IMAGENET_BACKBONES", "IMAGENET_CLASSES", "IMAGENET_INPUT", "SHORTCUTS", "BasicBlock",
           "Bottleneck", "ChannelPadShortcut", "CifarResNet", "CifarVGG", "Conv1dNet", "Conv3dNet", "ImageNetResNet",
           "InvertedResidual", "MobileNetV2", "ResNeXt", "ResNeXtBlock", "SimpleCNN", "build_backbone"]
