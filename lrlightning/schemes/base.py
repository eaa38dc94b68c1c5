"""What a scheme is: its rank rules, its projection and its exact factorized module. Pure torch.

Notation: a conv kernel has shape (T, S, kh, kw) (out channels, in channels, kernel height, width; (T, S, k) for
Conv1d, (T, S, kd, kh, kw) for Conv3d); a Linear weight (T, S). A grouped conv is projected group by group
(``lrlightning.schemes.grouped``), so a scheme only ever sees dense kernels. Every ``project`` works on a batch of weights of one shape, in float32, with one rank per weight,
and returns the reconstructed weights (the orthogonal projection onto the scheme's low-rank set).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..layers import FactorizedLayer, LowRankConv2d, new_conv
from .linalg import low_rank_matrices, smallest_rank_for_energy, split_sqrt, tail_energy, truncated_svd
from .weighting import Weighting, output_error, weighted_low_rank

Rank = int | tuple[int, int]


class Scheme:
    """A low-rank scheme for weights of one kind, registered under ``name`` (``lrlightning.schemes.register``).

    Subclasses define the rank set (``full_rank``, ``factorized_params``, ``project``, ``energy_rank``) and the
    exact factorized module (``factorized_layer``; ``layer_types``: the modules it builds, rebuilt from a spec).
    """

    name = ""
    pair_rank = False
    weighted = False  # whether ``project_weighted`` is defined (``objective="activation"``)
    input_statistic = "im2col"  # the input moments it weights by: of im2col rows, or of pixels' "channels"
    layer_types: tuple[type[FactorizedLayer], ...] = (LowRankConv2d,)
    kernel_dims: tuple[int, ...] = (2,)  # the conv dimensions it factorizes (1: Conv1d, 2: Conv2d, 3: Conv3d)
    groupable = False  # whether its factorized layer is a chain of plain convs, so grouped convs merge per group

    def refusal(self, shape: tuple[int, ...], groups: int = 1) -> str | None:
        """Why a conv kernel of ``shape`` (T, S / groups, *kernel) with ``groups`` cannot take this scheme, or
        None when it can."""
        dims = len(shape) - 2
        if dims not in self.kernel_dims:
            allowed = ", ".join(f"Conv{d}d" for d in self.kernel_dims)
            return f"scheme {self.name!r} factorizes {allowed} only, not Conv{dims}d"
        if groups > 1 and not self.groupable:
            return f"scheme {self.name!r} does not factorize grouped convs (groups={groups})"
        return None

    def options(self) -> dict[str, Any]:
        """The scheme's own options as JSON-ready values, as its constructor takes them (default: none).
        Schemes with options validate them in ``__init__`` and override this; equality and ``repr`` use it."""
        return {}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options() == self.options()

    def __hash__(self) -> int:
        return hash((type(self), repr(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    def full_rank(self, shape: tuple[int, ...]) -> Rank:
        """The largest meaningful rank for a weight of ``shape``."""
        raise NotImplementedError

    def factorized_params(self, shape: tuple[int, ...], rank: Rank) -> int:
        """Weight parameters of the factorized layer (bias excluded)."""
        raise NotImplementedError

    def project(self, weights: Tensor, ranks: Sequence[Rank], driver: str = "exact") -> Tensor:
        """Project a batch (B, *shape) of float32 weights onto the rank set; same shape out."""
        raise NotImplementedError

    def project_weighted(self, weights: Tensor, ranks: Sequence[Rank], driver: str, weighting: Weighting) -> Tensor:
        """``project`` onto the same rank set, minimizing the output error of ``weighting`` (see
        ``lrlightning.schemes.weighting``) instead of the weight error; schemes setting ``weighted`` define it."""
        raise NotImplementedError(f"scheme {self.name!r} has no projection for objective='activation'")

    def output_error(self, weights: Tensor, approx: Tensor, weighting: Weighting) -> Tensor:
        """Relative output error (B,), float64, of projected ``approx`` against ``weights`` (B, *shape) under
        ``weighting`` (``lrlightning.schemes.weighting.output_error``)."""
        return output_error(weights, approx, weighting)

    def energy_rank(self, weight: Tensor, energy: float) -> Rank:
        """Smallest rank keeping at least ``energy`` of the squared singular-value energy."""
        raise NotImplementedError

    def rank_errors(self, weight: Tensor, ranks: Sequence[Rank], driver: str = "exact") -> list[float]:
        """Normalized squared error ||W − W_r||² / ||W||² of one float32 ``weight`` projected at each of ``ranks``
        (by default one batched projection; schemes with a closed form override this)."""
        if not ranks:
            return []
        shape = tuple(weight.shape)
        approx = self.project(weight.unsqueeze(0).expand(len(ranks), *shape).contiguous(), ranks, driver)
        return ((approx - weight).flatten(1).pow(2).sum(1) / weight.pow(2).sum().clamp_min(1e-30)).tolist()

    def output_rank_errors(self, weight: Tensor, ranks: Sequence[Rank], driver: str,
                           weighting: Weighting) -> list[float]:
        """Normalized squared output error E‖D(W − W_r)x‖² / E‖D·W·x‖² of one float32 ``weight`` under a
        ``weighting`` of one layer (batch 1), with W_r its weighted projection at each of ``ranks`` (one batched
        ``project_weighted``): the error an ``objective="activation"`` projection makes at each rank."""
        if not ranks:
            return []
        count, shape = len(ranks), tuple(weight.shape)
        weights = weight.unsqueeze(0).expand(count, *shape).contiguous()
        inputs = weighting.inputs.expand(count, *weighting.inputs.shape[1:])
        outputs = weighting.outputs.expand(count, -1) if weighting.outputs is not None else None
        batch = Weighting(inputs, outputs, weighting.ridge)
        approx = self.project_weighted(weights, ranks, driver, batch)
        return self.output_error(weights, approx, batch).pow(2).tolist()

    def factorized_layer(self, layer: nn.Module, rank: Rank) -> nn.Module:
        """The ``FactorizedLayer`` computing what ``layer`` computes with its weight projected at ``rank`` (exactly
        so when the weight already lies in the rank set), on the weight's device and dtype; ``layer`` is untouched."""
        raise NotImplementedError

    def stages(self, layer: nn.Module, kernels: Tensor, rank: Rank) -> list[tuple[Tensor, dict]]:
        """For schemes setting ``groupable``: the factorized chain of a batch (G, T, S, *kernel) of float32 dense
        kernels of ``layer`` at ``rank``, stage by stage: each stage's kernels (G, out, in, *kernel') with its conv
        keyword arguments (stride, padding, ...). ``chain_layer`` builds the convs."""
        raise NotImplementedError

    def chain_layer(self, layer: nn.Module, rank: Rank, groups: int = 1) -> LowRankConv2d:
        """The ``LowRankConv2d`` of a conv ``layer`` whose ``groups`` groups are factorized side by side
        (``stages``): stage i is one conv with ``groups`` groups, the layer's bias on the last stage; on the
        weight's device and dtype."""
        weight = layer.weight.detach()
        kernels = weight.float().reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        parts = self.stages(layer, kernels, rank)
        convs = [new_conv(stage.reshape(-1, *stage.shape[2:]).contiguous().to(weight.dtype),
                          layer.bias if index == len(parts) - 1 else None, groups=groups, **arguments)
                 for index, (stage, arguments) in enumerate(parts)]
        return LowRankConv2d(self.name, rank, convs)

    @classmethod
    def layer_from_spec(cls, spec: dict) -> nn.Module:
        """Rebuild one of ``layer_types`` from the ``spec()`` it wrote (its ``"type"`` names the module kind)."""
        kinds = {layer_type.kind: layer_type for layer_type in cls.layer_types}
        if spec.get("type") not in kinds:
            raise ValueError(f"scheme {cls.name!r} has no factorized layer of type {spec.get('type')!r}; "
                             f"its types: {sorted(kinds)}")
        return kinds[spec["type"]].from_spec(spec)

    def rank_candidates(self, shape: tuple[int, ...]) -> Iterable[Rank]:
        """Ranks from largest to smallest, for the compression-target rule."""
        full = self.full_rank(shape)
        return range(full, 0, -1)

    def rank_from_fraction(self, shape: tuple[int, ...], fraction: float) -> Rank:
        return max(1, math.floor(fraction * self.full_rank(shape) + 1e-9))

    def clamp(self, shape: tuple[int, ...], rank: Rank) -> Rank:
        return min(int(rank), self.full_rank(shape))


