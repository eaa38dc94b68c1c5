"""Knowledge distillation from the dense model (Hinton et al. 2015): the student's loss blends cross-entropy with
the temperature-softened KL divergence to a frozen teacher's logits. Pure torch; a LightningModule adds it in its
``training_step``::

    distill = Distillation(weight=0.5, temperature=4.0)
    teacher = frozen_teacher(dense_model)           # a copy, in eval mode, without gradients
    ...
    logits = self(x)
    loss = distill.loss(logits, teacher(x), F.cross_entropy(logits, y))
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..rules import is_number


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch; logits (N, classes). The T²
    keeps its gradients on the scale of the cross-entropy's whatever T."""
    teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with ``requires_grad`` off: BatchNorm uses its running statistics and
    nothing the student's optimizer or the projection callback does reaches it (keep it out of the student's
    registered submodules)."""
    teacher = copy.deepcopy(model).eval()
    return teacher.requires_grad_(False)


@dataclass(frozen=True)
class Distillation:
    """``weight`` in [0, 1]: the share of the distillation term, (1 − weight)·task loss + weight·KD (default 0.5);
    ``temperature`` > 0 (default 4)."""

    weight: float = 0.5
    temperature: float = 4.0

    def __post_init__(self):
        if not (is_number(self.weight) and 0 <= self.weight <= 1):
            raise ValueError(f"`Distillation.weight` must be a number in [0, 1], got {self.weight!r}")
        if not (is_number(self.temperature) and self.temperature > 0):
            raise ValueError(f"`Distillation.temperature` must be a number > 0, got {self.temperature!r}")

    def loss(self, student_logits: Tensor, teacher_logits: Tensor, task_loss: Tensor) -> Tensor:
        """The blended loss (a scalar)."""
        kd = distillation_loss(student_logits, teacher_logits, self.temperature)
        return (1 - self.weight) * task_loss + self.weight * kd.to(task_loss.dtype)
