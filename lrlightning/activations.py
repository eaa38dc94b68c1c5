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
PIXELS_PER_CHANNEL = 64  # and at most this many input pixels per channel (S) to a layer's channel moments


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

    def __add__(self, other: "LayerStatistics") -> "LayerStatistics":
        """The statistics of both sets of inputs (the BatchNorm scale of ``other``, the later one)."""
        return LayerStatistics(self.moment_sum + other.moment_sum, self.row_sum + other.row_sum,
                               self.rows + other.rows, other.output_scale)

    def to(self, device: torch.device | str) -> "LayerStatistics":
        scale = self.output_scale.to(device) if self.output_scale is not None else None
        return LayerStatistics(*(tensor.to(device) for tensor in self.tensors()), scale)


def patches(module: nn.Module, x: Tensor) -> Tensor:
    """The padded input ``x`` (N, S, *size) of a Conv1d/2d/3d as a view (N, S, *output size, *kernel) of every
    patch its kernel meets (``Tensor.unfold``, no copy)."""
    pads = explicit_padding(module.padding, module.kernel_size, module.dilation)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    for dim, (kernel, stride, dilation) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + dim, dilation * (kernel - 1) + 1, stride)[..., ::dilation]
    return x


def drawn_rows(view: Tensor, positions: tuple[int, ...], count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` slices ``view[n, :, *p]`` (count, C, *rest) of ``view`` (N, C, *positions, *rest), at (sample n,
    position p) drawn uniformly with replacement (``randint``: a permutation of every position costs more than the
    moments); only the drawn slices are copied."""
    drawn = torch.randint(view.shape[0] * math.prod(positions), (count,), device=view.device, generator=generator)
    index = torch.unravel_index(drawn, (view.shape[0], *positions))
    return view[(index[0], slice(None), *index[1:])]


def input_rows(module: nn.Module, x: Tensor, channels: bool = False,
               generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """``module``'s input ``x`` as im2col rows (rows, n), n = S·prod(kernel) in the column order of
    ``weight.reshape(T, -1)`` for each group side by side: all of them in chunks bounded by ``CHUNK_ELEMENTS``, or,
    where there are more than ``ROWS_PER_FEATURE`` times a group's n, that many drawn uniformly (from
    ``generator``, default torch's; ``drawn_rows``); with ``channels`` a conv's input pixels' channel vectors (rows, S) instead: all
    of them, or ``PIXELS_PER_CHANNEL``·S of them drawn uniformly."""
    if isinstance(module, nn.Linear):
        yield x.reshape(-1, x.shape[-1])
        return
    if channels:
        pixels = x.shape[0] * math.prod(x.shape[2:])
        if pixels > PIXELS_PER_CHANNEL * x.shape[1]:
            yield drawn_rows(x, tuple(x.shape[2:]), PIXELS_PER_CHANNEL * x.shape[1], generator)
            return
        yield x.movedim(1, -1).reshape(-1, x.shape[1])
        return
    view = patches(module, x)
    dims = len(module.kernel_size)
    positions = view.shape[2:2 + dims]
    kernel = math.prod(module.kernel_size)
    count = ROWS_PER_FEATURE * x.shape[1] // module.groups * kernel
    if x.shape[0] * math.prod(positions) > count:
        yield drawn_rows(view, tuple(positions), count, generator).reshape(count, -1)
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


class InputRecorder:
    """Forward hooks that add the inputs of the named Conv1d/2d/3d and Linear layers of ``model`` (canonical names)
    to their moments on every forward pass while ``attached`` (``input_statistics``, or a training step's own passes).
    The layers named in ``channels`` record their input pixels' channel vectors; ``generator`` draws the im2col rows
    (None: torch's default generator). A BatchNorm is paired with a layer when its input is that layer's output
    tensor; ``end_pass()`` forgets the outputs of the last pass."""

    def __init__(self, model: nn.Module, names: Iterable[str], channels: Collection[str] = (),
                 generator: torch.Generator | None = None):
        modules = named_modules(model)
        self.model, self.layers = model, {name: modules[name] for name in names}
        self.channels, self.generator = set(channels), generator
        self.sums: dict[str, Tensor] = {}
        self.row_sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.outputs: dict[str, Tensor] = {}
        self.followers: dict[str, nn.Module] = {}
        self.handles: list = []

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> "InputRecorder":
        if not self.handles:
            self.handles = [layer.register_forward_pre_hook(self.record_inputs(name))
                            for name, layer in self.layers.items()]
            self.handles += [layer.register_forward_hook(self.record_output(name))
                             for name, layer in self.layers.items()]
            self.handles += [m.register_forward_pre_hook(self.find_producer) for m in self.model.modules()
                             if isinstance(m, BATCHNORMS)]
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.end_pass()

    def end_pass(self) -> None:
        self.outputs.clear()

    def reset(self) -> None:
        """Forget the moments recorded so far (the BatchNorm pairing stays)."""
        self.sums, self.row_sums, self.counts = {}, {}, {}

    def record_inputs(self, name: str):
        def hook(module, args):
            groups = getattr(module, "groups", 1)
            for rows in input_rows(module, args[0].detach(), name in self.channels, self.generator):
                with torch.autocast(rows.device.type, enabled=False):  # fp16/bf16 sums overflow or round
                    rows = rows.double() if rows.dtype == torch.float64 else rows.float()
                    if groups > 1:  # each group's moments (g, n/g, n/g), never the full (n, n)
                        rows = rows.reshape(rows.shape[0], groups, -1).transpose(0, 1)
                    gram = (rows.mT @ rows).double()
                total = rows.sum(-2).double()
                self.sums[name] = self.sums[name] + gram if name in self.sums else gram
                self.row_sums[name] = self.row_sums[name] + total if name in self.row_sums else total
                self.counts[name] = self.counts.get(name, 0) + rows.shape[-2]
        return hook

    def record_output(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output
        return hook

    def find_producer(self, module, args):
        for name, output in self.outputs.items():
            if args[0] is output and module.num_features == output.shape[1]:
                self.followers.setdefault(name, module)

    def result(self) -> dict[str, LayerStatistics]:
        """``LayerStatistics`` of every named layer the passes ran (the BatchNorm scales as they are now)."""
        return {name: LayerStatistics(self.sums[name], self.row_sums[name],
                                      torch.tensor(float(self.counts[name]), dtype=torch.float64,
                                                   device=self.sums[name].device),
                                      batchnorm_scale(self.followers[name]).to(self.sums[name].device)
                                      if name in self.followers else None)
                for name in self.layers if name in self.sums}


def input_statistics(model: nn.Module, names: Iterable[str], batches: Iterable[Any],
                     forward: Callable[[nn.Module, Any], Any] | None = None, seed: int | None = None,
                     channels: Collection[str] = ()) -> dict[str, LayerStatistics]:
    """``LayerStatistics`` of the named Conv1d/2d/3d and Linear layers of ``model`` (canonical names, see
    ``lrlightning.names``) over ``batches`` (``forward(model, batch)``, default ``model(batch)``), run in train
    mode with no grad; BatchNorm running statistics, every submodule's mode and (with ``seed``) torch's generators
    are restored afterwards. The layers named in ``channels`` record the moments of their input pixels' channel
    vectors (S, S), 1/kh·kw of the cost, instead of im2col rows. A BatchNorm is paired with a layer when its input
    is that layer's output tensor. A layer the passes never run is missing from the result."""
    recorder = InputRecorder(model, names, channels)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        recorder.attach()
        with kept_modes(model), torch.no_grad(), kept_batchnorm_statistics(model), seeded(device, seed):
            model.train()
            for batch in batches:
                (forward or (lambda module, item: module(item)))(model, batch)
                recorder.end_pass()
    finally:
        recorder.detach()
    return recorder.result()
