"""The ranks a job factorizes: keyed relative to the backbone, taken as given or planned from the options."""
import pytest
import torch

from lrlightning import LowRankOptions, factorize, plan_layers, project_
from lrlightning.app.module import LitClassifier
from lrlightning.app.ranks import backbone_ranks, export_ranks, factorize_args


def test_backbone_ranks_strip_the_module_prefix():
    assert backbone_ranks({"backbone.layer1.0.conv1": (4, 4)}) == {"layer1.0.conv1": (4, 4)}
    with pytest.raises(ValueError, match="outside `backbone`"):
        backbone_ranks({"head.conv": 3})


def test_export_ranks_are_the_given_ones_else_the_plan_of_the_options():
    model = LitClassifier("simple_cnn", num_classes=10, in_channels=3)
    options = LowRankOptions(scheme="svd", rank=0.5)
    planned = export_ranks(model, options)
    plans, _ = plan_layers(model.backbone, options, warn=False)
    assert planned == {p.name: p.rank for p in plans} and set(planned) == {"features.4", "features.8"}
    assert export_ranks(model, options, {"backbone.features.4": 3}) == {"features.4": 3}
    assert export_ranks(model, options, {}) == {}


def test_factorize_args_reproduce_the_ranks_on_the_backbone_exactly():
    backbone = LitClassifier("simple_cnn", num_classes=10, in_channels=3).backbone.eval()
    options = LowRankOptions(scheme="tucker2", rank=0.5, linear=True)
    ranks = {"features.4": (3, 5)}
    project_(backbone, **factorize_args(options, ranks))
    small = factorize(backbone, **factorize_args(options, ranks))
    assert type(small.features[8]) is torch.nn.Conv2d and type(small.fc) is torch.nn.Linear
    assert type(small.features[4]) is not torch.nn.Conv2d
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(small(x), backbone(x), atol=1e-5, rtol=1e-4)
