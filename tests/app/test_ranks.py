"""What a job factorizes: the options of its ``lowrank`` config and the plans of its backbone."""
import pytest
import torch

from lrlightning import LowRankOptions, factorize_planned, finish, plan_layers
from lrlightning.app.module import LitClassifier
from lrlightning.app.ranks import (
    backbone_plans,
    callback_setting,
    lowrank_options,
    recalibration_batches,
    with_budget_defaults,
)


def test_lowrank_options_read_the_option_fields_of_a_lowrank_config():
    node = {"_target_": "lrlightning.LowRankProjection", "scheme": "tiled_svd", "rank": 2, "tile_shape": [6, 27],
            "every_n_train_steps": 50, "bn_recalibration_batches": 4, "include": ["backbone.*"]}
    assert lowrank_options(node) == LowRankOptions("tiled_svd", 2, tile_shape=(6, 27), include=("backbone.*",))
    with pytest.raises(ValueError, match="`rank` must be"):
        lowrank_options({"scheme": "svd", "rank": 0})


def test_callback_settings_fall_back_to_the_callbacks_defaults():
    assert callback_setting({}, "every_n_train_steps") == 200 and recalibration_batches({}) == 20
    assert recalibration_batches({"bn_recalibration_batches": 0}) == 0
    with pytest.raises(ValueError, match=r"`lowrank.bn_recalibration_batches` must be an int >= 0, got -1"):
        recalibration_batches({"bn_recalibration_batches": -1})


def test_backbone_plans_are_the_given_ranks_else_the_plan_of_the_options():
    model = LitClassifier("simple_cnn", num_classes=10, in_channels=3)
    options = LowRankOptions(scheme="svd", rank=0.5)
    planned = backbone_plans(model, options)
    assert planned == plan_layers(model.backbone, options, warn=False)[0]
    assert [p.name for p in planned] == ["features.4", "features.8"]
    given = backbone_plans(model, options, {"backbone.features.4": 3})
    assert [(p.name, p.rank) for p in given] == [("features.4", 3)]


def test_backbone_plans_reproduce_the_ranks_on_the_backbone_exactly():
    model = LitClassifier("simple_cnn", num_classes=10, in_channels=3).eval()
    options = LowRankOptions(scheme="tucker2", rank=0.5, linear=True)
    plans = backbone_plans(model, options, {"backbone.features.4": (3, 5)})
    small = finish(model.backbone, plans, options)
    assert type(small.features[8]) is torch.nn.Conv2d and type(small.fc) is torch.nn.Linear
    assert type(small.features[4]) is not torch.nn.Conv2d
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(small(x), model.backbone(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(factorize_planned(model.backbone, plans, options)(x), small(x))


def test_a_mac_or_latency_budget_takes_its_input_shape_from_the_datamodule():
    class Images:
        in_channels, image_size = 1, 28

    node = {"scheme": "svd", "rank": None, "budget": 2.0, "budget_metric": "macs"}
    assert lowrank_options(with_budget_defaults(node, Images(), 8)).input_shape == (1, 28, 28)
    assert with_budget_defaults({**node, "input_shape": [3, 8, 8]}, Images(), 8)["input_shape"] == [3, 8, 8]
    assert "input_shape" not in with_budget_defaults({"scheme": "svd", "rank": 0.5}, Images(), 8)
    latency = lowrank_options(with_budget_defaults({**node, "budget_metric": "latency"}, Images(), 8))
    assert (latency.input_shape, latency.latency_batch_size, latency.latency_device) == ((1, 28, 28), 8, "cpu")
    given = {**node, "budget_metric": "latency", "latency_batch_size": 2, "latency_device": "cuda"}
    assert with_budget_defaults(given, Images(), 8) == {**given, "input_shape": [1, 28, 28]}
    assert "latency_device" not in with_budget_defaults(node, Images(), 8)
