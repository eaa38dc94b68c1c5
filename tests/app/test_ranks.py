"""What a job factorizes: the LowRankProjection its ``lowrank`` config builds and the plans of its backbone."""
import pytest
import torch
from hydra.errors import InstantiationException

from lrlightning import (
    Activation,
    Budget,
    Latency,
    LowRankOptions,
    LowRankProjection,
    Selection,
    TiledSVD,
    factorize_planned,
    finish,
    plan_layers,
)
from lrlightning.app.module import LitClassifier
from lrlightning.app.ranks import backbone_plan, check_batch_sizes, projection_of, with_budget_defaults

TARGET = "lrlightning.LowRankProjection"


class Images:
    in_channels, image_size = 1, 28


def test_projection_of_builds_the_options_and_the_callback_settings_of_a_lowrank_config():
    node = {"_target_": TARGET, "scheme": {"_target_": "lrlightning.TiledSVD", "tile_shape": [6, 27]}, "rank": 2,
            "every_n_train_steps": 50, "bn_recalibration_batches": 4, "layers": {"include": ["backbone.*"]}}
    projection = projection_of(node, Images(), [8])
    assert isinstance(projection, LowRankProjection)
    assert projection.options == LowRankOptions(TiledSVD(tile_shape=(6, 27)), 2,
                                                layers=Selection(include=("backbone.*",)))
    assert (projection.every_n_train_steps, projection.bn_recalibration_batches) == (50, 4)
    activation = projection_of({"_target_": TARGET, "scheme": "tucker2", "rank": 0.5,
                                "objective": {"_target_": "lrlightning.Activation", "batches": 3}}, Images(), [8])
    assert activation.options == LowRankOptions("tucker2", 0.5, objective=Activation(batches=3))
    with pytest.raises(InstantiationException, match="`rank` must be"):
        projection_of({"_target_": TARGET, "scheme": "svd", "rank": 0}, Images(), [8])
    with pytest.raises(ValueError, match="`lowrank` must build a lrlightning.LowRankProjection"):
        projection_of({"_target_": "lrlightning.Selection"}, Images(), [8])


def test_callback_settings_fall_back_to_the_callbacks_defaults():
    projection = projection_of({"_target_": TARGET}, Images(), [8])
    assert (projection.every_n_train_steps, projection.bn_recalibration_batches) == (200, 20)
    assert projection.options == LowRankOptions()
    assert projection_of({"_target_": TARGET, "bn_recalibration_batches": 0}, Images(), [8]).bn_recalibration_batches == 0
    with pytest.raises(InstantiationException, match=r"`bn_recalibration_batches` must be an int >= 0, got -1"):
        projection_of({"_target_": TARGET, "bn_recalibration_batches": -1}, Images(), [8])


def test_the_backbone_plan_is_at_the_given_ranks_else_the_plan_of_the_options():
    model = LitClassifier("simple_cnn", num_classes=10, in_channels=3)
    options = LowRankOptions(scheme="svd", rank=0.5)
    planned = backbone_plan(model, options)
    assert list(planned.layers) == plan_layers(model.backbone, options, warn=False)[0]
    assert [p.name for p in planned.layers] == ["features.4", "features.8"] and planned.options == options
    given = backbone_plan(model, options, {"backbone.features.4": 3})
    assert [(p.name, p.rank) for p in given.layers] == [("features.4", 3)]
    assert given.options == options  # the plan records the request, not the ranks it was given


def test_the_backbone_plan_reproduces_the_ranks_on_the_backbone_exactly():
    model = LitClassifier("simple_cnn", num_classes=10, in_channels=3).eval()
    options = LowRankOptions(scheme="tucker2", rank=0.5, layers=Selection(linear=True))
    plans = list(backbone_plan(model, options, {"backbone.features.4": (3, 5)}).layers)
    small = finish(model.backbone, plans, options)
    assert type(small.features[8]) is torch.nn.Conv2d and type(small.fc) is torch.nn.Linear
    assert type(small.features[4]) is not torch.nn.Conv2d
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(small(x), model.backbone(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(factorize_planned(model.backbone, plans, options)(x), small(x))


def test_a_mac_or_latency_budget_takes_its_input_shape_from_the_datamodule():
    rule = {"_target_": "lrlightning.Budget", "factor": 2.0, "metric": "macs"}
    node = {"_target_": TARGET, "scheme": "svd", "rank": rule}
    macs = projection_of(node, Images(), [8]).options.rank
    assert macs == Budget(2.0, metric="macs", input_shape=(1, 28, 28))
    assert node["rank"] == rule and "input_shape" not in rule  # the given node is left as it was
    given_shape = {**node, "rank": {**rule, "input_shape": [3, 8, 8]}}
    assert with_budget_defaults(given_shape, Images(), [8])["rank"]["input_shape"] == [3, 8, 8]
    fixed = {"_target_": TARGET, "scheme": "svd", "rank": 0.5}
    assert with_budget_defaults(fixed, Images(), [8]) == fixed
    params = {**node, "rank": {"_target_": "lrlightning.Budget", "factor": 2.0}}
    assert with_budget_defaults(params, Images(), [8]) == params
    latency_rule = {**rule, "metric": "latency"}
    latency = projection_of({**node, "rank": latency_rule}, Images(), [8]).options.rank
    assert (latency.input_shape, latency.latency) == ((1, 28, 28), Latency(batch_sizes=(8,), device="cpu"))
    given = {**rule, "metric": "latency", "latency": {"device": "cuda", "backend": "eager"}}
    assert with_budget_defaults({**node, "rank": given}, Images(), [1, 8]) == {**node, "rank": {
        **given, "input_shape": [1, 28, 28],
        "latency": {"_target_": "lrlightning.Latency", "device": "cuda", "backend": "eager", "batch_sizes": [1, 8]}}}
    assert "latency" not in with_budget_defaults(node, Images(), [8])["rank"]


def test_the_job_owns_the_latency_batch_sizes_and_flat_latency_keys_of_earlier_configs_are_moved():
    rule = {"_target_": "lrlightning.Budget", "factor": 2.0, "metric": "latency"}
    node = {"_target_": TARGET, "scheme": "svd", "rank": rule}
    same = {**rule, "latency": {"batch_sizes": [1, 32]}}
    assert projection_of({**node, "rank": same}, Images(), [1, 32]).options.rank.latency.batch_sizes == (1, 32)
    other = {**rule, "latency": {"batch_sizes": [4]}}
    with pytest.raises(ValueError, match=r"`lowrank.rank.latency.batch_sizes`=\[4\] differs from the job's "
                                         r"`latency_batch_sizes`=\[32\]: the job's setting owns"):
        projection_of({**node, "rank": other}, Images(), [32])
    flat = {**rule, "latency_batch_size": 32, "latency_backend": "eager"}
    with pytest.warns(DeprecationWarning, match=r"`lowrank.rank` spells latency_batch_size, latency_backend flat"):
        latency = projection_of({**node, "rank": flat}, Images(), [32]).options.rank.latency
    assert latency == Latency(batch_sizes=(32,), device="cpu", backend="eager")
    for bad in ([], [0], [4, 4], 4, "32"):
        with pytest.raises(ValueError, match=r"`latency_batch_sizes` must be a list of distinct ints >= 1, such as "
                                             r"\[32\] or \[1,32\], got "):
            check_batch_sizes(bad)
