"""The scheme registry: lookup by name or configured object with clear errors, layer specs of format
``lrlightning.factorized/1`` rebuilt through it, and schemes registered from outside the package (one class each,
here; one with an option of its own) that work with ``project_``, ``factorize``, ``save_factorized``,
``load_factorized`` and ``LowRankProjection``."""
import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrlightning.schemes as schemes
from lrlightning import (LowRankOptions, LowRankProjection, Selection, factorize, load_factorized, plan_layers,
                         project_, save_factorized)
from lrlightning.export import structure_spec
from lrlightning.layers import LowRankConv2d, geometry, new_conv
from lrlightning.schemes import (SCHEME_NAMES, LoweredSVD, MatrixScheme, TiledSVD, Tucker2, layer_from_spec,
                                 register, scheme_class, scheme_of, truncated_svd)

from helpers import NetModule, quiet_trainer


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


class PowerSVD(LoweredSVD):
    """``power_svd``: the lowered SVD whose kh×kw conv carries s**(1/power) of the singular values s and whose 1×1
    conv carries the rest, s**(1 - 1/power) (``power``: an int >= 1, default 2: the ``svd`` scheme's factors). The
    product, hence the projection and every output, is the ``svd`` one; only the factors' scales differ."""

    name = "power_svd"

    def __init__(self, power: int = 2):
        if isinstance(power, bool) or not isinstance(power, int) or power < 1:
            raise ValueError(f"`power` of PowerSVD must be an int >= 1, got {power!r}")
        self.power = power

    def options(self):
        return {"power": self.power}

    def batch_factors(self, weights, rank):
        u, s, vh = truncated_svd(self.to_matrix(weights), rank)
        return u * s.pow(1.0 - 1.0 / self.power).unsqueeze(-2), s.pow(1.0 / self.power).unsqueeze(-1) * vh


@pytest.fixture
def input_svd(monkeypatch):
    """``InputSideSVD`` registered for the test only."""
    monkeypatch.setattr(schemes, "SCHEMES", dict(schemes.SCHEMES))
    return register(InputSideSVD)


@pytest.fixture
def power_svd(monkeypatch):
    """``PowerSVD`` registered for the test only."""
    monkeypatch.setattr(schemes, "SCHEMES", dict(schemes.SCHEMES))
    return register(PowerSVD)


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
    message = (r"`scheme` must be one of \('svd', 'tiled_svd', 'tucker2', 'spatial_svd'\) or a configured Scheme such "
               rf"as Tucker2\(hooi_iters=1\), got {re.escape(repr(name))}")
    with pytest.raises(ValueError, match=message):
        scheme_class(name)
    with pytest.raises(ValueError, match=message):
        scheme_of(name)
    with pytest.raises(ValueError, match=message):
        LowRankOptions(name, rank=3)


def test_scheme_of_builds_a_name_with_its_default_options_and_keeps_a_registered_instance():
    assert type(scheme_of("svd")) is LoweredSVD and scheme_of("tucker2") == Tucker2(hooi_iters=0)
    configured = Tucker2(hooi_iters=2)
    assert scheme_of(configured) is configured
    with pytest.raises(ValueError, match=r"`scheme`='tiled_svd' needs options of its own \(.*tile_shape.*\): pass a "
                                         r"configured scheme, e.g. TiledSVD\(\.\.\.\)"):
        scheme_of("tiled_svd")
    with pytest.raises(ValueError, match=r"`scheme` InputSideSVD\(\) is not registered under its name 'input_svd'; "
                                         r"call lrlightning.schemes.register\(InputSideSVD\) first"):
        scheme_of(InputSideSVD())
    other = type("OtherSVD", (LoweredSVD,), {})  # a subclass under a registered name is not that scheme
    with pytest.raises(ValueError, match=r"is not registered under its name 'svd'"):
        LowRankOptions(other(), rank=3)


def test_schemes_compare_hash_and_print_by_their_options():
    assert Tucker2(hooi_iters=1) == Tucker2(hooi_iters=1) != Tucker2(hooi_iters=2)
    assert TiledSVD((4, 8)) == TiledSVD([4, 8]) != TiledSVD((8, 4))
    assert LoweredSVD() == LoweredSVD() and LoweredSVD() != Tucker2() and Tucker2() != LoweredSVD()
    assert len({Tucker2(1), Tucker2(1), Tucker2(2), TiledSVD((4, 8)), TiledSVD((4, 8)), LoweredSVD()}) == 4
    assert hash(TiledSVD((4, 8))) == hash(TiledSVD([4, 8]))
    assert repr(Tucker2(hooi_iters=1)) == "Tucker2(hooi_iters=1)" and repr(LoweredSVD()) == "LoweredSVD()"
    assert repr(TiledSVD((4, 8))) == "TiledSVD(tile_shape=[4, 8])"
    assert TiledSVD((4, 8)).options() == {"tile_shape": [4, 8]} and LoweredSVD().options() == {}
    assert LowRankOptions(TiledSVD((4, 8)), rank=2).scheme == TiledSVD((4, 8))
    assert LowRankOptions("tucker2", rank=2).scheme == Tucker2()


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
    assert LowRankOptions("input_svd", rank=3).scheme.name == "input_svd"
    assert type(LowRankOptions(InputSideSVD(), rank=3).scheme) is InputSideSVD
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
    assert "power_svd" not in schemes.SCHEMES
    with pytest.raises(ValueError, match=r"`scheme` PowerSVD\(power=3\) is not registered under its name 'power_svd'"):
        LowRankOptions(PowerSVD(power=3), rank=3)


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
    small = factorize(model, "svd", rank={"1": 3, "5": 2}, layers=Selection(linear=True))
    small = factorize(small, TiledSVD(tile_shape=(5, 7)), rank={"2": 2}).eval()
    assert structure_spec(small) == FORMAT_1_LAYERS
    path = tmp_path / "format1.pt"
    torch.save({"format": "lrlightning.factorized/1", "layers": FORMAT_1_LAYERS, "backbone": None, "metadata": {},
                "state_dict": small.state_dict()}, path)
    loaded = load_factorized(path, model=model).eval()
    x = torch.randn(2, 3, 11, 11)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_a_scheme_without_a_weighted_projection_refuses_the_activation_objective(input_svd):
    with pytest.raises(ValueError, match=r"`objective`=Activation\(batches=2, ridge=0\.01, bn_weighting=False, "
                                         r"observe_training=True\) needs "
                                         r"a scheme with a weighted projection .*scheme 'input_svd' has none"):
        LowRankOptions("input_svd", rank=3, objective="activation")
    assert all(scheme_class(name).weighted for name in SCHEME_NAMES)


