"""The output-error metric of ``objective="activation"``, and the whitened truncation it leads to. Pure torch.

For a layer computing y = W·x on its im2col input rows x (conv: n = S·kh·kw, in the column order of
``weight.reshape(T, -1)``; Linear: n = in features), with C = E[x xᵀ] (n × n) and optional per-output-channel
scales d (T,) (the following BatchNorm's |γ|/σ), the output error of a replacement W_r is
    E‖D·(W − W_r)·x‖² = ‖D·(W − W_r)·L‖²_F,   C = L·Lᵀ (Cholesky), D = diag(d).
A matrix view A with a metric M_l on its rows and M_r on its columns (error tr((ΔA)ᵀ M_l ΔA M_r)) is truncated
best in that error by A_r = L_l⁻ᵀ·[L_lᵀ·A·L_r]_r·L_r⁻¹ (Eckart–Young in the whitened space): still exactly rank r.
Each metric gets a ridge of ``ridge`` times its mean diagonal before the Cholesky factor is taken, so a direction
the inputs never take (or a channel with γ = 0) keeps a small weight-space error instead of an arbitrary one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .linalg import low_rank_matrices


@dataclass(frozen=True)
class Weighting:
    """The output-error metric of a batch of B layers of one shape.

    ``inputs``: (B, n, n) second moments of each layer's im2col input rows (float64 preferred), or for schemes
    whose ``input_statistic`` is ``"channels"`` those of its input pixels' channel vectors (B, S, S).
    ``outputs``: (B, T) nonnegative per-output-channel scales, or None (all ones).
    ``ridge``: added to each metric as a fraction of its mean diagonal (default 1e-2).
    """

    inputs: Tensor
    outputs: Tensor | None = None
    ridge: float = 1e-2

    def output_metric(self, repeat: int = 1) -> Tensor | None:
        """(B, T·repeat, T·repeat) diagonal metric diag(d²) of the output channels, each repeated ``repeat`` times
        in a row; None without scales."""
        if self.outputs is None:
            return None
        return torch.diag_embed(self.outputs.double().pow(2).repeat_interleave(repeat, dim=-1))


def whitening(metric: Tensor, ridge: float) -> Tensor:
    """Lower Cholesky factors L (B, n, n), float64, of ``metric`` (B, n, n) + ``ridge`` · mean diagonal · I; a zero
    metric gives the identity."""
    m = metric.double()
    m = (m + m.mT) / 2
    scale = m.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    shift = ridge * scale.unsqueeze(-1) * eye
    factor, info = torch.linalg.cholesky_ex(m + shift)
    if bool((info > 0).any()):  # rounding made a nearly singular metric indefinite: retry on its clamped spectrum
        values, vectors = torch.linalg.eigh(m)
        m = (vectors * values.clamp_min(0).unsqueeze(-2)) @ vectors.mT
        factor = torch.linalg.cholesky(m + shift)
    return factor


def unwhiten_left(a: Tensor, factor: Tensor) -> Tensor:
    """L⁻ᵀ·A for a batch (B, m, n) and lower factors (B, m, m) (a triangular solve, no inverse formed)."""
    return torch.linalg.solve_triangular(factor.mT, a, upper=True)


def weighted_low_rank(matrices: Tensor, ranks: Sequence[int], driver: str, rows: Tensor | None,
                      columns: Tensor | None, ridge: float) -> Tensor:
    """Best rank-``ranks[b]`` approximation of each matrix of a batch (B, m, n) in the error
    tr(ΔAᵀ·M_l·ΔA·M_r) with row metrics ``rows`` (B, m, m) and column metrics ``columns`` (B, n, n) (None: the
    identity); in float64, returned in the input dtype."""
    a = matrices.double()
    left = whitening(rows, ridge) if rows is not None else None
    right = whitening(columns, ridge) if columns is not None else None
    if left is not None:
        a = left.mT @ a
    if right is not None:
        a = a @ right
    approx = low_rank_matrices(a, ranks, driver)
    if right is not None:
        approx = unwhiten_left(approx.mT, right).mT
    if left is not None:
        approx = unwhiten_left(approx, left)
    return approx.to(matrices.dtype)


def kernel_trace(moment: Tensor, channels: int, keep: int = 1) -> Tensor:
    """The im2col moments (B, S·k, S·k) (k kernel positions in (kh, kw) order) summed over the trailing kernel
    positions: ``keep=1`` gives the channel moments (B, S, S); ``keep=kh`` with k = kh·kw keeps the rows of the
    kernel, (B, S·kh, S·kh) in (s, i) order."""
    b, n = moment.shape[0], moment.shape[-1]
    rest = n // (channels * keep)
    grid = moment.reshape(b, channels * keep, rest, channels * keep, rest)
    return grid.diagonal(dim1=2, dim2=4).sum(-1)


def channel_moments(weighting: Weighting, shape: tuple[int, ...]) -> Tensor:
    """(B, S, S) input channel moments of layers of ``shape``: ``inputs`` when they are channel moments already,
    else the im2col moments summed over kernel positions."""
    channels = shape[1]
    return weighting.inputs if weighting.inputs.shape[-1] == channels else kernel_trace(weighting.inputs, channels)


def output_energies(weights: Tensor, approx: Tensor, weighting: Weighting) -> tuple[Tensor, Tensor]:
    """E‖D(W − W_r)x‖² and E‖D·W·x‖² of each layer (B,), float64, under the moments themselves (no ridge); with
    channel moments C (a conv's ``inputs`` of size S) the im2col moment is taken as C ⊗ I (inputs at different
    kernel positions uncorrelated)."""
    b, t = weights.shape[:2]
    moment = weighting.inputs.double()
    per_position = weights.dim() > 3 and moment.shape[-1] == weights.shape[2]
    w = weights.double().reshape(b, t, moment.shape[-1], -1) if per_position else weights.double().reshape(b, t, -1, 1)
    delta = w - approx.double().reshape(w.shape)
    scale = torch.ones(b, t, dtype=w.dtype, device=w.device) if weighting.outputs is None \
        else weighting.outputs.double()

    def energy(m: Tensor) -> Tensor:
        return torch.einsum("btsk,bsu,btuk,bt->b", m, moment, m, scale.pow(2)).clamp_min(0)
    return energy(delta), energy(w)


def output_error(weights: Tensor, approx: Tensor, weighting: Weighting) -> Tensor:
    """Relative output error sqrt(E‖D(W − W_r)x‖² / E‖D·W·x‖²) of each layer (B,), float64 (``output_energies``)."""
    error, total = output_energies(weights, approx, weighting)
    return (error / total.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()
