"""The divergence guard of ``LowRankProjection``: a NaN/Inf training loss is recorded on its device at every step
and read by the host only now and then, so other steps never wait for the device."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..projection import NonFiniteWeightError

FINITE_CHECK_STEPS = 32  # the host reads the record this often (optimizer steps) and before each projection
DIVERGENCE_HINT = ("HINT: lower the learning rate, set the Trainer's `gradient_clip_val`, use a larger `rank` or "
                   "`every_n_train_steps`, or anneal the rank with `rank_warmup`.")


class NonFiniteTrainingError(FloatingPointError):
    """Training diverged: the loss or a selected weight became NaN/Inf."""


@contextlib.contextmanager
def divergence_named(step: int) -> Iterator[None]:
    """Turn a ``NonFiniteWeightError`` into a ``NonFiniteTrainingError`` naming the optimizer step and hints."""
    try:
        yield
    except NonFiniteWeightError as error:
        raise NonFiniteTrainingError(
            f"weight of layer {error.layer!r} became NaN/Inf before the projection after optimizer step {step}. "
            + DIVERGENCE_HINT) from error


class LossRecord:
    """The first optimizer step whose training loss held NaN/Inf (int64, -1: none yet) and that loss (float32),
    kept in tensors on the loss's device."""

    def __init__(self):
        self.first: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Record ``loss`` of optimizer ``step`` without the host waiting for the device."""
        value = loss.detach().float().sum()
        if self.first is None or self.first.device != value.device:
            self.first = torch.full((), -1, dtype=torch.int64, device=value.device)
            self.loss = torch.zeros((), device=value.device)
        fresh = ~torch.isfinite(value) & (self.first < 0)
        self.first, self.loss = torch.where(fresh, step, self.first), torch.where(fresh, value, self.loss)

    def check(self) -> None:
        """Raise ``NonFiniteTrainingError`` naming the first step whose loss was NaN/Inf (the host waits for the
        device once, to read it); nothing to read before the first ``add``."""
        if self.first is None:
            return
        step = int(self.first.item())
        if step >= 0:
            raise NonFiniteTrainingError(f"training loss became {self.loss.item()} at optimizer step {step}. "
                                         + DIVERGENCE_HINT)
