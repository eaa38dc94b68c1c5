"""What every built-in scheme promises: an orthogonal, idempotent projection onto its rank set, an exact
factorized module with the parameter count it plans, rebuilt from its spec, and the compression rule."""
import pytest
import torch

from lrlightning import Compression, LowRankOptions, Solver, plan_layers, project_
from lrlightning.schemes import SCHEME_NAMES, layer_from_spec
from lrlightning.schemes.spatial_svd import SpatialSVD
from lrlightning.schemes.svd import LoweredSVD
from lrlightning.schemes.tiled_svd import TiledSVD
from lrlightning.schemes.tucker2 import Tucker2

EXAMPLES = {
    "svd": ("svd", 3),
    "spatial_svd": ("spatial_svd", 3),
    "tiled_svd": (TiledSVD(tile_shape=(4, 8)), 2),
    "tiled_svd_aligned": (TiledSVD(tile_shape=(5, 18)), 2),
    "tucker2": ("tucker2", (3, 4)),
    "tucker2_hooi": (Tucker2(hooi_iters=3), (3, 4)),
}


def example(key):
    """(scheme object, rank, options) of an example."""
    scheme, rank = EXAMPLES[key]
    options = LowRankOptions(scheme=scheme, rank=rank)
    return options.scheme, rank, options


def test_the_examples_cover_every_built_in_scheme():
    assert {example(key)[0].name for key in EXAMPLES} == set(SCHEME_NAMES)
    assert example("tucker2_hooi")[0].hooi_iters == 3 and example("tiled_svd")[0].tile_shape == (4, 8)


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_projecting_twice_changes_nothing(random_weights, key):
    scheme, rank, _ = example(key)
    weights = random_weights(2, 10, 6, 3, 3, seed=1)
    once = scheme.project(weights, [rank, rank])
    twice = scheme.project(once, [rank, rank])
    assert not torch.allclose(once, weights, atol=1e-3)
    torch.testing.assert_close(twice, once, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_projection_is_orthogonal(random_weights, key):
    """The residual is orthogonal to the projection, so ||W||² = ||W'||² + ||W - W'||²."""
    scheme, rank, _ = example(key)
    weights = random_weights(3, 10, 6, 3, 3, seed=2).double()
    approx = scheme.project(weights, [rank] * 3)
    inner = ((weights - approx) * approx).flatten(1).sum(1)
    torch.testing.assert_close(inner, torch.zeros(3, dtype=inner.dtype), atol=1e-8, rtol=0)
    total = weights.flatten(1).pow(2).sum(1)
    parts = approx.flatten(1).pow(2).sum(1) + (weights - approx).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(parts, total, atol=1e-8, rtol=1e-10)


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_gram_driver_matches_the_exact_projection(random_weights, key):
    scheme, rank, _ = example(key)
    weights = random_weights(3, 10, 6, 3, 3, seed=50)
    ranks = [rank, rank, (2, 2) if isinstance(rank, tuple) else 1]
    exact = scheme.project(weights, ranks, "exact")
    gram = scheme.project(weights, ranks, "gram")
    torch.testing.assert_close(gram, exact, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scheme.project(gram, ranks, "gram"), gram, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("key", sorted(EXAMPLES))
def test_factorized_layer_is_exact_counted_and_rebuilt_from_its_spec(conv_model, key):
    scheme, rank, _ = example(key)
    dense = conv_model(out_channels=10, in_channels=6, stride=2).body
    with torch.no_grad():
        dense.weight.copy_(scheme.project(dense.weight.unsqueeze(0), [rank])[0])
    before = dense.weight.detach().clone()
    module = scheme.factorized_layer(dense, rank)
    assert isinstance(module, scheme.layer_types) and torch.equal(dense.weight, before)
    weights = sum(p.numel() for name, p in module.named_parameters() if not name.endswith("bias"))
    assert weights == scheme.factorized_params(tuple(dense.weight.shape), rank) < dense.weight.numel()
    x = torch.randn(2, 6, 9, 11, generator=torch.Generator().manual_seed(3))
    rebuilt = layer_from_spec(module.spec())
    rebuilt.load_state_dict(module.state_dict())
    assert type(rebuilt) is type(module) and rebuilt.spec() == module.spec()
    with torch.no_grad():
        torch.testing.assert_close(module(x), dense(x), atol=1e-5, rtol=1e-4)
        assert torch.equal(rebuilt(x), module(x))


@pytest.mark.parametrize("scheme", ["svd", "spatial_svd", TiledSVD(tile_shape=(16, 16)), "tucker2"], ids=str)
@pytest.mark.parametrize("target", [1.5, 3.0, 7.0])
def test_compression_rule_reaches_the_target_and_the_next_larger_rank_would_not(conv_model, scheme, target):
    model = conv_model(out_channels=32, in_channels=24)
    options = LowRankOptions(scheme, rank=Compression(target))
    (plan,), _ = plan_layers(model, options, warn=False)
    assert plan.params_dense / plan.params_factorized >= target
    conv_scheme = options.scheme
    candidates = list(conv_scheme.rank_candidates(plan.shape))
    position = candidates.index(plan.rank)
    assert position > 0
    larger = candidates[position - 1]
    assert plan.params_dense < target * conv_scheme.factorized_params(plan.shape, larger)
    if conv_scheme.name != "tucker2":
        assert larger == plan.rank + 1


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("driver", ["exact", "gram"])
@pytest.mark.parametrize("key", ["svd", "tucker2", "tiled_svd", "spatial_svd"])
def test_projection_keeps_parameter_identity_and_device(conv_model, device, driver, key):
    scheme, rank, options = example(key)
    model = conv_model().to(device)
    weight = model.body.weight
    pointer = weight.data_ptr()
    expected = scheme.project(weight.detach().float().unsqueeze(0).cpu(), [rank])[0]
    project_(model, options.scheme, rank=rank, solver=Solver(driver=driver))
    assert model.body.weight is weight and weight.data_ptr() == pointer
    assert weight.device.type == device
    torch.testing.assert_close(weight.detach().cpu(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scheme, ranks", [
    (LoweredSVD(), [1, 3, 8, 12]),
    (SpatialSVD(), [1, 4, 9]),
    (Tucker2(), [(1, 1), (3, 5), (8, 12), (8, 2)]),
    (Tucker2(hooi_iters=2), [(3, 5), (8, 12)]),
    (TiledSVD((8, 24)), [1, 3, 8]),
])
def test_rank_errors_equal_the_error_of_the_projection(scheme, ranks):
    torch.manual_seed(0)
    weight = torch.randn(12, 8, 3, 3)
    errors = scheme.rank_errors(weight, ranks)
    for rank, error in zip(ranks, errors):
        approx = scheme.project(weight.unsqueeze(0), [rank])[0]
        assert error == pytest.approx(((approx - weight).pow(2).sum() / weight.pow(2).sum()).item(), abs=1e-5)
    assert scheme.rank_errors(torch.zeros(12, 8, 3, 3), ranks[:1]) == [0.0]
