"""What the jobs share: initial weights, the checkpoint a rerun resumes from, the skeleton spec of the export."""
import os

import pytest
import torch
from omegaconf import OmegaConf

from lrlightning.app.job import CONFIG_KEY, backbone_spec, fit, load_weights, make_trainer, resume_path
from lrlightning.app.module import LitClassifier
from lrlightning.zoo import SimpleCNN


def test_resume_path_prefers_the_given_path_then_the_newest_checkpoint(tmp_path):
    assert resume_path(None, tmp_path) is None
    assert resume_path("given.ckpt", tmp_path) == "given.ckpt"
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resume_path(None, tmp_path) == str(last)
    requeued = tmp_path / "hpc_ckpt_1.ckpt"
    requeued.write_bytes(b"")
    os.utime(last, (1, 1))
    assert resume_path(None, tmp_path) == str(requeued)


def test_load_weights_copies_a_checkpoint_and_names_bad_files(tmp_path):
    source = LitClassifier("simple_cnn", num_classes=10, in_channels=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "dense.ckpt")
    target = LitClassifier("simple_cnn", num_classes=10, in_channels=3)
    load_weights(target, str(tmp_path / "dense.ckpt"))
    torch.testing.assert_close(target.backbone.fc.weight, source.backbone.fc.weight)
    with pytest.raises(FileNotFoundError, match="`init_ckpt` must be an existing checkpoint file, got '/nonexistent"):
        load_weights(target, "/nonexistent/last.ckpt")
    torch.save({"weights": {}}, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="holds no 'state_dict'"):
        load_weights(target, str(tmp_path / "bare.ckpt"))


def test_backbone_spec_rebuilds_registry_backbones_only():
    model = LitClassifier("resnet20", num_classes=10, in_channels=3, backbone_kwargs={"width": 4})
    assert backbone_spec(model) == {"name": "resnet20", "num_classes": 10, "in_channels": 3, "width": 4}
    assert backbone_spec(LitClassifier(SimpleCNN(10, 3), num_classes=10, in_channels=3)) is None


def test_trainer_of_a_job_checkpoints_with_the_job_config(tmp_path, synthetic_data):
    cfg = OmegaConf.create({"trainer": {"_target_": "lightning.pytorch.Trainer", "max_epochs": 1, "accelerator": "cpu",
                                        "limit_train_batches": 2, "limit_val_batches": 1,
                                        "enable_progress_bar": False, "enable_model_summary": False}})
    trainer = make_trainer(cfg, tmp_path, [], {"seed": 3})
    seconds = fit(trainer, LitClassifier("simple_cnn", num_classes=10, in_channels=3), synthetic_data(), None)
    assert seconds > 0 and trainer.global_step == 2
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint[CONFIG_KEY] == {"seed": 3} and checkpoint["global_step"] == 2
    assert resume_path(None, tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")


def test_a_run_writes_last_ckpt_at_every_epoch_end_so_a_killed_run_can_resume(tmp_path, tiny_train):
    from lightning.pytorch import Callback

    from lrlightning.app.job import make_trainer

    seen = []

    class LastOnDisk(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append((tmp_path / "checkpoints" / "last.ckpt").is_file())

    from hydra import compose, initialize_config_dir

    from lrlightning.app.cli import CONF_DIR
    from lrlightning.app.data import SyntheticDataModule
    from lrlightning.app.module import LitClassifier

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*tiny_train, "trainer.max_epochs=3", "logger=csv"])
    trainer = make_trainer(cfg, tmp_path, [LastOnDisk()], {})
    data = SyntheticDataModule(num_samples=96, image_size=8, in_channels=3, batch_size=32, val_size=32)
    trainer.fit(LitClassifier("simple_cnn", num_classes=10, in_channels=3), datamodule=data)
    assert seen == [False, True, True]  # written after epochs 1 and 2, before training had ended
