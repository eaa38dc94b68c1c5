"""``tiled_svd``: the lowered matrix cut into tiles, each kept at its own rank-r SVD (paper §4.2, Table 1)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import FactorizedLayer, LowRankConv2d, geometry, new_conv
from .base import Scheme
from .linalg import low_rank_matrices, smallest_rank_for_energy, split_sqrt, truncated_svd
from .weighting import weighted_low_rank


def explicit_padding(conv_padding, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    """The F.pad list (last dimension first: [left, right, top, bottom, ...]) of a conv's padding (ints or
    'same'/'valid'), for any number of kernel dimensions."""
    pads = []
    for k, d, index in reversed(list(zip(kernel, dilation, range(len(kernel))))):
        if conv_padding == "valid":
            pads += [0, 0]
        elif conv_padding == "same":
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [conv_padding[index]] * 2
    return pads


class TiledSVDConv2d(nn.Module, FactorizedLayer):
    """Exact tiled-SVD conv as two batched GEMMs on the im2col matrix.

    ``first``: (col tiles, row tiles·r, tile cols); ``second``: (row tiles, tile rows, col tiles·r). For an
    input (N, S, H, W): im2col (N, S·kh·kw, L) -> per column tile j, z_j = first[j] @ x_j -> regrouped per row
    tile i, y_i = second[i] @ [z_ij over j] -> (N, T, H', W').
    """

    kind = "TiledSVDConv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 padding_mode: str = "zeros", tile_shape=(64, 64), rank: int = 1, bias: bool = True):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.padding_mode, self.tile_shape, self.rank = padding_mode, tuple(tile_shape), int(rank)
        shape = (out_channels, in_channels, *self.kernel_size)
        tr, tc, nr, nc = TiledSVD(self.tile_shape).grid(shape)
        self.first = nn.Parameter(torch.empty(nc, nr * self.rank, tc))
        self.second = nn.Parameter(torch.empty(nr, tr, nc * self.rank))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"scheme=tiled_svd, tile_shape={self.tile_shape}, rank={self.rank}")

    def spec(self) -> dict:
        fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode",
                  "tile_shape", "rank")
        spec = {k: list(v) if isinstance(v, tuple) else v for k, v in ((f, getattr(self, f)) for f in fields)}
        return {"type": self.kind, "scheme": TiledSVD.name, **spec, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "TiledSVDConv2d":
        args = {k: v for k, v in spec.items() if k not in ("type", "scheme")}
        if isinstance(args["padding"], list):
            args["padding"] = tuple(args["padding"])
        return cls(**args)

    def forward(self, x: Tensor) -> Tensor:
        pads = explicit_padding(self.padding, self.kernel_size, self.dilation)
        if any(pads):
            x = F.pad(x, pads, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        n, _, h, w = x.shape
        out_h = (h - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_w = (w - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
        nc, _, tc = self.first.shape
        nr, tr, _ = self.second.shape
        cols = F.pad(cols, (0, 0, 0, nc * tc - cols.shape[1])).view(n, nc, tc, -1)
        z = torch.matmul(self.first, cols)
        z = z.view(n, nc, nr, self.rank, -1).transpose(1, 2).reshape(n, nr, nc * self.rank, -1)
        y = torch.matmul(self.second, z).reshape(n, nr * tr, -1)[:, : self.out_channels]
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.view(n, self.out_channels, out_h, out_w)


class TiledSVD(Scheme):
    """``tiled_svd``: the lowered matrix T × (S·kh·kw), columns in PyTorch order (s, i, j), cut into tiles of
    ``tile_shape = (rows, cols)``; each tile keeps its own rank-r SVD.

    Tiles larger than the matrix are clamped to it. Ragged edge tiles (sizes that do not divide) are zero-padded
    to the full tile size, which gives each the best rank-min(r, its size) approximation; exported factors are
    stored at the padded size and counted as stored. Exports as a grouped conv, a channel shuffle and a grouped
    1×1 conv when column tiles hold whole input channels and the tiles divide the matrix; otherwise as the
    im2col ``TiledSVDConv2d``.
    """

    name = "tiled_svd"
    layer_types = (LowRankConv2d, TiledSVDConv2d)
    weighted = True

    def __init__(self, tile_shape: tuple[int, int]):
        """``tile_shape``: (rows, cols) of each tile of the lowered matrix, ints >= 1 (required)."""
        if not (isinstance(tile_shape, Sequence) and not isinstance(tile_shape, str) and len(tile_shape) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in tile_shape)):
            raise ValueError(f"`tile_shape` of TiledSVD must be a pair (rows, cols) of ints >= 1, got {tile_shape!r}")
        self.tile_shape = (int(tile_shape[0]), int(tile_shape[1]))

    def options(self):
        return {"tile_shape": list(self.tile_shape)}

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(tile rows, tile cols, row tiles, col tiles) for a weight of ``shape``."""
        rows, cols = shape[0], math.prod(shape[1:])
        tr, tc = min(self.tile_shape[0], rows), min(self.tile_shape[1], cols)
        return tr, tc, math.ceil(rows / tr), math.ceil(cols / tc)

    def full_rank(self, shape):
        tr, tc, _, _ = self.grid(shape)
        return min(tr, tc)

    def factorized_params(self, shape, rank):
        tr, tc, nr, nc = self.grid(shape)
        return nr * nc * int(rank) * (tr + tc)

    def tiles(self, weights: Tensor) -> Tensor:
        """(B, *shape) -> (B, row tiles, col tiles, tile rows, tile cols), zero-padded at ragged edges."""
        shape = tuple(weights.shape[1:])
        tr, tc, nr, nc = self.grid(shape)
        matrix = weights.reshape(weights.shape[0], shape[0], -1)
        padded = F.pad(matrix, (0, nc * tc - matrix.shape[2], 0, nr * tr - matrix.shape[1]))
        return padded.reshape(-1, nr, tr, nc, tc).transpose(2, 3)

    def untile(self, tiles: Tensor, shape: tuple[int, ...]) -> Tensor:
        b, nr, nc, tr, tc = tiles.shape
        matrix = tiles.transpose(2, 3).reshape(b, nr * tr, nc * tc)
        return matrix[:, : shape[0], : math.prod(shape[1:])].reshape(b, *shape)

    def project(self, weights, ranks, driver="exact"):
        tiles = self.tiles(weights)
        b, nr, nc, tr, tc = tiles.shape
        per_tile = [r for r in ranks for _ in range(nr * nc)]
        approx = low_rank_matrices(tiles.reshape(-1, tr, tc), per_tile, driver)
        return self.untile(approx.reshape(tiles.shape), tuple(weights.shape[1:]))

    def project_weighted(self, weights, ranks, driver, weighting):
        """Each tile whitened by its own metrics: the diagonal block of the im2col moments over its columns, the
        output scales of its rows (exact when inputs of different column tiles are uncorrelated; padding has zero
        moments and unit scales)."""
        tiles = self.tiles(weights)
        b, nr, nc, tr, tc = tiles.shape
        moments = F.pad(weighting.inputs.double(), (0, nc * tc - weighting.inputs.shape[-1]) * 2)
        columns = moments.reshape(b, nc, tc, nc, tc).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        columns = columns.unsqueeze(1).expand(b, nr, nc, tc, tc)
        rows = None
        if weighting.outputs is not None:
            scales = F.pad(weighting.outputs.double(), (0, nr * tr - weighting.outputs.shape[-1]), value=1.0)
            rows = torch.diag_embed(scales.pow(2).reshape(b, nr, tr)).unsqueeze(2).expand(b, nr, nc, tr, tr)
        per_tile = [r for r in ranks for _ in range(nr * nc)]
        approx = weighted_low_rank(tiles.reshape(-1, tr, tc), per_tile, driver, None if rows is None
                                   else rows.reshape(-1, tr, tr), columns.reshape(-1, tc, tc), weighting.ridge)
        return self.untile(approx.reshape(tiles.shape), tuple(weights.shape[1:]))

    def energy_rank(self, weight, energy):
        tiles = self.tiles(weight.unsqueeze(0)).flatten(0, 2)
        return max(smallest_rank_for_energy(s, energy) for s in torch.linalg.svdvals(tiles))

    def rank_errors(self, weight, ranks, driver="exact"):
        """Eckart–Young per tile: the squared singular values past each rank, summed over tiles, over ||W||²."""
        energy = torch.linalg.svdvals(self.tiles(weight.double().unsqueeze(0)).flatten(0, 2)).pow(2)
        kept = torch.nn.functional.pad(energy.cumsum(1).sum(0), (1, 0))
        total = float(weight.double().pow(2).sum())
        if total == 0:
            return [0.0] * len(ranks)
        return [max(0.0, 1.0 - float(kept[min(int(r), len(kept) - 1)]) / total) for r in ranks]

    def tile_factors(self, weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """Per-tile sqrt-split factors of one weight: left (nr, nc, tr, rank) and right (nr, nc, rank, tc), float32."""
        u, sv, vh = truncated_svd(self.tiles(weight.detach().float().unsqueeze(0))[0], rank)
        if u.shape[-1] < rank:
            pad = rank - u.shape[-1]
            u, sv, vh = F.pad(u, (0, pad)), F.pad(sv, (0, pad)), F.pad(vh, (0, 0, 0, pad))
        return split_sqrt(u, sv, vh)

    def factorized_layer(self, layer, rank):
        w = layer.weight.detach()
        t, s, kh, kw = w.shape
        left, right = self.tile_factors(w, rank)
        tr, tc, nr, nc = self.grid(tuple(w.shape))
        aligned = tc % (kh * kw) == 0 and nc * tc == s * kh * kw and nr * tr == t and layer.padding_mode == "zeros"
        if aligned:
            first = right.permute(1, 0, 2, 3).reshape(nc * nr * rank, tc // (kh * kw), kh, kw)
            second = left.permute(0, 2, 3, 1).reshape(nr * tr, rank * nc, 1, 1)
            return LowRankConv2d(self.name, rank, [
                new_conv(first.contiguous().to(w.dtype), groups=nc, **geometry(layer)),
                nn.ChannelShuffle(nc),
                new_conv(second.contiguous().to(w.dtype), layer.bias, groups=nr),
            ])
        module = TiledSVDConv2d(s, t, (kh, kw), layer.stride, layer.padding, layer.dilation, layer.padding_mode,
                                self.tile_shape, rank, layer.bias is not None).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module.first.copy_(right.permute(1, 0, 2, 3).reshape(nc, nr * rank, tc))
            module.second.copy_(left.permute(0, 2, 1, 3).reshape(nr, tr, nc * rank))
            if layer.bias is not None:
                module.bias.copy_(layer.bias)
        return module
