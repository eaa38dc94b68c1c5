"""The scheme registry: lookup by name with clear errors, layer specs of format ``lrlightning.factorized/1``
rebuilt through it, and a scheme registered from outside the package (one class, here) that works with
``project_``, ``factorize``, ``save_factorized`` and ``load_factorized``."""
import re

import pytest
import torch
from torch import nn

import lrlightning.schemes as schemes
from lrlightning import LowRankOptions, factorize, load_factorized, plan_layers, project_, save_factorized
from lrlightning.export import structure_spec
from lrlightning.layers import LowRankConv2d, geometry, new_conv
from lrlightning.schemes import SCHEME_NAMES, LoweredSVD, MatrixScheme, layer_from_spec, register, scheme_class


class InputSideSVD(MatrixScheme):
    """The S × (T·kh·kw) unfolding; exports as a 1×1 conv S→r then a kh×kw conv r→T (original geometry)."""

    name = "input_svd"

    def to_matrix(self, weights):
        return weights.transpose(1, 2).flatten(2)

    def from_matrix(self, matrices, shape):
        t, s, kh, kw = shape
        return matrices.reshape(-1, s, t, kh, kw).transpose(1, 2)

    def factorized_layer(self, layer, rank):
        t, s, kh, kw = layer.weight.shape
        left, right = self.matrix_factors(layer.weight, rank)
        first = new_conv(left.T[:, :, None, None].contiguous())
        second = new_conv(right.reshape(rank, t, kh, kw).transpose(0, 1).contiguous(), layer.bias, **geometry(layer))
        return LowRankConv2d(self.name, rank, [first, second])


@pytest.fixture
def input_svd(monkeypatch):
    """``InputSideSVD`` registered for the test only."""
    monkeypatch.setattr(schemes, "SCHEMES", dict(schemes.SCHEMES))
    return register(InputSideSVD)


def model_with_two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_built_in_schemes_are_registered_in_their_public_order():
    assert SCHEME_NAMES == ("svd", "tiled_svd", "tucker2", "spatial_svd")
    assert scheme_class("svd") is LoweredSVD
    assert all(scheme_class(name).name == name for name in SCHEME_NAMES)


@pytest.mark.parametrize("name", ["cp", "", None, ["svd"]])
def test_unknown_scheme_names_the_value_and_the_registered_names(name):
    with pytest.raises(ValueError, match=rf"`scheme` must be one of \('svd', 'tiled_svd', 'tucker2', 'spatial_svd'\), "
                                         rf"got {re.escape(repr(name))}"):
        scheme_class(name)


def test_register_refuses_non_schemes_unnamed_and_taken_names(input_svd):
    with pytest.raises(TypeError, match=r"`scheme` must be a subclass of Scheme, got <class 'int'>"):
        register(int)
    unnamed = type("Unnamed", (MatrixScheme,), {})
    with pytest.raises(ValueError, match=r"`scheme.name` must be a non-empty string, got '' for Unnamed"):
        register(unnamed)
    with pytest.raises(ValueError, match=r"scheme 'input_svd' is already registered as InputSideSVD"):
        register(InputSideSVD)
    with pytest.raises(ValueError, match=r"scheme 'svd' is already registered as LoweredSVD"):
        register(type("OtherSVD", (LoweredSVD,), {}))


def test_a_spec_naming_an_unknown_scheme_or_layer_type_is_refused():
    with pytest.raises(ValueError, match=r"names scheme 'input_svd', which is not registered; registered: \('svd'"):
        layer_from_spec({"type": "LowRankConv2d", "scheme": "input_svd", "rank": 2, "layers": []})
    with pytest.raises(ValueError, match=r"scheme 'tucker2' has no factorized layer of type 'LowRankLinear'; "
                                         r"its types: \['LowRankConv2d'\]"):
        layer_from_spec({"type": "LowRankLinear", "scheme": "tucker2", "in_features": 4, "out_features": 4,
                         "rank": 2, "bias": True})


def test_a_registered_scheme_projects_factorizes_saves_and_loads(input_svd, tmp_path):
    assert LowRankOptions("input_svd", rank=3).conv_scheme().name == "input_svd"
    model = model_with_two_convs()
    stats = project_(model, "input_svd", rank=3)
    assert [s.name for s in stats] == ["2", "4"]
    for index in (2, 4):
        unfolding = model[index].weight.detach().transpose(0, 1).flatten(1)
        assert torch.linalg.matrix_rank(unfolding).item() == 3
    (plan, _), _ = plan_layers(model, LowRankOptions("input_svd", rank=3))
    assert plan.scheme == "input_svd" and plan.params_factorized == 3 * (8 + 16 * 9)
    small = factorize(model, "input_svd", rank=3).eval()
    assert isinstance(small[2], LowRankConv2d) and small[2].scheme == "input_svd"
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-4)
    path = tmp_path / "small.pt"
    save_factorized(small, path)
    loaded = load_factorized(path, model=model_with_two_convs()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_the_scheme_registered_by_a_test_is_gone_after_it():
    with pytest.raises(ValueError, match=r"`scheme` must be one of .*got 'input_svd'"):
        LowRankOptions("input_svd", rank=3)


def conv(in_channels, out_channels, kernel, stride, padding, bias):
    """A Conv2d spec as format 1 writes it."""
    return {"in_channels": in_channels, "out_channels": out_channels, "kernel_size": [kernel, kernel],
            "stride": [stride, stride], "padding": [padding, padding], "dilation": [1, 1], "groups": 1,
            "padding_mode": "zeros", "bias": bias}


FORMAT_1_LAYERS = {
    "1": {"type": "LowRankConv2d", "scheme": "svd", "rank": 3,
          "layers": [conv(8, 3, 3, 1, 1, False), conv(3, 16, 1, 1, 0, True)]},
    "2": {"type": "TiledSVDConv2d", "scheme": "tiled_svd", "in_channels": 16, "out_channels": 12,
          "kernel_size": [3, 3], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "padding_mode": "zeros",
          "tile_shape": [5, 7], "rank": 2, "bias": True},
    "5": {"type": "LowRankLinear", "scheme": "svd", "in_features": 12, "out_features": 10, "rank": 2, "bias": True},
}


def test_a_file_of_format_1_loads_and_its_layer_specs_are_still_written(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 12, 3, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))
    small = factorize(model, "svd", rank={"1": 3, "5": 2}, linear=True)
    small = factorize(small, "tiled_svd", rank={"2": 2}, tile_shape=(5, 7)).eval()
    assert structure_spec(small) == FORMAT_1_LAYERS
    path = tmp_path / "format1.pt"
    torch.save({"format": "lrlightning.factorized/1", "layers": FORMAT_1_LAYERS, "backbone": None, "metadata": {},
                "state_dict": small.state_dict()}, path)
    loaded = load_factorized(path, model=model).eval()
    x = torch.randn(2, 3, 11, 11)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_a_scheme_without_a_weighted_projection_refuses_the_activation_objective(input_svd):
    with pytest.raises(ValueError, match=r"`objective`='activation' needs a scheme with a weighted projection .*"
                                         r"scheme 'input_svd' has none"):
        LowRankOptions("input_svd", rank=3, objective="activation")
    assert all(scheme_class(name).weighted for name in SCHEME_NAMES)
