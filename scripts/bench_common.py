"""What the benchmark scripts share: the inputs and the seeded backbones of the zoo, the refusal a budget out of reach
is reported as, ONNX Runtime runners, timed calls and training steps, and the note of the OpenMP wait policy. The
scripts run as ``python scripts/bench_x.py``, so this folder is on the import path."""
from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from lrlightning.speed.latency import synchronize
from lrlightning.deploy.onnx import SessionModule, export_onnx, session, timing_bytes
from lrlightning.zoo import IMAGENET_BACKBONES, IMAGENET_CLASSES, IMAGENET_INPUT, build_backbone


def input_shape(name: str, in_channels: int, image_size: int | None = None, default_size: int = 32,
                depth: int | None = None, length: int | None = None) -> tuple[int, ...]:
    """One sample's shape for backbone ``name``: ``IMAGENET_INPUT`` for the ``IMAGENET_BACKBONES`` (``image_size``
    px square when given), ``in_channels``×``depth``×S×S for ``conv3d`` and ``in_channels``×``length`` for
    ``conv1d`` when those are given, else ``in_channels``×S×S, with S = ``image_size`` or ``default_size``."""
    if name in IMAGENET_BACKBONES:
        channels, height, width = IMAGENET_INPUT
        return (channels, image_size or height, image_size or width)
    size = image_size or default_size
    if name == "conv3d" and depth is not None:
        return (in_channels, depth, size, size)
    if name == "conv1d" and length is not None:
        return (in_channels, length)
    return (in_channels, size, size)


def seeded_backbone(name: str, shape: tuple[int, ...]) -> torch.nn.Module:
    """Backbone ``name`` for samples of ``shape`` (``IMAGENET_CLASSES`` classes for the ``IMAGENET_BACKBONES``,
    else 10), built after ``torch.manual_seed(0)``, in eval mode."""
    torch.manual_seed(0)
    num_classes = IMAGENET_CLASSES if name in IMAGENET_BACKBONES else 10
    return build_backbone(name, num_classes=num_classes, in_channels=shape[0]).eval()


def refusal(message: str) -> str:
    """The reachable maximum an out-of-reach budget's error names, e.g. "refused: at most 2.92x smaller in macs" or
    "refused: at most 1.19x faster (predicted)"; the message itself when it names none."""
    found = re.search(r"at most (\d+\.\d+x(?: \(IQR [^)]*\))?(?: [a-z]+)+(?: \([a-z]+\))?)", message)
    return f"refused: at most {found.group(1).strip()}" if found else message


def onnx_runner(model: torch.nn.Module, example: torch.Tensor, dynamic_batch: bool = False) -> SessionModule:
    """``model`` in an ONNX Runtime CPU session (torch's intra-op thread count, no spin-waiting), called like a
    module on a batch: exported for ``example``'s shape (``lrlightning.deploy.onnx.timing_bytes``), or with
    ``dynamic_batch`` for batches of any size as ``export_onnx`` writes it (BatchNorm folded, checked on
    ``example``)."""
    if not dynamic_batch:
        return SessionModule(session(timing_bytes(model, example)))
    with tempfile.TemporaryDirectory() as folder:
        return SessionModule(session(export_onnx(model, example, Path(folder) / "model.onnx").path))


def timed(function: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall seconds of one call of ``function``, with ``device`` synchronized on both sides."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def timed_training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(seconds to take the next (x, y) batch of ``batches``, seconds of one cross-entropy SGD step of ``model`` on
    it: forward, backward, ``optimizer.step()``)."""
    start = time.perf_counter()
    x, y = next(batches)
    loaded = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loaded - start, time.perf_counter() - loaded


def wait_policy() -> str:
    """``", OMP_WAIT_POLICY=<value>"`` for a footnote when the variable is set, else ``""``."""
    return f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if os.environ.get("OMP_WAIT_POLICY") else ""
