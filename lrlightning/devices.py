"""Device arguments, checked against this machine. Pure torch."""
from __future__ import annotations

from typing import Any

import torch


def check_device(argument: str, value: Any) -> None:
    """Raise unless ``value`` is None, ``"cpu"`` or a CUDA device present on this machine."""
    if value is None:
        return
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        device = None
    usable = device is not None and (device.type == "cpu" or (
        device.type == "cuda" and torch.cuda.is_available()
        and (device.index is None or device.index < torch.cuda.device_count())))
    if not usable:
        raise ValueError(f"`{argument}` must be 'cpu' or a CUDA device of this machine such as 'cuda:0' "
                         f"(CUDA available: {torch.cuda.is_available()}), got {value!r}")
