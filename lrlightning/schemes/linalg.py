"""Truncated SVD and its building blocks, for batches of matrices (B, m, n). Pure torch."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..transfer import sent

CUSOLVER_DRIVERS = ("gesvd", "gesvdj", "gesvda")  # torch.linalg.svd(driver=...), CUDA only
SVD_DRIVERS = ("auto", "exact", "randomized", "gram", *CUSOLVER_DRIVERS)
AUTO_DRIVERS = {"cpu": "gram"}  # measured by scripts/bench_projection.py; devices not listed take "exact"


def resolve_driver(driver: str, device: torch.device) -> str:
    """The driver that ``driver`` means for matrices on ``device``: ``"auto"`` is ``"gram"`` on the CPU (as fast as
    ``exact`` or faster at every conv shape measured, 1.2-3x on the lowered kernels of CIFAR ResNets, and within
    1e-4 relative of it) and ``"exact"`` elsewhere; other names are themselves. A cuSOLVER driver
    (``CUSOLVER_DRIVERS``) on another device than CUDA raises ``ValueError``."""
    device = torch.device(device)
    if driver in CUSOLVER_DRIVERS and device.type != "cuda":
        raise ValueError(f"`Solver.driver`={driver!r} is a cuSOLVER driver and runs on CUDA only; the weights decompose "
                         f"on {device.type!r}: use one of {tuple(d for d in SVD_DRIVERS if d not in CUSOLVER_DRIVERS)} "
                         "or `Solver.device` 'cuda'")
    return AUTO_DRIVERS.get(device.type, "exact") if driver == "auto" else driver


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
    ``"exact"`` is ``torch.linalg.svd`` with torch's choice of method; a name of ``CUSOLVER_DRIVERS`` (CUDA
    tensors only) is passed to it as its ``driver``.
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
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False, driver=driver if driver in CUSOLVER_DRIVERS else None)
    return u[..., :k], s[..., :k], vh[..., :k, :]


def split_sqrt(u: Tensor, s: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Factors (U·√s, √s·Vh) of a truncated SVD, the singular values split evenly between the two."""
    root = s.sqrt()
    return u * root.unsqueeze(-2), root.unsqueeze(-1) * vh


def rank_mask(ranks: Sequence[int], width: int, like: Tensor) -> Tensor:
    """(B, width) float mask with ones in the first ``ranks[b]`` columns of row b, on ``like``'s device and dtype
    (made on the host and sent without the host waiting, see ``lrlightning.transfer.sent``)."""
    mask = (torch.arange(width).unsqueeze(0) < torch.tensor(list(ranks)).unsqueeze(1)).to(like.dtype)
    return sent(mask, like.device, non_blocking=True)


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


def tail_energy(singular_values: Tensor, ranks: Sequence[int]) -> list[float]:
    """For each rank r: the squared singular values past the first r, over all of them (0 for a zero matrix)."""
    energy = singular_values.double().pow(2)
    kept = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
    total = float(kept[-1])
    return [max(0.0, 1.0 - float(kept[min(int(r), len(energy))]) / total) if total > 0 else 0.0 for r in ranks]
