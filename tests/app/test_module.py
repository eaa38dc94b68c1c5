"""LitClassifier: training on synthetic data, logged metrics, checkpoints, the learning-rate schedule, bad input."""
import math
from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lrlightning.app.module import LitClassifier, lr_factor
from lrlightning.zoo import SimpleCNN

from helpers import quiet_trainer


def test_fit_on_synthetic_data_lowers_validation_loss_and_logs_metrics(tmp_path, synthetic_data):
    torch.manual_seed(0)
    datamodule = synthetic_data()
    model = LitClassifier("simple_cnn", num_classes=10, in_channels=3, lr=0.05, warmup_epochs=1)
    trainer = quiet_trainer(tmp_path, max_epochs=4)
    before = trainer.validate(model, datamodule, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule)
    after = trainer.callback_metrics["val/loss"].item()
    assert after < before - 0.2
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_top5"} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["val/acc_top5"] >= trainer.callback_metrics["val/acc"]
    assert trainer.global_step == 4 * 6  # 192 training images, batch 32
    tested = trainer.test(model, datamodule, verbose=False)[0]
    assert set(tested) == {"test/loss", "test/acc", "test/acc_top5"}


def test_top5_is_not_logged_for_five_classes(tmp_path, synthetic_data):
    model = LitClassifier("simple_cnn", num_classes=5, in_channels=3, scheduler="none")
    tested = quiet_trainer(tmp_path).test(model, synthetic_data(num_classes=5), verbose=False)[0]
    assert set(tested) == {"test/loss", "test/acc"}


def test_checkpoint_reloads_without_extra_arguments_and_holds_only_plain_values(tmp_path, synthetic_data):
    model = LitClassifier(
        "resnet20", num_classes=10, in_channels=3, backbone_kwargs={"width": 4}, step_milestones=[0.3, 0.6]
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                           enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(model, synthetic_data())
    path = tmp_path / "last.ckpt"

    raw = torch.load(path, weights_only=True)
    assert raw["hyper_parameters"]["backbone"] == "resnet20"
    assert raw["hyper_parameters"]["backbone_kwargs"] == {"width": 4}
    assert raw["hyper_parameters"]["step_milestones"] == [0.3, 0.6]

    reloaded = LitClassifier.load_from_checkpoint(path)
    assert reloaded.backbone.conv1.out_channels == 4
    x = torch.randn(4, 3, 12, 12)
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(x), model(x))


def test_module_backbone_is_used_and_kept_out_of_hyperparameters(tmp_path, synthetic_data):
    backbone = SimpleCNN(num_classes=10, in_channels=3, width=4)
    model = LitClassifier(backbone, num_classes=10, in_channels=3)
    assert model.backbone is backbone
    assert "backbone" not in model.hparams
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                           enable_checkpointing=True, callbacks=[checkpoint])
    trainer.fit(model, synthetic_data())
    reloaded = LitClassifier.load_from_checkpoint(tmp_path / "last.ckpt", backbone=SimpleCNN(10, 3, width=4))
    torch.testing.assert_close(reloaded.backbone.fc.weight, backbone.fc.weight)


@pytest.mark.parametrize(("scheduler", "final_factor"), [("step", 0.01), ("cosine", 0.0), ("none", 1.0)])
def test_learning_rate_after_fit_follows_the_schedule(scheduler, final_factor, tmp_path, synthetic_data):
    model = LitClassifier("simple_cnn", num_classes=10, in_channels=3, lr=0.2, scheduler=scheduler)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, synthetic_data())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2 * final_factor, abs=1e-9)


def test_lr_factor_warmup_cosine_and_step():
    assert [lr_factor(s, total_steps=100, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, total_steps=100, warmup_steps=4) == 1.0
    assert lr_factor(52, total_steps=100, warmup_steps=4) == pytest.approx(0.5)
    assert lr_factor(100, total_steps=100, warmup_steps=4) == pytest.approx(0.0)
    step = partial(lr_factor, total_steps=100, scheduler="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [step(s) for s in (49, 50, 74, 75)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    assert lr_factor(10, total_steps=100, scheduler="none") == 1.0
    assert all(math.isfinite(lr_factor(s, total_steps=1, warmup_steps=1)) for s in range(3))


def test_invalid_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match=r"`scheduler` must be one of \['cosine', 'step', 'none'\], got 'linear'"):
        LitClassifier("simple_cnn", scheduler="linear")
    with pytest.raises(ValueError, match=r"`lr` must be a number > 0, got -0.1"):
        LitClassifier("simple_cnn", lr=-0.1)
    with pytest.raises(ValueError, match=r"`momentum` must be a number in \[0, 1\), got 1.0"):
        LitClassifier("simple_cnn", momentum=1.0)
    with pytest.raises(ValueError, match=r"`label_smoothing` must be a number in \[0, 1\), got 1"):
        LitClassifier("simple_cnn", label_smoothing=1)
    with pytest.raises(ValueError, match=r"`num_classes` must be an int >= 2, got 1"):
        LitClassifier("simple_cnn", num_classes=1)
    with pytest.raises(ValueError, match=r"`warmup_epochs` must be an int >= 0, got -1"):
        LitClassifier("simple_cnn", warmup_epochs=-1)
    with pytest.raises(ValueError, match=r"`step_milestones` must be increasing fractions.*\[0.75, 0.5\]"):
        LitClassifier("simple_cnn", step_milestones=[0.75, 0.5])
    with pytest.raises(ValueError, match=r"`nesterov`=True needs `momentum` > 0"):
        LitClassifier("simple_cnn", nesterov=True, momentum=0.0)
    with pytest.raises(ValueError, match=r"`name` must be one of .*got 'resnet34'"):
        LitClassifier("resnet34")
    with pytest.raises(TypeError, match=r"`backbone` must be a registry name \(str\) or an nn.Module, got int"):
        LitClassifier(3)
