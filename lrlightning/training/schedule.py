"""When projections happen: every S_D optimizer steps between a start and a stop, then after every step of a final
phase, with ranks annealed over the first ones. Pure Python."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..rules import is_int, is_number


@dataclass(frozen=True)
class ProjectionSchedule:
    """Project after optimizer steps ``k = start_step + j * every_n_train_steps > 0`` up to ``stop_step`` (None:
    no stop), and after every step of the final phase: its last ``final_phase`` optimizer steps (an int), or that
    fraction in (0, 1) of all of them (default 0: none). The first ``rank_warmup`` projections anneal the ranks
    from full down to the target."""

    every_n_train_steps: int = 200
    start_step: int = 0
    stop_step: int | None = None
    final_phase: int | float = 0
    rank_warmup: int = 0

    def __post_init__(self):
        for argument, least in (("every_n_train_steps", 1), ("start_step", 0), ("rank_warmup", 0)):
            value = getattr(self, argument)
            if not (is_int(value) and value >= least):
                raise ValueError(f"`{argument}` must be an int >= {least}, got {value!r}")
        if self.stop_step is not None and not (is_int(self.stop_step) and self.stop_step >= self.start_step):
            raise ValueError(f"`stop_step` must be None or an int >= `start_step` ({self.start_step}), "
                             f"got {self.stop_step!r}")
        phase = self.final_phase
        if not ((is_int(phase) and phase >= 0) or (is_number(phase) and 0 <= phase < 1)):
            raise ValueError(f"`final_phase` must be a fraction of training in (0, 1) or a number of optimizer steps "
                             f"(an int >= 0), got {phase!r}")

    def final_phase_start(self, total_steps: float) -> int | None:
        """The optimizer step after which the final phase begins in a fit of ``total_steps`` optimizer steps
        (None: no final phase); a ValueError when the length is not finite."""
        if not self.final_phase:
            return None
        if not math.isfinite(total_steps):
            raise ValueError(f"`final_phase`={self.final_phase!r} needs a finite training length: set the Trainer's "
                             "`max_epochs` or `max_steps`")
        steps = self.final_phase if is_int(self.final_phase) else round(self.final_phase * total_steps)
        return max(0, int(total_steps) - steps)

    def due(self, step: int, final_phase_start: int | None = None) -> bool:
        """Whether to project after optimizer step ``step``, the final phase beginning after ``final_phase_start``."""
        if step <= 0:
            return False
        if final_phase_start is not None and step > final_phase_start:
            return True
        if step < self.start_step or (self.stop_step is not None and step > self.stop_step):
            return False
        return (step - self.start_step) % self.every_n_train_steps == 0