class MatrixScheme(Scheme):
    """A scheme that truncates one matrix view (B, m, n) of a batch of weights (B, *shape)."""

    def to_matrix(self, weights: Tensor) -> Tensor:
        raise NotImplementedError

    def from_matrix(self, matrices: Tensor, shape: tuple[int, ...]) -> Tensor:
        raise NotImplementedError

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return tuple(self.to_matrix(torch.empty((1, *shape), device="meta")).shape[1:])

    def full_rank(self, shape):
        return min(self.matrix_shape(shape))

    def factorized_params(self, shape, rank):
        return int(rank) * sum(self.matrix_shape(shape))

    def project(self, weights, ranks, driver="exact"):
        shape = tuple(weights.shape[1:])
        return self.from_matrix(low_rank_matrices(self.to_matrix(weights), ranks, driver), shape)

    def matrix_metrics(self, weighting: Weighting, shape: tuple[int, ...]) -> tuple[Tensor | None, Tensor | None]:
        """Row (B, m, m) and column (B, n, n) metrics of the matrix view under ``weighting`` (None: identity), for
        schemes setting ``weighted``."""
        raise NotImplementedError(f"scheme {self.name!r} has no projection for objective='activation'")

    def project_weighted(self, weights, ranks, driver, weighting):
        shape = tuple(weights.shape[1:])
        rows, columns = self.matrix_metrics(weighting, shape)
        approx = weighted_low_rank(self.to_matrix(weights), ranks, driver, rows, columns, weighting.ridge)
        return self.from_matrix(approx, shape)

    def energy_rank(self, weight, energy):
        s = torch.linalg.svdvals(self.to_matrix(weight.unsqueeze(0))[0])
        return smallest_rank_for_energy(s, energy)

    def rank_errors(self, weight, ranks, driver="exact"):
        """Eckart–Young: the squared singular values past each rank, over all of them (one ``svdvals``)."""
        return tail_energy(torch.linalg.svdvals(self.to_matrix(weight.unsqueeze(0))[0].double()), ranks)

    def matrix_factors(self, weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """Left (m, rank) and right (rank, n) float32 factors of one weight's matrix view truncated at ``rank``,
        the singular values split evenly (``split_sqrt``): left @ right is the projected matrix."""
        left, right = self.batch_factors(weight.detach().float().unsqueeze(0), rank)
        return left[0], right[0]

    def batch_factors(self, weights: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """``matrix_factors`` of a batch (B, *shape) of float32 weights: left (B, m, rank), right (B, rank, n)."""
        return split_sqrt(*truncated_svd(self.to_matrix(weights), rank))