def test_a_scheme_option_is_validated_owned_and_compared(power_svd):
    for bad in (0, -1, 2.0, True, "2", None):
        with pytest.raises(ValueError, match=rf"`power` of PowerSVD must be an int >= 1, got {re.escape(repr(bad))}"):
            PowerSVD(power=bad)
    assert PowerSVD(power=3).options() == {"power": 3} and repr(PowerSVD(power=3)) == "PowerSVD(power=3)"
    assert PowerSVD(power=3) == PowerSVD(power=3) != PowerSVD(power=2) and PowerSVD(power=2) != LoweredSVD()
    assert hash(PowerSVD(power=3)) == hash(PowerSVD(power=3))
    assert scheme_of("power_svd") == PowerSVD(power=2)
    assert LowRankOptions(PowerSVD(power=3), rank=3).scheme == PowerSVD(power=3)


def lowered_singular_values(conv):
    return torch.linalg.svdvals(conv.weight.detach().double().flatten(1))


def check_power_split(module, dense_values, power, rank):
    """``module`` (a factorized conv of PowerSVD) has a kh×kw conv whose rows carry s**(1/power)."""
    assert isinstance(module, LowRankConv2d) and module.scheme == "power_svd" and module.rank == rank
    first, second = module
    row_norms = first.weight.detach().double().flatten(1).norm(dim=1)
    torch.testing.assert_close(row_norms, dense_values[:rank].pow(1.0 / power), atol=1e-4, rtol=1e-4)
    column_norms = second.weight.detach().double().flatten(1).norm(dim=0)
    torch.testing.assert_close(column_norms, dense_values[:rank].pow(1.0 - 1.0 / power), atol=1e-4, rtol=1e-4)


def test_a_scheme_with_an_option_factorizes_saves_and_loads(power_svd, tmp_path):
    model = model_with_two_convs().eval()
    small = factorize(model, PowerSVD(power=3), 3).eval()
    svd = factorize(model, "svd", 3).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x), svd(x), atol=1e-5, rtol=1e-4)
    for index in (2, 4):
        projected = LoweredSVD().project(model[index].weight.detach().unsqueeze(0), [3])[0]
        check_power_split(small[index], torch.linalg.svdvals(projected.double().flatten(1)), 3, 3)
    assert structure_spec(small)["2"]["scheme"] == "power_svd"
    path = tmp_path / "power.pt"
    save_factorized(small, path)
    loaded = load_factorized(path, model=model_with_two_convs()).eval()
    assert structure_spec(loaded) == structure_spec(small)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_a_scheme_with_an_option_trains_with_the_callback_and_factorizes_what_it_trained(power_svd, tmp_path):
    generator = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(32, 3, 12, 12, generator=generator),
                         torch.randint(0, 16, (32,), generator=generator))
    module = NetModule(model_with_two_convs())  # 16-class cross-entropy, SGD
    before = [module.net[i].weight.detach().clone() for i in (2, 4)]
    projection = LowRankProjection(scheme=PowerSVD(power=3), rank=3, every_n_train_steps=2)
    assert projection.options.scheme == PowerSVD(power=3)
    assert "PowerSVD(power=3)" in projection.state_key
    trainer = quiet_trainer(tmp_path, [projection], max_epochs=1)
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.global_step == 4 and projection.num_projections == 2
    assert projection.ranks == {"net.2": 3, "net.4": 3}
    assert all(p.scheme == "power_svd" for p in projection.plans)
    for index, old in zip((2, 4), before):
        weight = module.net[index].weight.detach()
        assert not torch.equal(weight, old)
        assert torch.linalg.matrix_rank(weight.flatten(1)).item() == 3
    module.eval()
    x = torch.randn(2, 3, 12, 12)
    small = projection.factorize(module).eval()
    net = projection.factorize(module.net).eval()
    with torch.no_grad():
        expected = module(x)
        torch.testing.assert_close(small(x), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-4)
    for index in (2, 4):
        check_power_split(net[index], lowered_singular_values(module.net[index]), 3, 3)
        assert torch.equal(net[index][0].weight, small.net[index][0].weight)
    path = tmp_path / "trained.pt"
    projection.save(module.net, path)
    loaded = load_factorized(path, model=model_with_two_convs()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
