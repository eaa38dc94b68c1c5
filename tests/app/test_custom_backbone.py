"""A backbone given by `_target_` (conf/model/custom_backbone.yaml) composes through the app config, takes the
datamodule's classes and channels, and runs."""
import torch
from hydra.utils import instantiate

from lrlightning.app.job import build_model, input_shape
from lrlightning.zoo import CifarResNet, ChannelPadShortcut

from helpers import compose_train


def test_custom_backbone_takes_classes_and_channels_from_the_datamodule():
    cfg = compose_train(["model=custom_backbone", "data=synthetic", "+data.in_channels=1", "+data.num_classes=7"])
    assert cfg.model.backbone._target_ == "lrlightning.zoo.CifarResNet"
    datamodule = instantiate(cfg.data)
    model = build_model(cfg.model, datamodule)
    assert isinstance(model.backbone, CifarResNet) and "backbone" not in model.hparams
    assert (model.hparams.num_classes, model.hparams.in_channels) == (7, 1)
    assert model.backbone.conv1.in_channels == 1 and model.backbone.fc.out_features == 7
    assert not any(isinstance(m, ChannelPadShortcut) for m in model.backbone.modules())  # shortcut B
    logits = model(torch.randn(2, *input_shape(datamodule)))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
