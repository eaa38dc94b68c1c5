"""The factorized modules shared by several schemes, and the conv building blocks (Conv1d, Conv2d, Conv3d) every
scheme exports with.

A factorized module is a ``FactorizedLayer``: ``spec()`` gives primitive constructor arguments, including the
``"scheme"`` that made it and its ``"type"`` (the module's ``kind``), and ``from_spec(spec)`` rebuilds it, so a
factorized model is saved without pickled classes. Which module a spec rebuilds is the scheme's to say
(``lrlightning.schemes.layer_from_spec``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

CONV_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


class FactorizedLayer:
    """The exact factorized replacement of a dense layer; mixed into an ``nn.Module``."""

    kind = ""

    def spec(self) -> dict:
        """Primitive constructor arguments with ``"type": kind`` and ``"scheme"``; no tensors."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict) -> nn.Module:
        """The module ``spec`` describes, with freshly initialized parameters."""
        raise NotImplementedError


CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
"""The conv class of each number of kernel dimensions."""

Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def is_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a plain Conv1d, Conv2d or Conv3d (transposed convs are not)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def conv_spec(conv: Conv) -> dict:
    spec = {name: getattr(conv, name) for name in CONV_FIELDS}
    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}
    spec["bias"] = conv.bias is not None
    return spec


def conv_from_spec(spec: dict) -> Conv:
    """The conv ``spec`` describes: Conv1d, Conv2d or Conv3d by the length of its ``kernel_size``."""
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    return CONVS[len(args["kernel_size"])](**args)


def geometry(conv: Conv) -> dict:
    """Stride, padding, dilation and padding mode of ``conv``, as conv keyword arguments."""
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, padding_mode=conv.padding_mode)


def new_conv(weight: Tensor, bias: Tensor | None = None, groups: int = 1, **geometry_args) -> Conv:
    """A conv holding ``weight`` (T, S / groups, *kernel) and ``bias``, on their device and dtype: Conv1d, Conv2d
    or Conv3d by the kernel's dimensions."""
    out_channels, in_per_group, *kernel = weight.shape
    conv = CONVS[len(kernel)](in_per_group * groups, out_channels, tuple(kernel), groups=groups,
                              bias=bias is not None, device=weight.device, dtype=weight.dtype, **geometry_args)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


class LowRankConv2d(nn.Sequential, FactorizedLayer):
    """A chain of plain convs of one dimension (svd: 2, spatial_svd: 2, tucker2: 3, aligned tiled_svd: conv,
    shuffle, conv); each stage grouped when the dense conv was. Its name is kept for the saved
    ``"type"``; it holds Conv1d and Conv3d chains too."""

    kind = "LowRankConv2d"

    def __init__(self, scheme: str, rank, layers: list[nn.Module]):
        super().__init__(*layers)
        self.scheme = scheme
        self.rank = rank

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, rank={self.rank}"

    def spec(self) -> dict:
        parts = [{"shuffle": m.groups} if isinstance(m, nn.ChannelShuffle) else conv_spec(m) for m in self]
        return {"type": self.kind, "scheme": self.scheme, "rank": self.rank, "layers": parts}

    @classmethod
    def from_spec(cls, spec: dict) -> "LowRankConv2d":
        layers = [nn.ChannelShuffle(p["shuffle"]) if "shuffle" in p else conv_from_spec(p) for p in spec["layers"]]
        rank = tuple(spec["rank"]) if isinstance(spec["rank"], list) else spec["rank"]
        return cls(spec["scheme"], rank, layers)


class LowRankLinear(nn.Sequential, FactorizedLayer):
    """Linear in→r (no bias) then Linear r→out with the bias; the ``svd`` factorization of a Linear."""

    kind = "LowRankLinear"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))
        self.rank = rank

    def extra_repr(self) -> str:
        return f"scheme=svd, rank={self.rank}"

    def spec(self) -> dict:
        return {"type": self.kind, "scheme": "svd", "in_features": self[0].in_features,
                "out_features": self[1].out_features, "rank": self.rank, "bias": self[1].bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "LowRankLinear":
        return cls(spec["in_features"], spec["out_features"], spec["rank"], spec["bias"])
