"""Layer names of ``torch.compile``d models: plans, ranks and saved files use the uncompiled names, so projection,
``factorize``, ``save_factorized`` and ``load_factorized`` work across compiled and plain models."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrlightning import (
    LowRankOptions,
    LowRankProjection,
    factorize,
    load_factorized,
    plan_layers,
    relative_ranks,
    save_factorized,
)
from lrlightning.export import structure_spec
from lrlightning.names import canonical_name, get_module, set_module

from helpers import NetModule, quiet_trainer


def net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


class CompiledNet(NetModule):
    def __init__(self):
        super().__init__(torch.compile(net(), backend="eager"))


def inputs():
    return torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, expected", [
    ("net._orig_mod.2", "net.2"), ("_orig_mod.2", "2"), ("_orig_mod", ""), ("a.b", "a.b"), ("", ""),
])
def test_canonical_name_drops_the_compiled_segment(name, expected):
    assert canonical_name(name) == expected


def test_get_and_set_module_reach_inside_a_compiled_wrapper():
    compiled = torch.compile(net(), backend="eager")
    assert get_module(compiled, "2") is compiled._orig_mod[2]
    assert get_module(compiled, "_orig_mod.2") is compiled._orig_mod[2]
    replacement = nn.Identity()
    set_module(compiled, "4", replacement)
    assert compiled._orig_mod[4] is replacement
    with pytest.raises(KeyError, match="`7.0` names no module"):
        get_module(compiled, "7.0")


def test_plans_of_compiled_and_plain_models_agree():
    options = LowRankOptions("svd", 2)
    plain = plan_layers(net(), options)[0]
    compiled = plan_layers(torch.compile(net(), backend="eager"), options)[0]
    assert [p.name for p in compiled] == [p.name for p in plain] == ["2", "5"]


def test_callback_ranks_factorize_compiled_and_plain_models(tmp_path):
    model = CompiledNet()
    callback = LowRankProjection("tucker2", (3, 4), every_n_train_steps=2, bn_recalibration_batches=2,
                                 objective="activation")  # the callback's old default objective
    data = TensorDataset(torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,)))
    quiet_trainer(tmp_path, [callback], max_epochs=1).fit(model, DataLoader(data, batch_size=8))
    assert callback.ranks == {"net.2": (3, 4), "net.5": (3, 4)}
    model.eval()
    x = inputs()
    with torch.no_grad():
        expected = model(x)
        whole = factorize(model, "tucker2", rank=callback.ranks).eval()
        torch.testing.assert_close(whole(x), expected, atol=1e-5, rtol=1e-5)

        with pytest.raises(ValueError, match=r"HINT: .* as `net`: pass `rank=relative_ranks\(ranks, 'net'\)`"):
            factorize(model.net, "tucker2", rank=callback.ranks)
        backbone_ranks = relative_ranks(callback.ranks, "net")
        assert backbone_ranks == {"2": (3, 4), "5": (3, 4)}
        compiled_small = factorize(model.net, "tucker2", rank=backbone_ranks).eval()
        torch.testing.assert_close(compiled_small(x), expected, atol=1e-5, rtol=1e-5)

        path = tmp_path / "small.pt"
        save_factorized(compiled_small, path)
        payload = torch.load(path, weights_only=True)
        assert not any("_orig_mod" in key for key in [*payload["layers"], *payload["state_dict"]])
        assert sorted(payload["layers"]) == ["2", "5"]

        for skeleton in (net(), torch.compile(net(), backend="eager")):
            loaded = load_factorized(path, model=skeleton).eval()
            torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)

        plain = net()
        plain.load_state_dict(model.net._orig_mod.state_dict())
        plain_path = tmp_path / "plain.pt"
        save_factorized(factorize(plain, "tucker2", rank=backbone_ranks), plain_path)
        loaded = load_factorized(plain_path, model=torch.compile(net(), backend="eager")).eval()
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix, match", [
    ("head", r"`ranks` name layers outside `head`: \['net.2'\]"),
    ("", r"`prefix` must name a submodule, such as 'net', got ''"),
    (None, r"`prefix` must name a submodule, such as 'net', got None"),
])
def test_relative_ranks_refuses_layers_outside_the_prefix(prefix, match):
    with pytest.raises(ValueError, match=match):
        relative_ranks({"net.2": 3}, prefix)


def test_restored_ranks_of_a_compiled_run_take_canonical_names():
    callback = LowRankProjection("svd", 2)
    callback.load_state_dict({"last_step": 2, "projections": 1, "ranks": {"_orig_mod.2": 3, "_orig_mod.5": 4}})
    callback.projector.resolve(net())
    assert callback.ranks == {"2": 3, "5": 4}
    fresh = LowRankProjection("svd", 2)  # the public path: factorizing from restored state, without a fit
    fresh.load_state_dict({"last_step": 2, "projections": 1, "ranks": {"_orig_mod.2": 3, "_orig_mod.5": 4}})
    small = fresh.factorize(net())
    assert sorted(structure_spec(small)) == ["2", "5"]
    assert structure_spec(small) == structure_spec(factorize(net(), "svd", rank={"2": 3, "5": 4}))



def test_printed_factorized_layers_show_their_scheme_and_rank():
    from torch import nn

    from lrlightning import Selection, TiledSVD, factorize

    every = Selection(skip_first_conv=False, linear=True)

    def printed(layer, scheme, rank):
        return repr(factorize(nn.Sequential(layer), scheme, rank, layers=every))

    assert "LowRankConv2d(\n    scheme=tucker2, rank=(2, 4)\n    (0): Conv2d(8, 2" in printed(
        nn.Conv2d(8, 16, 3), "tucker2", (2, 4))
    assert "LowRankConv2d(\n    scheme=svd, rank=2\n    (0): Conv1d(4, 2" in printed(nn.Conv1d(4, 8, 3), "svd", 2)
    tiled = printed(nn.Conv2d(8, 16, 3), TiledSVD(tile_shape=(8, 24)), 2)
    assert "scheme=tiled_svd, tile_shape=" in tiled and "rank=2)" in tiled
    assert "LowRankLinear(\n    scheme=svd, rank=4\n" in printed(nn.Linear(32, 16), "svd", 4)
