"""Exact factorized modules built from dense Conv2d/Linear layers whose weights are (or are made) low-rank.

Each module has ``spec()`` (primitive constructor arguments) and ``from_spec(spec)`` so a factorized model can be
rebuilt from a structure spec without pickled classes. Factors split the singular values evenly (sqrt on both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .schemes import Rank, SpatialSVD, TiledSVD, Tucker2, truncated_svd

CONV_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def conv_spec(conv: nn.Conv2d) -> dict:
    spec = {name: getattr(conv, name) for name in CONV_FIELDS}
    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}
    spec["bias"] = conv.bias is not None
    return spec


def conv_from_spec(spec: dict) -> nn.Conv2d:
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    return nn.Conv2d(**args)


def split_sqrt(u: Tensor, s: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    root = s.sqrt()
    return u * root.unsqueeze(-2), root.unsqueeze(-1) * vh


class LowRankConv2d(nn.Sequential):
    """A chain of plain Conv2d (svd: 2, spatial_svd: 2, tucker2: 3, aligned tiled_svd: conv, shuffle, conv)."""

    def __init__(self, scheme: str, rank: Rank, layers: list[nn.Module]):
        super().__init__(*layers)
        self.scheme = scheme
        self.rank = rank

    def spec(self) -> dict:
        parts = [{"shuffle": m.groups} if isinstance(m, nn.ChannelShuffle) else conv_spec(m) for m in self]
        return {"type": "LowRankConv2d", "scheme": self.scheme, "rank": self.rank, "layers": parts}

    @classmethod
    def from_spec(cls, spec: dict) -> "LowRankConv2d":
        layers = [nn.ChannelShuffle(p["shuffle"]) if "shuffle" in p else conv_from_spec(p) for p in spec["layers"]]
        rank = tuple(spec["rank"]) if isinstance(spec["rank"], list) else spec["rank"]
        return cls(spec["scheme"], rank, layers)


def geometry(conv: nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)


def split_geometry(conv: nn.Conv2d) -> tuple[dict, dict]:
    """Stride/padding/dilation of a kh×kw conv split into its kh×1 and 1×kw parts (exact for every padding mode)."""
    pad = conv.padding
    vertical_pad = pad if isinstance(pad, str) else (pad[0], 0)
    horizontal_pad = pad if isinstance(pad, str) else (0, pad[1])
    vertical = dict(stride=(conv.stride[0], 1), padding=vertical_pad, dilation=(conv.dilation[0], 1),
                    padding_mode=conv.padding_mode)
    horizontal = dict(stride=(1, conv.stride[1]), padding=horizontal_pad, dilation=(1, conv.dilation[1]),
                      padding_mode=conv.padding_mode)
    return vertical, horizontal


def new_conv(weight: Tensor, bias: Tensor | None = None, groups: int = 1, **geometry_args) -> nn.Conv2d:
    out_channels, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_channels, (kh, kw), groups=groups, bias=bias is not None,
                     device=weight.device, dtype=weight.dtype, **geometry_args)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def svd_conv(conv: nn.Conv2d, rank: int) -> LowRankConv2d:
    """kh×kw conv S→r (original stride, padding, dilation, padding mode), then 1×1 conv r→T with the bias."""
    w = conv.weight.detach()
    t, s, kh, kw = w.shape
    u, sv, vh = truncated_svd(w.float().reshape(t, -1), rank)
    left, right = split_sqrt(u, sv, vh)
    first = new_conv(right.reshape(rank, s, kh, kw).to(w.dtype), **geometry(conv))
    second = new_conv(left.reshape(t, rank, 1, 1).to(w.dtype), conv.bias)
    return LowRankConv2d("svd", rank, [first, second])


def spatial_conv(conv: nn.Conv2d, rank: int) -> LowRankConv2d:
    """kh×1 conv S→r then 1×kw conv r→T with the bias."""
    w = conv.weight.detach()
    t, s, kh, kw = w.shape
    matrix = SpatialSVD().to_matrix(w.float().unsqueeze(0))[0]
    u, sv, vh = truncated_svd(matrix, rank)
    left, right = split_sqrt(u, sv, vh)
    vertical_args, horizontal_args = split_geometry(conv)
    vertical = left.reshape(s, kh, rank).permute(2, 0, 1).unsqueeze(-1)
    horizontal = right.reshape(rank, t, kw).permute(1, 0, 2).unsqueeze(2)
    first = new_conv(vertical.to(w.dtype), **vertical_args)
    second = new_conv(horizontal.to(w.dtype), conv.bias, **horizontal_args)
    return LowRankConv2d("spatial_svd", rank, [first, second])


def tucker2_conv(conv: nn.Conv2d, rank: tuple[int, int], hooi_iters: int = 0) -> LowRankConv2d:
    """1×1 conv S→R_in, kh×kw conv R_in→R_out (original geometry), 1×1 conv R_out→T with the bias."""
    w = conv.weight.detach()
    core, u_in, u_out = Tucker2(hooi_iters).factors(w.float().unsqueeze(0), [tuple(rank)])
    first = new_conv(u_in[0].T[:, :, None, None].contiguous().to(w.dtype))
    middle = new_conv(core[0].contiguous().to(w.dtype), **geometry(conv))
    last = new_conv(u_out[0][:, :, None, None].contiguous().to(w.dtype), conv.bias)
    return LowRankConv2d("tucker2", tuple(rank), [first, middle, last])


def explicit_padding(conv_padding, kernel: tuple[int, int], dilation: tuple[int, int]) -> list[int]:
    """[left, right, top, bottom] for F.pad from a Conv2d padding (ints or 'same'/'valid')."""
    if conv_padding == "valid":
        return [0, 0, 0, 0]
    if conv_padding == "same":
        pads = []
        for k, d in ((kernel[1], dilation[1]), (kernel[0], dilation[0])):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    return [conv_padding[1], conv_padding[1], conv_padding[0], conv_padding[0]]


class TiledSVDConv2d(nn.Module):
    """Exact tiled-SVD conv as two batched GEMMs on the im2col matrix.

    ``first``: (col tiles, row tiles·r, tile cols); ``second``: (row tiles, tile rows, col tiles·r). For an
    input (N, S, H, W): im2col (N, S·kh·kw, L) -> per column tile j, z_j = first[j] @ x_j -> regrouped per row
    tile i, y_i = second[i] @ [z_ij over j] -> (N, T, H', W').
    """

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

    def spec(self) -> dict:
        fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode",
                  "tile_shape", "rank")
        spec = {k: list(v) if isinstance(v, tuple) else v for k, v in ((f, getattr(self, f)) for f in fields)}
        return {"type": "TiledSVDConv2d", "scheme": "tiled_svd", **spec, "bias": self.bias is not None}

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


def tiled_factors(conv: nn.Conv2d, tile_shape: tuple[int, int], rank: int) -> tuple[Tensor, Tensor, TiledSVD]:
    """Per-tile sqrt-split factors: left (nr, nc, tr, r) and right (nr, nc, r, tc), float32."""
    scheme = TiledSVD(tile_shape)
    tiles = scheme.tiles(conv.weight.detach().float().unsqueeze(0))[0]
    u, sv, vh = truncated_svd(tiles, rank)
    if u.shape[-1] < rank:
        pad = rank - u.shape[-1]
        u, sv, vh = F.pad(u, (0, pad)), F.pad(sv, (0, pad)), F.pad(vh, (0, 0, 0, pad))
    left, right = split_sqrt(u, sv, vh)
    return left, right, scheme


def tiled_conv(conv: nn.Conv2d, tile_shape: tuple[int, int], rank: int) -> nn.Module:
    """Tiled SVD conv: grouped conv + channel shuffle + grouped 1×1 conv when column tiles hold whole input
    channels and the tiles divide the matrix; otherwise the im2col ``TiledSVDConv2d``."""
    w = conv.weight.detach()
    t, s, kh, kw = w.shape
    left, right, scheme = tiled_factors(conv, tile_shape, rank)
    tr, tc, nr, nc = scheme.grid(tuple(w.shape))
    aligned = tc % (kh * kw) == 0 and nc * tc == s * kh * kw and nr * tr == t and conv.padding_mode == "zeros"
    if aligned:
        first = right.permute(1, 0, 2, 3).reshape(nc * nr * rank, tc // (kh * kw), kh, kw)
        second = left.permute(0, 2, 3, 1).reshape(nr * tr, rank * nc, 1, 1)
        return LowRankConv2d("tiled_svd", rank, [
            new_conv(first.contiguous().to(w.dtype), groups=nc, **geometry(conv)),
            nn.ChannelShuffle(nc),
            new_conv(second.contiguous().to(w.dtype), conv.bias, groups=nr),
        ])
    module = TiledSVDConv2d(s, t, (kh, kw), conv.stride, conv.padding, conv.dilation, conv.padding_mode,
                            tile_shape, rank, conv.bias is not None).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        module.first.copy_(right.permute(1, 0, 2, 3).reshape(nc, nr * rank, tc))
        module.second.copy_(left.permute(0, 2, 1, 3).reshape(nr, tr, nc * rank))
        if conv.bias is not None:
            module.bias.copy_(conv.bias)
    return module


class LowRankLinear(nn.Sequential):
    """Linear in→r (no bias) then Linear r→out with the bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))
        self.rank = rank

    def spec(self) -> dict:
        return {"type": "LowRankLinear", "scheme": "svd", "in_features": self[0].in_features,
                "out_features": self[1].out_features, "rank": self.rank, "bias": self[1].bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "LowRankLinear":
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"])

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        w = linear.weight.detach()
        u, sv, vh = truncated_svd(w.float(), rank)
        left, right = split_sqrt(u, sv, vh)
        module = cls(linear.in_features, linear.out_features, rank, linear.bias is not None)
        module = module.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            module[0].weight.copy_(right)
            module[1].weight.copy_(left)
            if linear.bias is not None:
                module[1].bias.copy_(linear.bias)
        return module


LAYER_TYPES = {cls.__name__: cls for cls in (LowRankConv2d, TiledSVDConv2d, LowRankLinear)}


def factorized_layer(module: nn.Module, scheme: str, rank: Rank, tile_shape=None, hooi_iters: int = 0) -> nn.Module:
    """The exact factorized replacement of a dense Conv2d or Linear whose weight has the given low rank."""
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_linear(module, int(rank if isinstance(rank, int) else min(rank)))
    if scheme == "svd":
        return svd_conv(module, rank)
    if scheme == "spatial_svd":
        return spatial_conv(module, rank)
    if scheme == "tucker2":
        return tucker2_conv(module, rank, hooi_iters)
    if scheme == "tiled_svd":
        return tiled_conv(module, tile_shape, rank)
    raise ValueError(f"`scheme` must be one of ('svd', 'tiled_svd', 'tucker2', 'spatial_svd'), got {scheme!r}")


def layer_from_spec(spec: dict) -> nn.Module:
    if spec.get("type") not in LAYER_TYPES:
        raise ValueError(f"unknown factorized layer type {spec.get('type')!r}; known: {sorted(LAYER_TYPES)}")
    return LAYER_TYPES[spec["type"]].from_spec(spec)

