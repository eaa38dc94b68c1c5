"""The low-rank schemes: how a kernel is reshaped, truncated and multiplied back. Pure torch.

Notation: a conv kernel has shape (T, S, kh, kw) (out channels, in channels, kernel height, width); a Linear
weight (T, S). Every ``project`` works on a batch of weights of one shape, in float32, with one rank per weight,
and returns the reconstructed weights (the orthogonal projection onto the scheme's low-rank set).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor

Rank = int | tuple[int, int]


def gram_basis(matrices: Tensor, max_rank: int, left: bool | None = None) -> tuple[Tensor, Tensor, bool]:
    """Leading singular vectors of one side of a batch (B, m, n), from ``eigh`` of its Gram matrix in float64.

    ``left``: True for the column space (eigh of A·Aᵀ, m × m), False for the row space (Aᵀ·A, n × n), None for
    the shorter side. Returns the orthonormal vectors (B, m or n, k) in float64, the singular values (B, k) in
    float64 and the side taken; k = min(max_rank, m, n).
    """
    k = min(max_rank, *matrices.shape[-2:])
    a = matrices.double()
    left = a.shape[-2] <= a.shape[-1] if left is None else left
    values, vectors = torch.linalg.eigh(a @ a.mT if left else a.mT @ a)
    values = values.flip(-1)[..., :k].clamp_min(0).sqrt()
    return vectors.flip(-1)[..., :k], values, left


def truncated_svd(matrices: Tensor, max_rank: int, driver: str = "exact") -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``max_rank`` singular triplets of a batch (B, m, n): returns U (B, m, k), s (B, k), Vh (B, k, n).

    ``driver="randomized"`` uses ``torch.svd_lowrank`` (oversampling 8, 2 power iterations): faster for large
    matrices and small ranks, exact when the matrix rank is at most ``max_rank + 8``.
    ``driver="gram"`` takes the shorter side's vectors from ``gram_basis`` and the other side's by one product;
    those are zero where a singular value is numerically zero (below ``max(m, n) · eps(float32) · s_max``).
    """
    k = min(max_rank, *matrices.shape[-2:])
    if driver == "randomized":
        q = min(k + 8, *matrices.shape[-2:])
        u, s, v = torch.svd_lowrank(matrices, q=q, niter=2)
        return u[..., :k], s[..., :k], v[..., :k].mT
    if driver == "gram":
        a = matrices.double()
        vectors, s, left = gram_basis(a, k)
        tolerance = s[..., :1] * max(matrices.shape[-2:]) * torch.finfo(torch.float32).eps
        inverse = torch.where(s > tolerance, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
        if left:
            u, vh = vectors, (vectors.mT @ a) * inverse.unsqueeze(-1)
        else:
            u, vh = (a @ vectors) * inverse.unsqueeze(-2), vectors.mT
        return u.to(matrices.dtype), s.to(matrices.dtype), vh.to(matrices.dtype)
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return u[..., :k], s[..., :k], vh[..., :k, :]


def rank_mask(ranks: Sequence[int], width: int, like: Tensor) -> Tensor:
    """(B, width) float mask with ones in the first ``ranks[b]`` columns of row b."""
    limits = torch.tensor(list(ranks), device=like.device).unsqueeze(1)
    return (torch.arange(width, device=like.device).unsqueeze(0) < limits).to(like.dtype)


def low_rank_matrices(matrices: Tensor, ranks: Sequence[int], driver: str = "exact") -> Tensor:
    """Best rank-``ranks[b]`` approximation (Eckart–Young) of each matrix of a batch (B, m, n)."""
    if driver == "gram":
        a = matrices.double()
        vectors, _, left = gram_basis(a, max(ranks))
        vectors = vectors * rank_mask(ranks, vectors.shape[-1], vectors).unsqueeze(-2)
        approx = vectors @ (vectors.mT @ a) if left else (a @ vectors) @ vectors.mT
        return approx.to(matrices.dtype)
    u, s, vh = truncated_svd(matrices, max(ranks), driver)
    s = s * rank_mask(ranks, s.shape[-1], s)
    return (u * s.unsqueeze(-2)) @ vh


def smallest_rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest k whose top-k squared singular values keep at least ``energy`` of the total (1-D input)."""
    power = singular_values.double().pow(2)
    total = power.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


class Scheme:
    """A low-rank scheme for weights of one kind. Subclasses define the matrix view and the parameter count."""

    name = ""
    pair_rank = False

    def full_rank(self, shape: tuple[int, ...]) -> Rank:
        """The largest meaningful rank for a weight of ``shape``."""
        raise NotImplementedError

    def factorized_params(self, shape: tuple[int, ...], rank: Rank) -> int:
        """Weight parameters of the factorized layer (bias excluded)."""
        raise NotImplementedError

    def project(self, weights: Tensor, ranks: Sequence[Rank], driver: str = "exact") -> Tensor:
        """Project a batch (B, *shape) of float32 weights onto the rank set; same shape out."""
        raise NotImplementedError

    def energy_rank(self, weight: Tensor, energy: float) -> Rank:
        """Smallest rank keeping at least ``energy`` of the squared singular-value energy."""
        raise NotImplementedError

    def rank_candidates(self, shape: tuple[int, ...]) -> Iterable[Rank]:
        """Ranks from largest to smallest, for the compression-target rule."""
        full = self.full_rank(shape)
        return range(full, 0, -1)

    def rank_from_fraction(self, shape: tuple[int, ...], fraction: float) -> Rank:
        return max(1, math.floor(fraction * self.full_rank(shape) + 1e-9))

    def clamp(self, shape: tuple[int, ...], rank: Rank) -> Rank:
        return min(int(rank), self.full_rank(shape))


class MatrixScheme(Scheme):
    """A scheme that truncates one matrix view of the weight."""

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

    def energy_rank(self, weight, energy):
        s = torch.linalg.svdvals(self.to_matrix(weight.unsqueeze(0))[0])
        return smallest_rank_for_energy(s, energy)


class LoweredSVD(MatrixScheme):
    """``svd``: the im2col-lowered matrix T × (S·kh·kw) (paper §4.1); Linear weights as they are."""

    name = "svd"

    def to_matrix(self, weights):
        return weights.reshape(weights.shape[0], weights.shape[1], -1)

    def from_matrix(self, matrices, shape):
        return matrices.reshape(-1, *shape)


class SpatialSVD(MatrixScheme):
    """``spatial_svd``: the (S·kh) × (T·kw) matrix of Jaderberg et al.; exports as a kh×1 then a 1×kw conv."""

    name = "spatial_svd"

    def to_matrix(self, weights):
        b, t, s, kh, kw = weights.shape
        return weights.permute(0, 2, 3, 1, 4).reshape(b, s * kh, t * kw)

    def from_matrix(self, matrices, shape):
        t, s, kh, kw = shape
        return matrices.reshape(-1, s, kh, t, kw).permute(0, 3, 1, 2, 4)


class TiledSVD(Scheme):
    """``tiled_svd``: the lowered matrix T × (S·kh·kw), columns in PyTorch order (s, i, j), cut into tiles of
    ``tile_shape = (rows, cols)``; each tile keeps its own rank-r SVD (paper §4.2).

    Tiles larger than the matrix are clamped to it. Ragged edge tiles (sizes that do not divide) are zero-padded
    to the full tile size, which gives each the best rank-min(r, its size) approximation; exported factors are
    stored at the padded size and counted as stored.
    """

    name = "tiled_svd"

    def __init__(self, tile_shape: tuple[int, int]):
        self.tile_shape = tuple(int(v) for v in tile_shape)

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
        padded = torch.nn.functional.pad(matrix, (0, nc * tc - matrix.shape[2], 0, nr * tr - matrix.shape[1]))
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

    def energy_rank(self, weight, energy):
        tiles = self.tiles(weight.unsqueeze(0)).flatten(0, 2)
        return max(smallest_rank_for_energy(s, energy) for s in torch.linalg.svdvals(tiles))


class Tucker2(Scheme):
    """``tucker2``: Tucker-2 on the two channel modes, ranks (R_in, R_out) (paper §3).

    HOSVD, then ``hooi_iters`` rounds of higher-order orthogonal iteration (each never increases the error).
    Exports as 1×1 conv S→R_in, kh×kw conv R_in→R_out, 1×1 conv R_out→T.
    """

    name = "tucker2"
    pair_rank = True

    def __init__(self, hooi_iters: int = 0):
        self.hooi_iters = int(hooi_iters)

    def full_rank(self, shape):
        return (shape[1], shape[0])

    def factorized_params(self, shape, rank):
        t, s = shape[0], shape[1]
        r_in, r_out = rank
        return s * r_in + math.prod(shape[2:]) * r_in * r_out + r_out * t

    def rank_from_fraction(self, shape, fraction):
        return tuple(max(1, math.floor(fraction * n + 1e-9)) for n in self.full_rank(shape))

    def clamp(self, shape, rank):
        r_in, r_out = (rank, rank) if isinstance(rank, int) else rank
        return (min(int(r_in), shape[1]), min(int(r_out), shape[0]))

    def rank_candidates(self, shape):
        t, s = shape[0], shape[1]
        return [(max(1, math.floor(r_out * s / t)), r_out) for r_out in range(t, 0, -1)]

    @staticmethod
    def leading_vectors(matrices: Tensor, ranks: Sequence[int], driver: str = "exact") -> Tensor:
        """Masked leading left singular vectors (B, m, max rank): columns past ``ranks[b]`` are zero."""
        if driver == "gram":
            u = gram_basis(matrices, max(ranks), left=True)[0].to(matrices.dtype)
        else:
            u, _, _ = truncated_svd(matrices, max(ranks), driver)
        return u * rank_mask(ranks, u.shape[-1], u).unsqueeze(-2)

    def factors(self, weights: Tensor, ranks: Sequence[tuple[int, int]],
                driver: str = "exact") -> tuple[Tensor, Tensor, Tensor]:
        """(core (B, R_out, R_in, kh, kw), U_in (B, S, R_in), U_out (B, T, R_out)), masked to each rank."""
        b, t, s = weights.shape[:3]
        r_in = [r[0] for r in ranks]
        r_out = [r[1] for r in ranks]
        unfold_out = weights.reshape(b, t, -1)
        unfold_in = weights.transpose(1, 2).reshape(b, s, -1)
        u_out = self.leading_vectors(unfold_out, r_out, driver)
        u_in = self.leading_vectors(unfold_in, r_in, driver)
        for _ in range(self.hooi_iters):
            partial = torch.einsum("btsij,btr->brsij", weights, u_out)
            u_in = self.leading_vectors(partial.transpose(1, 2).reshape(b, s, -1), r_in, driver)
            partial = torch.einsum("btsij,bsq->btqij", weights, u_in)
            u_out = self.leading_vectors(partial.reshape(b, t, -1), r_out, driver)
        core = torch.einsum("btsij,btr,bsq->brqij", weights, u_out, u_in)
        return core, u_in, u_out

    def project(self, weights, ranks, driver="exact"):
        core, u_in, u_out = self.factors(weights, ranks, driver)
        return torch.einsum("brqij,btr,bsq->btsij", core, u_out, u_in)

    def energy_rank(self, weight, energy):
        t, s = weight.shape[:2]
        r_out = smallest_rank_for_energy(torch.linalg.svdvals(weight.reshape(t, -1)), energy)
        r_in = smallest_rank_for_energy(torch.linalg.svdvals(weight.transpose(0, 1).reshape(s, -1)), energy)
        return (r_in, r_out)


SCHEME_NAMES = ("svd", "tiled_svd", "tucker2", "spatial_svd")
SVD_DRIVERS = ("exact", "randomized", "gram")


def make_scheme(name: str, tile_shape: tuple[int, int] | None = None, hooi_iters: int = 0) -> Scheme:
    """The scheme object for a public scheme name (already validated by ``LowRankOptions``)."""
    if name == "svd":
        return LoweredSVD()
    if name == "spatial_svd":
        return SpatialSVD()
    if name == "tiled_svd":
        return TiledSVD(tile_shape)
    if name == "tucker2":
        return Tucker2(hooi_iters)
    raise ValueError(f"`scheme` must be one of {SCHEME_NAMES}, got {name!r}")
