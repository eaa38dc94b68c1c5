"""Parameter and multiply-accumulate (MAC) counts of dense and factorized models."""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import is_conv
from .schemes.tiled_svd import TiledSVDConv2d


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them, trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def module_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs of one leaf computation for one sample, given its output."""
    if is_conv(module):
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        return output[0].numel() * per_output
    if isinstance(module, nn.Linear):
        return output[0].numel() * module.in_features
    if isinstance(module, TiledSVDConv2d):
        positions = output.shape[2] * output.shape[3]
        return positions * (module.first.numel() + module.second.numel())
    return 0


def count_macs(model: nn.Module, input_shape: tuple[int, ...], per_layer: bool = False) -> int | dict[str, int]:
    """MACs of one forward pass for one sample of ``input_shape`` ((C, L), (C, H, W) or (C, D, H, W): what one
    sample of the model's input is), counting Conv1d/2d/3d (grouped ones too), Linear and tiled-SVD layers (normalization, activations and pooling are not counted).

    Runs one forward pass in eval mode under ``torch.no_grad`` on the model's device; the mode is restored.
    With ``per_layer=True`` returns ``{module name: MACs}``.
    """
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if is_conv(module) or isinstance(module, (nn.Linear, TiledSVDConv2d)):
            hooks.append(module.register_forward_hook(
                lambda m, _inputs, out, name=name: counts.__setitem__(name, counts.get(name, 0) + module_macs(m, out))))
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return counts if per_layer else sum(counts.values())
