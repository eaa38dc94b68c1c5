"""What ``objective="activation"`` weights a projection by: the moments of each selected layer's inputs (of its
im2col rows, or of its input pixels' channel vectors for schemes that weight channels) and the scale of the
BatchNorm that normalizes its outputs, gathered by forward hooks. Pure torch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batchnorm import BATCHNORMS, kept_batchnorm_statistics, kept_modes, seeded
from .names import named_modules
from .schemes.tiled_svd import explicit_padding

CHUNK_ELEMENTS = 1 << 24  # im2col elements lowered at once (64 MiB in float32)
ROWS_PER_FEATURE = 4  # a batch adds at most this many im2col rows per feature (n) to a layer's moments


@dataclass
class LayerStatistics:
    """One layer's inputs over the batches seen: ``moment_sum`` (n, n) float64, the sum of x·xᵀ over its ``rows``
    input rows x (im2col rows: n = S·kh·kw, in the column order of ``weight.reshape(T, -1)``; pixels' channel
    vectors: n = S; Linear: in features; a grouped conv's per group, (g, n/g, n/g), its ``row_sum`` (g, n/g)),
    ``row_sum`` (n,) the sum of x, and ``output_scale`` (T,) |γ|/sqrt(running_var + eps) of the BatchNorm fed
    directly by the layer's output (None: no BatchNorm normalizes it)."""

    moment_sum: Tensor
    row_sum: Tensor
    rows: Tensor
    output_scale: Tensor | None = None

    @property
    def normalized(self) -> bool:
        """Whether a BatchNorm normalizes the layer's output (it removes any constant shift of it)."""
        return self.output_scale is not None

    @property
    def input_metric(self) -> Tensor:
        """(n, n) float64: the covariance E[(x − E x)(x − E x)ᵀ] when a BatchNorm normalizes the output (a change
        of the output by a constant, (W − W_r)·E x, is undone by it), else the second moment E[x·xᵀ]."""
        count = self.rows.clamp_min(1)
        moment = self.moment_sum / count
        if self.normalized:
            mean = self.row_sum / count
            moment = moment - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        return moment

    def tensors(self) -> list[Tensor]:
        """The sums that add up over batches and processes (reduced in place under DDP)."""
        return [self.moment_sum, self.row_sum, self.rows]


def patches(module: nn.Module, x: Tensor) -> Tensor:
    """The padded input ``x`` (N, S, *size) of a Conv1d/2d/3d as a view (N, S, *output size, *kernel) of every
    patch its kernel meets (``Tensor.unfold``, no copy)."""
    pads = explicit_padding(module.padding, module.kernel_size, module.dilation)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    for dim, (kernel, stride, dilation) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + dim, dilation * (kernel - 1) + 1, stride)[..., ::dilation]
    return x


