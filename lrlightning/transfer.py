"""Moving tensors between the host and devices with as few waits as possible: one copy per source device, dtype
and target rather than one per tensor. Pure torch."""
from __future__ import annotations

from collections import defaultdict

import torch


def host_lists(tensors: list[torch.Tensor]) -> list[list]:
    """Each 1-D tensor's values as a Python list, with one device-to-host transfer per device (not per tensor)."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        by_device[tensor.device].append(index)
    lists: list[list] = [[] for _ in tensors]
    for indices in by_device.values():
        values = torch.cat([tensors[i] for i in indices]).tolist()
        for i in indices:
            lists[i], values = values[:tensors[i].numel()], values[tensors[i].numel():]
    return lists


def concrete(device: torch.device | str) -> torch.device:
    """``device`` with its index (``"cuda"`` is the current CUDA device), comparable to a tensor's ``.device``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def moved(tensors: list[torch.Tensor], devices: torch.device | str | list[torch.device],
          non_blocking: bool = False) -> list[torch.Tensor]:
    """Each tensor on its device of ``devices`` (one for all, or one per tensor), with one copy per source device,
    dtype and target, not per tensor; tensors already there are returned as they are. ``non_blocking``: copies to
    CUDA do not make the host wait (``sent``); copies to the CPU always complete first."""
    if isinstance(devices, (str, torch.device)):
        devices = [devices] * len(tensors)
    targets = [concrete(device) for device in devices]
    out = list(tensors)
    copies: dict[tuple, list[int]] = defaultdict(list)
    for index, (tensor, device) in enumerate(zip(tensors, targets)):
        if tensor.device != device:
            copies[(tensor.device, tensor.dtype, device)].append(index)
    for (_, _, device), indices in copies.items():
        flat = sent(torch.cat([tensors[i].reshape(-1) for i in indices]), device, non_blocking)
        for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            out[i] = part.view(tensors[i].shape)
    return out


def sent(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """``tensor`` on ``device``. With ``non_blocking``, a host tensor bound for CUDA is staged in pinned memory
    (torch's caching host allocator, which keeps the block until the copy is done), so the host neither waits for
    the copy nor for the device; a copy towards the CPU always completes before this returns."""
    device = torch.device(device)
    if not non_blocking or device.type != "cuda":
        return tensor.to(device)
    if tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
