"""Test accuracy of several backbones at once and the largest logit difference between the first two."""
import torch
from lightning.pytorch import LightningDataModule

from lrlightning.app.evaluation import run_test, val_accuracy
from lrlightning.zoo import SimpleCNN

from helpers import quiet_trainer


def accuracy(backbone, datamodule) -> float:
    with torch.no_grad():
        hits = [(backbone(x).argmax(1) == y).sum().item() for x, y in datamodule.test_dataloader()]
    return sum(hits) / len(datamodule.test_data[1])


def test_run_test_gives_each_accuracy_and_the_max_logit_difference(tmp_path, synthetic_data):
    torch.manual_seed(0)
    first, other = SimpleCNN(10, 3, width=4).eval(), SimpleCNN(10, 3, width=4).eval()
    datamodule = synthetic_data()
    same = run_test(quiet_trainer(tmp_path), datamodule, a=first, b=first)
    assert same.keys() == {"acc_a", "acc_b", "max_abs_logit_diff"}
    assert same["acc_a"] == same["acc_b"] == accuracy(first, datamodule) and same["max_abs_logit_diff"] == 0

    different = run_test(quiet_trainer(tmp_path), datamodule, a=first, b=other)
    with torch.no_grad():
        largest = max((first(x) - other(x)).abs().max().item() for x, _ in datamodule.test_dataloader())
    assert different["max_abs_logit_diff"] == largest > 0
    assert different["acc_b"] == accuracy(other, datamodule)
    assert run_test(quiet_trainer(tmp_path), datamodule, only=first).keys() == {"acc_only"}


def test_a_datamodule_without_validation_split_records_no_validation_accuracy(tmp_path):
    trainer = quiet_trainer(tmp_path)
    assert val_accuracy(trainer, LightningDataModule(), torch.nn.Identity()) is None