def input_rows(module: nn.Module, x: Tensor, channels: bool = False) -> Iterator[Tensor]:
    """``module``'s input ``x`` as im2col rows (rows, n), n = S·prod(kernel) in the column order of
    ``weight.reshape(T, -1)`` for each group side by side: all of them in chunks bounded by ``CHUNK_ELEMENTS``, or,
    where there are more than ``ROWS_PER_FEATURE`` times a group's n, that many drawn uniformly (torch's
    generator); with ``channels`` a conv's input pixels' channel vectors (rows, S), all of them, instead."""
    if isinstance(module, nn.Linear):
        yield x.reshape(-1, x.shape[-1])
        return
    if channels:
        yield x.movedim(1, -1).reshape(-1, x.shape[1])
        return
    view = patches(module, x)
    dims = len(module.kernel_size)
    positions = view.shape[2:2 + dims]
    kernel = math.prod(module.kernel_size)
    count = ROWS_PER_FEATURE * x.shape[1] // module.groups * kernel
    if x.shape[0] * math.prod(positions) > count:
        drawn = torch.randperm(x.shape[0] * math.prod(positions), device=x.device)[:count]
        index = torch.unravel_index(drawn, (x.shape[0], *positions))
        yield view[(index[0], slice(None), *index[1:])].reshape(count, -1)
        return
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    step = max(1, CHUNK_ELEMENTS // max(1, x[0].numel() * kernel))
    for start in range(0, x.shape[0], step):
        yield view[start:start + step].permute(order).reshape(-1, x.shape[1] * kernel)


def batchnorm_scale(norm: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """|γ|/sqrt(running_var + eps) (C,), float64 (1/sqrt(var + eps) without affine parameters; |γ| alone without
    running statistics)."""
    weight = norm.weight if norm.affine else None
    if norm.running_var is None:
        return weight.detach().double().abs() if weight is not None else torch.ones(norm.num_features,
                                                                                     dtype=torch.float64)
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    return scale * norm.weight.detach().double().abs() if norm.affine else scale


def input_statistics(model: nn.Module, names: Iterable[str], batches: Iterable[Any],
                     forward: Callable[[nn.Module, Any], Any] | None = None, seed: int | None = None,
                     channels: Collection[str] = ()) -> dict[str, LayerStatistics]:
    """``LayerStatistics`` of the named Conv1d/2d/3d and Linear layers of ``model`` (canonical names, see
    ``lrlightning.names``) over ``batches`` (``forward(model, batch)``, default ``model(batch)``), run in train
    mode with no grad; BatchNorm running statistics, every submodule's mode and (with ``seed``) torch's generators
    are restored afterwards. The layers named in ``channels`` record the moments of their input pixels' channel
    vectors (S, S), 1/kh·kw of the cost, instead of im2col rows. A BatchNorm is paired with a layer when its input
    is that layer's output tensor. A layer the passes never run is missing from the result."""
    modules = named_modules(model)
    layers = {name: modules[name] for name in names}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    row_sums: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    followers: dict[str, nn.Module] = {}

    def record_inputs(name: str):
        def hook(module, args):
            groups = getattr(module, "groups", 1)
            for rows in input_rows(module, args[0].detach(), name in channels):
                with torch.autocast(rows.device.type, enabled=False):  # fp16/bf16 sums overflow or round
                    rows = rows.double() if rows.dtype == torch.float64 else rows.float()
                    if groups > 1:  # each group's moments (g, n/g, n/g), never the full (n, n)
                        rows = rows.reshape(rows.shape[0], groups, -1).transpose(0, 1)
                    gram = (rows.mT @ rows).double()
                total = rows.sum(-2).double()
                sums[name] = sums[name] + gram if name in sums else gram
                row_sums[name] = row_sums[name] + total if name in row_sums else total
                counts[name] = counts.get(name, 0) + rows.shape[-2]
        return hook

    def record_output(name: str):
        def hook(module, args, output):
            outputs[name] = output
        return hook

    def find_producer(norm):
        def hook(module, args):
            for name, output in outputs.items():
                if args[0] is output and module.num_features == output.shape[1]:
                    followers.setdefault(name, module)
        return hook

    handles = [layer.register_forward_pre_hook(record_inputs(name)) for name, layer in layers.items()]
    handles += [layer.register_forward_hook(record_output(name)) for name, layer in layers.items()]
    handles += [m.register_forward_pre_hook(find_producer(m)) for m in model.modules() if isinstance(m, BATCHNORMS)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with kept_modes(model), torch.no_grad(), kept_batchnorm_statistics(model), seeded(device, seed):
            model.train()
            for batch in batches:
                (forward or (lambda module, item: module(item)))(model, batch)
                outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: LayerStatistics(sums[name], row_sums[name],
                                  torch.tensor(float(counts[name]), dtype=torch.float64, device=sums[name].device),
                                  batchnorm_scale(followers[name]).to(sums[name].device) if name in followers else None)
            for name in layers if name in sums}
