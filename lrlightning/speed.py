"""Inference speed: BatchNorm folding, CPU latency, and a measured guard that keeps slower layers dense."""
from __future__ import annotations

import copy
import statistics

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from .latency import time_passes
from .layers import FactorizedLayer
from .names import named_modules, set_module
from .serving import serving_form, serving_input
from .timing import Spread, paired_speedup


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that follows a conv folded into that conv
    (``torch.fx`` tracing; factorized modules fold into their last conv). ``model`` is untouched."""
    return fuse(copy.deepcopy(model).eval(), inplace=True)


def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass on ``example`` in milliseconds (eval mode, no grad; on a CUDA
    ``example`` the device is synchronized around each pass)."""
    model.eval()
    with torch.inference_mode():
        times = time_passes(model, example, warmup + repeats)[warmup:]
    return 1000.0 * statistics.median(times)


def cpu_latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 32, repeats: int = 20,
                   warmup: int = 3) -> float:
    """``latency_ms`` of a CPU copy of ``model`` on a random batch of ``batch_size`` inputs of ``input_shape``
    (C, H, W), with torch's current thread count. ``model`` itself is not moved or switched to eval."""
    for argument, value, minimum in (("batch_size", batch_size, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{argument}` must be an int >= {minimum}, got {value!r}")
    return latency_ms(copy.deepcopy(model).cpu(), torch.randn(batch_size, *input_shape), repeats, warmup)


def measured_speedup(dense: nn.Module, factorized: nn.Module, input_shape: tuple[int, ...], batch_size: int = 32,
                     device: torch.device | str = "cpu", memory_format: str = "channels_last") -> tuple[
                         Spread, Spread, Spread]:
    """(dense ms, factorized ms, speedup dense / factorized per round) of the serving forms of two models on
    ``device`` (``lrlightning.serving``: eval-mode copies, BatchNorm folded, weights and input in
    ``memory_format``) on one random batch of ``batch_size`` inputs of ``input_shape`` (C, H, W), timed interleaved
    (``lrlightning.timing.paired_speedup``, torch's current thread count on CPU). The models themselves are not
    moved or switched to eval."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    copies = [serving_form(model, memory_format).to(device) for model in (dense, factorized)]
    return paired_speedup(*copies, serving_input(torch.randn(batch_size, *input_shape, device=device), memory_format))


def layer_inputs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named module (canonical names, see ``lrlightning.names``) receives when ``model`` runs on
    ``example`` in eval mode, without grad; the model's mode is restored."""
    modules = named_modules(model)
    captured, hooks = {}, []

    def capture(name: str):
        def hook(module, args, output):
            captured.setdefault(name, args[0])
        return hook

    for name in names:
        hooks.append(modules[name].register_forward_hook(capture(name)))
    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval()(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return captured


def keep_faster_layers(dense: nn.Module, factorized: nn.Module, example: torch.Tensor, repeats: int = 20,
                       margin: float = 1.0) -> tuple[nn.Module, list[dict]]:
    """A copy of ``factorized`` in which each factorized layer that runs slower than ``margin`` × its dense
    counterpart (timed side by side on its real input) is replaced by the dense layer of ``dense``.

    ``dense`` must hold the projected weights (as after training with the callback), so outputs are unchanged.
    Returns the model and one row per factorized layer: name, dense and factorized ms, and whether it was kept.
    """
    result = copy.deepcopy(factorized).eval()
    names = [name for name, m in factorized.named_modules() if isinstance(m, FactorizedLayer)]
    inputs = layer_inputs(dense, names, example)
    report = []
    for name in names:
        dense_layer = dense.get_submodule(name)
        dense_ms = latency_ms(dense_layer, inputs[name], repeats)
        factorized_ms = latency_ms(result.get_submodule(name), inputs[name], repeats)
        kept = factorized_ms <= margin * dense_ms
        if not kept:
            set_module(result, name, copy.deepcopy(dense_layer))
        report.append({"layer": name, "dense_ms": dense_ms, "factorized_ms": factorized_ms, "factorized": kept})
    return result, report
