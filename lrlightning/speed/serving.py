"""The form in which eager PyTorch serves a model, and in which latency is timed: an eval-mode copy with every
BatchNorm that follows a conv folded into it, and its convs' weights in a memory format. ``"channels_last"``
(default) keeps 2-D activations NHWC (3-D: NDHWC), so that oneDNN runs a chain of small convs, as a factorized
layer is, without reordering the activations between them; ``"contiguous"`` leaves them NCHW. Pure torch."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

MEMORY_FORMATS = ("channels_last", "contiguous")
LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}  # by the weight's dimensions


def check_memory_format(argument: str, value: object) -> str:
    """``value`` if it is one of ``MEMORY_FORMATS``, else a ValueError naming ``argument``."""
    if value not in MEMORY_FORMATS:
        raise ValueError(f"`{argument}` must be one of {MEMORY_FORMATS}, got {value!r}")
    return value


def folded(model: nn.Module) -> nn.Module:
    """``model`` (eval mode) with each BatchNorm that follows a conv folded into it, where ``torch.fx`` can trace
    the model (factorized layers fold into their last conv); a model it cannot trace is returned as it is, with a
    warning."""
    try:
        return fuse(model, inplace=True)
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError, AttributeError) as error:
        warnings.warn(f"{type(model).__name__} is served with its BatchNorm unfolded: torch.fx cannot trace it "
                      f"({type(error).__name__}: {error})", stacklevel=3)
        return model


def serving_form(model: nn.Module, memory_format: str = "channels_last", fold: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` as eager inference runs it: BatchNorm folded (``fold``, see ``folded``), and
    each Conv2d / Conv3d weight in ``memory_format``. ``model`` is untouched; outputs equal its eval outputs up to
    float rounding."""
    check_memory_format("memory_format", memory_format)
    served = copy.deepcopy(model).eval()
    if fold:
        served = folded(served)
    if memory_format == "channels_last":
        for module in served.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (nn.Conv2d, nn.Conv3d)) and weight is not None and weight.dim() in LAST_FORMATS:
                module.to(memory_format=LAST_FORMATS[weight.dim()])
    return served


def serving_input(example: torch.Tensor, memory_format: str = "channels_last") -> torch.Tensor:
    """``example`` (N, C, *size) in ``memory_format`` where it applies (4-D and 5-D batches), else as it is."""
    if memory_format == "channels_last" and example.dim() in LAST_FORMATS:
        return example.contiguous(memory_format=LAST_FORMATS[example.dim()])
    return example
