"""What ``objective="activation"`` weights a projection by: the moments of each selected layer's inputs (of its
im2col rows, or of its input pixels' channel vectors for schemes that weight channels) and the scale of the
BatchNorm that normalizes its outputs, gathered by forward hooks. Pure torch."""
from __future__ import annotations

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
    vectors: n = S; Linear: in features),
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
            moment = moment - torch.outer(mean, mean)
        return moment

    def tensors(self) -> list[Tensor]:
        """The sums that add up over batches and processes (reduced in place under DDP)."""
        return [self.moment_sum, self.row_sum, self.rows]


def output_size(module: nn.Conv2d, size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of ``module``'s output on an input of spatial ``size`` that is already padded."""
    return tuple((length - dilation * (kernel - 1) - 1) // stride + 1 for length, kernel, stride, dilation
                 in zip(size, module.kernel_size, module.stride, module.dilation))


def input_rows(module: nn.Module, x: Tensor, channels: bool = False) -> Iterator[Tensor]:
    """``module``'s input ``x`` as im2col rows (rows, n): all of them in chunks bounded by ``CHUNK_ELEMENTS``, or,
    where there are more than ``ROWS_PER_FEATURE``·n, that many drawn uniformly (torch's generator) and lowered
    alone; with ``channels`` a conv's input pixels' channel vectors (N·H·W, S), all of them, instead."""
    if isinstance(module, nn.Linear):
        yield x.reshape(-1, x.shape[-1])
        return
    if channels:
        yield x.movedim(1, -1).reshape(-1, x.shape[1])
        return
    pads = explicit_padding(module.padding, module.kernel_size, module.dilation)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    features = x.shape[1] * module.kernel_size[0] * module.kernel_size[1]
    positions = output_size(module, x.shape[-2:])
    count = ROWS_PER_FEATURE * features
    if x.shape[0] * positions[0] * positions[1] > count:
        yield sampled_rows(module, x, positions, count)
        return
    step = max(1, CHUNK_ELEMENTS // max(1, x[0].numel() * module.kernel_size[0] * module.kernel_size[1]))
    for start in range(0, x.shape[0], step):
        cols = F.unfold(x[start:start + step], module.kernel_size, dilation=module.dilation, stride=module.stride)
        yield cols.transpose(1, 2).reshape(-1, cols.shape[1])


def sampled_rows(module: nn.Conv2d, x: Tensor, positions: tuple[int, int], count: int) -> Tensor:
    """``count`` im2col rows (count, S·kh·kw) of the padded input ``x`` at output positions drawn uniformly without
    replacement, gathered directly (no full lowering)."""
    (height, width), device = positions, x.device
    drawn = torch.randperm(x.shape[0] * height * width, device=device)[:count]
    sample, pixel = drawn // (height * width), drawn % (height * width)
    kernel = [torch.arange(k, device=device) * d for k, d in zip(module.kernel_size, module.dilation)]
    rows = (pixel // width * module.stride[0]).unsqueeze(1) + kernel[0]
    cols = (pixel % width * module.stride[1]).unsqueeze(1) + kernel[1]
    channel = torch.arange(x.shape[1], device=device)
    patches = x[sample[:, None, None, None], channel[None, :, None, None], rows[:, None, :, None],
                cols[:, None, None, :]]
    return patches.reshape(count, -1)


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
    """``LayerStatistics`` of the named Conv2d/Linear layers of ``model`` (canonical names, see
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
            for rows in input_rows(module, args[0].detach(), name in channels):
                with torch.autocast(rows.device.type, enabled=False):  # fp16/bf16 sums overflow or round
                    rows = rows.double() if rows.dtype == torch.float64 else rows.float()
                    gram = (rows.mT @ rows).double()
                total = rows.sum(0).double()
                sums[name] = sums[name] + gram if name in sums else gram
                row_sums[name] = row_sums[name] + total if name in row_sums else total
                counts[name] = counts.get(name, 0) + rows.shape[0]
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
