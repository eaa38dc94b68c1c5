"""Measured inference speed of whole models: the speedup of a factorized model over its dense one in serving form,
and the inputs layers receive (the shapes latency tables time)."""
from __future__ import annotations

import torch
from torch import nn

from ..names import named_modules
from .serving import serving_form, serving_input
from .timing import Spread, paired_speedup


def measured_speedup(dense: nn.Module, factorized: nn.Module, input_shape: tuple[int, ...], batch_size: int = 32,
                     device: torch.device | str = "cpu", memory_format: str = "channels_last") -> tuple[
                         Spread, Spread, Spread]:
    """(dense ms, factorized ms, speedup dense / factorized per round) of the serving forms of two models on
    ``device`` (``lrlightning.speed.serving``: eval-mode copies, BatchNorm folded, weights and input in
    ``memory_format``) on one random batch of ``batch_size`` inputs of ``input_shape`` (C, H, W), timed interleaved
    (``lrlightning.speed.timing.paired_speedup``, torch's current thread count on CPU). The models themselves are not
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
