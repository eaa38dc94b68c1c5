"""``tucker2``: Tucker-2 on the two channel modes of a conv kernel, ranks (R_in, R_out) (paper §3)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..layers import geometry
from .base import Scheme
from .linalg import gram_basis, rank_mask, smallest_rank_for_energy, truncated_svd
from .weighting import Weighting, channel_moments, unwhiten_left, whitening


class Tucker2(Scheme):
    """``tucker2``: HOSVD, then ``hooi_iters`` rounds of higher-order orthogonal iteration (each never increases
    the error). Exports as pointwise conv S→R_in, conv R_in→R_out with the kernel (original geometry), pointwise
    conv R_out→T with the bias; Conv1d and Conv3d kernels alike (the kernel positions are one mode)."""

    name = "tucker2"
    pair_rank = True
    weighted = True
    input_statistic = "channels"
    kernel_dims = (1, 2, 3)
    groupable = True

    def __init__(self, hooi_iters: int = 0):
        """``hooi_iters``: rounds of higher-order orthogonal iteration after the HOSVD (int >= 0, default 0)."""
        if not (isinstance(hooi_iters, int) and not isinstance(hooi_iters, bool) and hooi_iters >= 0):
            raise ValueError(f"`hooi_iters` of Tucker2 must be an int >= 0, got {hooi_iters!r}")
        self.hooi_iters = hooi_iters

    def options(self):
        return {"hooi_iters": self.hooi_iters}

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
        """(core (B, R_out, R_in, *kernel), U_in (B, S, R_in), U_out (B, T, R_out)), masked to each rank."""
        kernel = weights.shape[3:]
        b, t, s = weights.shape[:3]
        weights = weights.reshape(b, t, s, -1)
        r_in = [r[0] for r in ranks]
        r_out = [r[1] for r in ranks]
        unfold_out = weights.reshape(b, t, -1)
        unfold_in = weights.transpose(1, 2).reshape(b, s, -1)
        u_out = self.leading_vectors(unfold_out, r_out, driver)
        u_in = self.leading_vectors(unfold_in, r_in, driver)
        for _ in range(self.hooi_iters):
            partial = torch.einsum("btsk,btr->brsk", weights, u_out)
            u_in = self.leading_vectors(partial.transpose(1, 2).reshape(b, s, -1), r_in, driver)
            partial = torch.einsum("btsk,bsq->btqk", weights, u_in)
            u_out = self.leading_vectors(partial.reshape(b, t, -1), r_out, driver)
        core = torch.einsum("btsk,btr,bsq->brqk", weights, u_out, u_in)
        return core.reshape(*core.shape[:3], *kernel), u_in, u_out

    @staticmethod
    def product(core: Tensor, u_in: Tensor, u_out: Tensor) -> Tensor:
        """The kernels (B, T, S, *kernel) of the factors: core ×_in U_in ×_out U_out."""
        flat = torch.einsum("brqk,btr,bsq->btsk", core.flatten(3), u_out, u_in)
        return flat.reshape(*flat.shape[:3], *core.shape[3:])

    def project(self, weights, ranks, driver="exact"):
        return self.product(*self.factors(weights, ranks, driver))

    def weighted_factors(self, weights: Tensor, ranks: Sequence[tuple[int, int]], driver: str,
                         weighting: Weighting) -> tuple[Tensor, Tensor, Tensor]:
        """``factors`` of the whitened kernel W' = W ×_in L_in ×_out L_out, mapped back (U ← L⁻ᵀ·U), so that the
        same product is the projection minimizing the output error: L_in from the channel moments (an
        approximation of the im2col moment by C ⊗ I: equal moments at every kernel position, none across them),
        L_out from the output scales. The factors are oblique, not orthonormal; the multilinear rank is kept."""
        inputs = whitening(channel_moments(weighting, tuple(weights.shape[1:])), weighting.ridge)
        outputs = weighting.output_metric()
        w = torch.einsum("btsk,bsv->btvk", weights.double().flatten(3), inputs)
        if outputs is not None:
            outputs = whitening(outputs, weighting.ridge)
            w = torch.einsum("btsk,btu->busk", w, outputs)
        w = w.reshape(weights.shape)
        core, u_in, u_out = self.factors(w, ranks, driver)
        u_in = unwhiten_left(u_in, inputs)
        if outputs is not None:
            u_out = unwhiten_left(u_out, outputs)
        return tuple(x.to(weights.dtype) for x in (core, u_in, u_out))

    def project_weighted(self, weights, ranks, driver, weighting):
        return self.product(*self.weighted_factors(weights, ranks, driver, weighting))

    @staticmethod
    def mode_basis(unfolding: Tensor) -> Tensor:
        """All left singular vectors (m, m) of one float64 unfolding (m, n), leading first: ``eigh`` of its Gram."""
        return torch.linalg.eigh(unfolding @ unfolding.T)[1].flip(-1)

    def rank_errors(self, weight, ranks, driver="exact"):
        """With HOSVD (``hooi_iters=0``) in closed form: ||W||² − ||core restricted to the ranks||², from one full
        core (the projection onto leading singular vectors of each mode is orthogonal); else by projection."""
        if self.hooi_iters or not ranks:
            return super().rank_errors(weight, ranks, driver)
        t, s = weight.shape[:2]
        w = weight.double().reshape(t, s, -1)
        u_out = self.mode_basis(w.reshape(t, -1))
        u_in = self.mode_basis(w.transpose(0, 1).reshape(s, -1))
        core = torch.einsum("tsk,tr,sq->rqk", w, u_out, u_in).pow(2).sum(2)
        kept = torch.nn.functional.pad(core.cumsum(0).cumsum(1), (1, 0, 1, 0))
        total = float(w.pow(2).sum())
        if total == 0:
            return [0.0] * len(ranks)
        return [max(0.0, 1.0 - float(kept[min(r_out, core.shape[0]), min(r_in, core.shape[1])]) / total)
                for r_in, r_out in ranks]

    def energy_rank(self, weight, energy):
        t, s = weight.shape[:2]
        r_out = smallest_rank_for_energy(torch.linalg.svdvals(weight.reshape(t, -1)), energy)
        r_in = smallest_rank_for_energy(torch.linalg.svdvals(weight.transpose(0, 1).reshape(s, -1)), energy)
        return (r_in, r_out)

    def factorized_layer(self, layer, rank):
        return self.chain_layer(layer, tuple(rank))

    def stages(self, layer, kernels, rank):
        """A pointwise conv S→R_in, a conv R_in→R_out with the kernel and geometry of ``layer``, a pointwise conv
        R_out→T."""
        core, u_in, u_out = self.factors(kernels, [tuple(rank)] * kernels.shape[0])
        pointwise = (...,) + (None,) * (kernels.dim() - 3)
        return [(u_in.mT[pointwise], {}), (core, geometry(layer)), (u_out[pointwise], {})]
