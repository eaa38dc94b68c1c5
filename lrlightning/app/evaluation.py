"""Test-time accuracy of several backbones on one datamodule, and how far apart their logits are."""
from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy


class Evaluation(LightningModule):
    """Test-only module: accuracy of each named backbone (``test/acc_<name>``) and the max |logit difference|
    between the first two (``test/max_abs_logit_diff``)."""

    def __init__(self, num_classes: int, **backbones: nn.Module):
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)
        self.accuracy = nn.ModuleDict({name: MulticlassAccuracy(num_classes, average="micro") for name in backbones})
        self.max_diff = MaxMetric()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = [backbone(x) for backbone in self.backbones.values()]
        for name, out in zip(self.backbones, logits):
            self.accuracy[name](out, y)
            self.log(f"test/acc_{name}", self.accuracy[name])
        if len(logits) > 1:
            self.max_diff((logits[0] - logits[1]).abs().max())
            self.log("test/max_abs_logit_diff", self.max_diff)


def run_test(trainer: Trainer, datamodule, **backbones: nn.Module) -> dict[str, float]:
    """Test the named backbones on the datamodule's test set; ``{"acc_<name>": ..., "max_abs_logit_diff": ...}``."""
    results = trainer.test(Evaluation(datamodule.num_classes, **backbones), datamodule=datamodule, verbose=False)
    return {key.removeprefix("test/"): float(value) for key, value in results[0].items()}


def val_accuracy(trainer: Trainer, datamodule, backbone: nn.Module) -> float | None:
    """Accuracy of ``backbone`` on the datamodule's validation split (what a sweep chooses its lr by); None for a
    datamodule without ``val_dataloader``."""
    if type(datamodule).val_dataloader is LightningDataModule.val_dataloader:
        return None
    datamodule.setup("fit")
    results = trainer.test(Evaluation(datamodule.num_classes, model=backbone), dataloaders=datamodule.val_dataloader(),
                           verbose=False)
    return float(results[0]["test/acc_model"])
