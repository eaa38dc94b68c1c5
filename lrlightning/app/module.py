"""`LitClassifier`: a LightningModule that trains an image classifier with cross-entropy and SGD.

It knows nothing about low rank: the projection callback and the exporter find the CNN at `module.backbone`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from lrlightning.training.distillation import Distillation
from lrlightning.zoo import build_backbone

__all__ = ["LitClassifier", "SCHEDULERS", "lr_factor"]

SCHEDULERS = ("cosine", "step", "none")
TOP5_MIN_CLASSES = 6


class LitClassifier(LightningModule):
    """Image classifier: `backbone` + cross-entropy + SGD with momentum, under a per-step learning-rate schedule.

    Args:
        backbone: a registry name from `lrlightning.zoo.BACKBONES` (built here, so checkpoints hold only
            scalars and `load_from_checkpoint(path)` needs nothing else), or any `nn.Module` mapping
            (N, in_channels, H, W) to (N, num_classes) logits (e.g. from Hydra `_target_`). A module is left out of
            the hyperparameters: pass it again to `load_from_checkpoint(path, backbone=...)`.
        num_classes, in_channels: classifier outputs and image channels (default 10, 1 for Fashion-MNIST).
        lr, momentum, weight_decay, nesterov: SGD settings (peak lr; L2 weight decay on all parameters).
        label_smoothing: cross-entropy label smoothing in [0, 1) (default 0).
        scheduler: "cosine" (to 0 at the end), "step" (×`step_gamma` at each of `step_milestones`, given as
            fractions of training) or "none".
        warmup_epochs: linear warm-up from lr/warmup_steps to lr over this many epochs (default 0).
        backbone_kwargs: extra keyword arguments for the registry builder (e.g. {"shortcut": "B"}).

    `distill_from(teacher, weight, temperature)` adds knowledge distillation from a frozen teacher
    (`lrlightning.training.distillation`): the training loss becomes (1 − weight)·cross-entropy + weight·KD.

    The schedule steps every optimizer step. Its length is `trainer.estimated_stepping_batches`, so it follows
    `max_epochs` or `max_steps`, and warm-up epochs are converted to steps with the number of batches per epoch.

    Logs `train/loss` (per step, with label smoothing), `train/acc` (per epoch), `val/loss`, `val/acc`,
    `test/loss`, `test/acc` (plain cross-entropy and top-1 accuracy), plus `val/acc_top5` and `test/acc_top5`
    when `num_classes` > 5. Batches are (x float32 N×C×H×W, y int64 N).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet20",
        num_classes: int = 10,
        in_channels: int = 1,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        label_smoothing: float = 0.0,
        scheduler: str = "cosine",
        warmup_epochs: int = 0,
        step_milestones: Sequence[float] = (0.5, 0.75),
        step_gamma: float = 0.1,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        _check_int("num_classes", num_classes, minimum=2)
        _check_int("in_channels", in_channels, minimum=1)
        _check_range("lr", lr, "> 0", lambda v: v > 0)
        _check_range("momentum", momentum, "in [0, 1)", lambda v: 0 <= v < 1)
        _check_range("weight_decay", weight_decay, ">= 0", lambda v: v >= 0)
        _check_range("label_smoothing", label_smoothing, "in [0, 1)", lambda v: 0 <= v < 1)
        _check_range("step_gamma", step_gamma, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("warmup_epochs", warmup_epochs, minimum=0)
        if scheduler not in SCHEDULERS:
            raise ValueError(f"`scheduler` must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        if nesterov and momentum == 0:
            raise ValueError("`nesterov`=True needs `momentum` > 0, got momentum=0")
        step_milestones = [float(m) for m in step_milestones]
        if any(not 0 < m < 1 for m in step_milestones) or step_milestones != sorted(step_milestones):
            raise ValueError(
                f"`step_milestones` must be increasing fractions of training in (0, 1), got {step_milestones}"
            )
        backbone_kwargs = dict(backbone_kwargs or {})

        if isinstance(backbone, nn.Module):
            self.save_hyperparameters(ignore=["backbone"])
            self.backbone = backbone
        elif isinstance(backbone, str):
            self.save_hyperparameters()
            self.backbone = build_backbone(backbone, num_classes, in_channels, **backbone_kwargs)
        else:
            raise TypeError(f"`backbone` must be a registry name (str) or an nn.Module, got {type(backbone).__name__}")

        self.distillation: Distillation | None = None
        self._teacher: list[nn.Module] = []  # held outside the registered submodules: not trained, saved or projected
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        if num_classes >= TOP5_MIN_CLASSES:
            self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")
            self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float images -> (N, num_classes) logits."""
        return self.backbone(x)

    def distill_from(self, teacher: nn.Module, weight: float = 0.5, temperature: float = 4.0) -> None:
        """Train against `teacher`'s logits as well (a frozen module, e.g. `lrlightning.frozen_teacher(dense)`;
        moved to this module's device when training starts)."""
        self.distillation = Distillation(weight, temperature)
        self._teacher = [teacher]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        if self._teacher:
            teacher = self._teacher[0].to(x.device)
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = self.distillation.loss(logits, teacher_logits, loss)
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=stage == "val", sync_dist=True)
        metrics = {"acc": getattr(self, f"{stage}_acc")}
        if self.hparams.num_classes >= TOP5_MIN_CLASSES:
            metrics["acc_top5"] = getattr(self, f"{stage}_acc_top5")
        for name, metric in metrics.items():
            metric.update(logits, y)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "acc" and stage == "val")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        if hp.scheduler == "none" and hp.warmup_epochs == 0:
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError(
                f"`scheduler`={hp.scheduler!r} / `warmup_epochs`={hp.warmup_epochs} need a finite training length: "
                "set the Trainer's `max_epochs` or `max_steps`"
            )
        warmup_steps = 0
        if hp.warmup_epochs:
            batches = self.trainer.num_training_batches
            if not math.isfinite(batches):
                raise ValueError("`warmup_epochs` needs a train dataloader with a length (to count steps per epoch)")
            warmup_steps = hp.warmup_epochs * math.ceil(batches / self.trainer.accumulate_grad_batches)
        factor = partial(
            lr_factor,
            total_steps=int(total_steps),
            warmup_steps=min(int(total_steps), warmup_steps),
            scheduler=hp.scheduler,
            milestones=tuple(hp.step_milestones),
            gamma=hp.step_gamma,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}}


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    scheduler: str = "cosine",
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up (step+1)/warmup_steps over the first `warmup_steps`, then "cosine": 0.5·(1 + cos(π·t)) with t
    the fraction of the post-warm-up steps done; "step": gamma ** (number of `milestones`·total_steps reached);
    "none": 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if scheduler == "step":
        return gamma ** sum(step >= m * total_steps for m in milestones)
    return 1.0


def _check_int(argument: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{argument}` must be an int >= {minimum}, got {value!r}")


def _check_range(argument: str, value: object, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"`{argument}` must be a number {allowed}, got {value!r}")
