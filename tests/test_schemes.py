"""The low-rank math of issue #2: every scheme is an orthogonal projection onto its rank set, and the rank rules
resolve the ranks they promise."""
import math

import pytest
import torch
from torch import nn

from lrlightning import LowRankOptions, plan_layers, project_
from lrlightning.schemes import (
    LoweredSVD,
    SpatialSVD,
    TiledSVD,
    Tucker2,
    make_scheme,
    smallest_rank_for_energy,
    truncated_svd,
)

SCHEMES = {
    "svd": (LoweredSVD(), 3),
    "spatial_svd": (SpatialSVD(), 3),
    "tiled_svd": (TiledSVD((4, 8)), 2),
    "tucker2": (Tucker2(), (3, 4)),
    "tucker2_hooi": (Tucker2(hooi_iters=3), (3, 4)),
}


def random_weights(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def single_conv_model(out_channels=10, in_channels=6, kernel_size=3, dtype=torch.float32):
    """Stem conv (skipped as the first conv) followed by the conv under test, named ``body``."""
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, in_channels, 3, padding=1))
    model.add_module("body", nn.Conv2d(in_channels, out_channels, kernel_size, padding=1))
    return model.to(dtype)


def frobenius(tensor):
    return tensor.double().flatten(1).norm(dim=1)


def test_svd_error_is_the_tail_singular_value_energy():
    """Eckart–Young: ||W - W_r||_F² equals the sum of the discarded squared singular values."""
    weights = random_weights(3, 12, 5, 3, 3)
    ranks = [1, 4, 7]
    approx = LoweredSVD().project(weights, ranks)
    singular = torch.linalg.svdvals(weights.double().reshape(3, 12, -1))
    tails = torch.stack([singular[b, r:].pow(2).sum() for b, r in enumerate(ranks)])
    errors = frobenius(weights - approx).pow(2)
    torch.testing.assert_close(errors, tails, rtol=1e-4, atol=1e-6)


def test_layer_stats_report_the_eckart_young_error_and_energy():
    model = single_conv_model(out_channels=12, in_channels=8)
    weight = model.body.weight.detach().double().reshape(12, -1).clone()
    singular = torch.linalg.svdvals(weight).pow(2)
    (stats,) = project_(model, "svd", rank=5)
    total = singular.sum().item()
    assert stats.name == "body" and stats.rank == 5
    assert stats.rel_error == pytest.approx(math.sqrt(singular[5:].sum().item() / total), rel=1e-4)
    assert stats.energy == pytest.approx(singular[:5].sum().item() / total, rel=1e-5)
    assert stats.rel_error**2 + stats.energy == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("key", sorted(SCHEMES))
def test_projecting_twice_changes_nothing(key):
    scheme, rank = SCHEMES[key]
    weights = random_weights(2, 10, 6, 3, 3, seed=1)
    once = scheme.project(weights, [rank, rank])
    twice = scheme.project(once, [rank, rank])
    assert not torch.allclose(once, weights, atol=1e-3)
    torch.testing.assert_close(twice, once, atol=1e-5, rtol=0)


def test_svd_projection_reaches_the_rank():
    weights = random_weights(3, 10, 6, 3, 3, seed=2)
    ranks = [1, 3, 6]
    approx = LoweredSVD().project(weights, ranks)
    assert torch.linalg.matrix_rank(approx.reshape(3, 10, -1)).tolist() == ranks


def test_spatial_svd_projection_reaches_the_rank_of_the_spatial_matrix():
    weights = random_weights(2, 10, 6, 3, 3, seed=3)
    approx = SpatialSVD().project(weights, [2, 5])
    spatial = approx.permute(0, 2, 3, 1, 4).reshape(2, 6 * 3, 10 * 3)
    assert torch.linalg.matrix_rank(spatial).tolist() == [2, 5]
    assert torch.linalg.matrix_rank(approx.reshape(2, 10, -1)).tolist() == [min(10, 2 * 3), min(10, 5 * 3)]


def test_tiled_svd_projection_reaches_the_rank_in_every_tile_including_ragged_edges():
    weights = random_weights(1, 10, 4, 3, 3, seed=4)
    rows, cols, rank = 4, 8, 3
    approx = TiledSVD((rows, cols)).project(weights, [rank])[0].reshape(10, 36)
    seen = 0
    for top in range(0, 10, rows):
        for left in range(0, 36, cols):
            tile = approx[top : top + rows, left : left + cols]
            assert torch.linalg.matrix_rank(tile).item() == min(rank, *tile.shape), (top, left)
            seen += 1
    assert seen == 3 * 5


@pytest.mark.parametrize("hooi_iters", [0, 2])
def test_tucker2_projection_reaches_both_mode_ranks(hooi_iters):
    weights = random_weights(2, 10, 6, 3, 3, seed=5)
    ranks = [(2, 5), (4, 3)]
    approx = Tucker2(hooi_iters).project(weights, ranks)
    mode_out = approx.reshape(2, 10, -1)
    mode_in = approx.transpose(1, 2).reshape(2, 6, -1)
    assert torch.linalg.matrix_rank(mode_out).tolist() == [5, 3]
    assert torch.linalg.matrix_rank(mode_in).tolist() == [2, 4]


def test_tucker2_hooi_error_is_at_most_the_hosvd_error():
    weights = random_weights(4, 16, 12, 3, 3, seed=6)
    ranks = [(4, 5), (2, 9), (6, 3), (1, 1)]
    hosvd = frobenius(weights - Tucker2(0).project(weights, ranks))
    hooi = frobenius(weights - Tucker2(5).project(weights, ranks))
    assert bool((hooi <= hosvd * (1 + 1e-6)).all()), (hooi, hosvd)
    assert bool((hooi < hosvd).any())


def smallest_rank_by_hand(singular_values, energy):
    power = singular_values.double().pow(2)
    kept = 0.0
    for k, value in enumerate(power.tolist(), start=1):
        kept += value
        if kept >= energy * power.sum().item():
            return k
    return len(power)


def decaying_spectrum_model(out_channels, in_channels, decay=0.8):
    """``single_conv_model`` whose ``body`` kernel has singular values decay**k (lowered view)."""
    model = single_conv_model(out_channels=out_channels, in_channels=in_channels)
    cols = in_channels * 9
    left, _ = torch.linalg.qr(random_weights(out_channels, out_channels, seed=7))
    right, _ = torch.linalg.qr(random_weights(cols, out_channels, seed=8))
    values = decay ** torch.arange(out_channels, dtype=torch.float32)
    with torch.no_grad():
        model.body.weight.copy_(((left * values) @ right.T).reshape(out_channels, in_channels, 3, 3))
    return model


@pytest.mark.parametrize("energy", [0.3, 0.75, 0.95, 0.99])
def test_energy_rule_gives_the_smallest_rank_keeping_that_energy(energy):
    model = decaying_spectrum_model(out_channels=24, in_channels=12)
    singular = torch.linalg.svdvals(model.body.weight.detach().reshape(24, -1))
    expected = smallest_rank_by_hand(singular, energy)
    (plan,), _ = plan_layers(model, LowRankOptions("svd", energy=energy), warn=False)
    assert plan.rank == expected
    power = singular.double().pow(2)
    assert power[:expected].sum() >= energy * power.sum() * (1 - 1e-12)
    if expected > 1:
        assert power[: expected - 1].sum() < energy * power.sum()


def test_smallest_rank_for_energy_edge_cases():
    singular = torch.tensor([3.0, 2.0, 1.0, 0.5])
    assert smallest_rank_for_energy(singular, 1.0) == 4
    assert smallest_rank_for_energy(singular, 9 / 14.25) == 1
    assert smallest_rank_for_energy(singular, 9 / 14.25 + 1e-6) == 2
    assert smallest_rank_for_energy(torch.zeros(5), 0.9) == 1


def test_energy_rule_for_tucker2_uses_each_channel_mode():
    model = single_conv_model(out_channels=24, in_channels=16)
    weight = model.body.weight.detach()
    expected_out = smallest_rank_by_hand(torch.linalg.svdvals(weight.reshape(24, -1)), 0.8)
    expected_in = smallest_rank_by_hand(torch.linalg.svdvals(weight.transpose(0, 1).reshape(16, -1)), 0.8)
    (plan,), _ = plan_layers(model, LowRankOptions("tucker2", energy=0.8), warn=False)
    assert plan.rank == (expected_in, expected_out)


def test_energy_rule_for_tiled_svd_takes_the_largest_tile_rank():
    model = single_conv_model(out_channels=16, in_channels=8)
    scheme = TiledSVD((8, 24))
    tiles = scheme.tiles(model.body.weight.detach().unsqueeze(0)).flatten(0, 2)
    expected = max(smallest_rank_by_hand(s, 0.6) for s in torch.linalg.svdvals(tiles))
    (plan,), _ = plan_layers(model, LowRankOptions("tiled_svd", energy=0.6, tile_shape=(8, 24)), warn=False)
    assert plan.rank == expected


@pytest.mark.parametrize("scheme, tile_shape", [("svd", None), ("spatial_svd", None), ("tiled_svd", (16, 16)),
                                                ("tucker2", None)])
@pytest.mark.parametrize("target", [1.5, 3.0, 7.0])
def test_compression_rule_reaches_the_target_and_the_next_larger_rank_would_not(scheme, tile_shape, target):
    model = single_conv_model(out_channels=32, in_channels=24)
    (plan,), _ = plan_layers(model, LowRankOptions(scheme, compression=target, tile_shape=tile_shape), warn=False)
    assert plan.params_dense / plan.params_factorized >= target
    conv_scheme = make_scheme(scheme, tile_shape)
    candidates = list(conv_scheme.rank_candidates(plan.shape))
    position = candidates.index(plan.rank)
    assert position > 0
    larger = candidates[position - 1]
    assert plan.params_dense < target * conv_scheme.factorized_params(plan.shape, larger)
    if scheme != "tucker2":
        assert larger == plan.rank + 1


def test_compression_rule_svd_rank_by_hand():
    model = single_conv_model(out_channels=32, in_channels=16)
    (plan,), _ = plan_layers(model, LowRankOptions("svd", compression=3.0), warn=False)
    dense = 32 * 16 * 9
    assert plan.rank == math.floor(dense / (3.0 * (32 + 16 * 9)))
    assert plan.params_factorized == plan.rank * (32 + 16 * 9)


@pytest.mark.parametrize("fraction, expected_svd, expected_tucker", [
    (0.3, 19, (19, 19)),
    (0.45, 28, (28, 28)),
    (0.5, 32, (32, 32)),
    (0.01, 1, (1, 1)),
    (1 / 3, 21, (21, 21)),
])
def test_fraction_rule_floors_and_is_at_least_one(fraction, expected_svd, expected_tucker):
    model = single_conv_model(out_channels=64, in_channels=64)
    (svd_plan,), _ = plan_layers(model, LowRankOptions("svd", rank=fraction), warn=False)
    assert svd_plan.rank == expected_svd
    scheme = Tucker2()
    assert scheme.rank_from_fraction((64, 64, 3, 3), fraction) == expected_tucker
    assert scheme.rank_from_fraction((10, 7, 3, 3), fraction) == (max(1, math.floor(fraction * 7 + 1e-9)),
                                                                   max(1, math.floor(fraction * 10 + 1e-9)))


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_weights_keep_their_dtype_and_are_projected(dtype, tolerance):
    model = single_conv_model(out_channels=16, in_channels=8, dtype=dtype)
    weight = model.body.weight
    before = weight.detach().clone()
    reference = LoweredSVD().project(before.float().unsqueeze(0), [3])[0]
    project_(model, "svd", rank=3)
    assert model.body.weight is weight
    assert weight.dtype == dtype and model.stem.weight.dtype == dtype
    assert not torch.equal(weight.detach(), before)
    scale = reference.abs().max().item()
    assert (weight.detach().float() - reference).abs().max().item() <= tolerance * scale
    singular = torch.linalg.svdvals(weight.detach().float().reshape(16, -1))
    assert singular[3].item() <= 3 * tolerance * singular[0].item()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("driver", ["exact", "gram"])
@pytest.mark.parametrize("scheme, rank, tile_shape", [("svd", 3, None), ("tucker2", (2, 3), None),
                                                      ("tiled_svd", 2, (4, 9)), ("spatial_svd", 3, None)])
def test_projection_keeps_parameter_identity_and_device(device, driver, scheme, rank, tile_shape):
    model = single_conv_model().to(device)
    weight = model.body.weight
    pointer = weight.data_ptr()
    expected = make_scheme(scheme, tile_shape).project(weight.detach().float().unsqueeze(0).cpu(), [rank])[0]
    project_(model, scheme, rank=rank, tile_shape=tile_shape, svd_driver=driver)
    assert model.body.weight is weight and weight.data_ptr() == pointer
    assert weight.device.type == device
    torch.testing.assert_close(weight.detach().cpu(), expected, atol=1e-5, rtol=1e-4)


def low_rank_matrix(rows, cols, rank, seed):
    return random_weights(rows, rank, seed=seed) @ random_weights(rank, cols, seed=seed + 1)


@pytest.mark.parametrize("rank", [2, 4, 5])
def test_randomized_driver_is_exact_on_low_rank_input(rank):
    matrices = torch.stack([low_rank_matrix(20, 72, 4, seed) for seed in (10, 20)])
    exact = LoweredSVD().project(matrices.reshape(2, 20, 8, 3, 3), [rank, rank], "exact")
    randomized = LoweredSVD().project(matrices.reshape(2, 20, 8, 3, 3), [rank, rank], "randomized")
    torch.testing.assert_close(randomized, exact, atol=1e-4, rtol=1e-4)
    if rank >= 4:
        torch.testing.assert_close(randomized, matrices.reshape(2, 20, 8, 3, 3), atol=1e-4, rtol=1e-4)


def test_randomized_driver_through_project_():
    model = single_conv_model(out_channels=20, in_channels=8)
    with torch.no_grad():
        model.body.weight.copy_(low_rank_matrix(20, 72, 3, seed=30).reshape(20, 8, 3, 3))
    before = model.body.weight.detach().clone()
    (stats,) = project_(model, "svd", rank=3, svd_driver="randomized")
    torch.testing.assert_close(model.body.weight.detach(), before, atol=1e-4, rtol=1e-4)
    assert stats.rel_error < 1e-5


def test_truncated_svd_randomized_returns_the_requested_shapes():
    matrices = random_weights(3, 30, 12, seed=40)
    u, s, vh = truncated_svd(matrices, 5, "randomized")
    assert u.shape == (3, 30, 5) and s.shape == (3, 5) and vh.shape == (3, 5, 12)
    exact = torch.linalg.svdvals(matrices)[:, :5]
    assert bool((s <= exact * (1 + 1e-4)).all())


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_gram_driver_matches_the_exact_projection(name):
    scheme, rank = SCHEMES[name]
    weights = random_weights(3, 10, 6, 3, 3, seed=50)
    ranks = [rank, rank, (2, 2) if isinstance(rank, tuple) else 1]
    exact = scheme.project(weights, ranks, "exact")
    gram = scheme.project(weights, ranks, "gram")
    torch.testing.assert_close(gram, exact, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scheme.project(gram, ranks, "gram"), gram, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)])
def test_gram_projection_error_is_the_singular_value_tail(shape):
    matrices = random_weights(2, *shape, seed=60)
    approx = LoweredSVD().project(matrices.reshape(2, shape[0], shape[1], 1, 1), [5, 5], "gram").reshape(2, *shape)
    tail = torch.linalg.svdvals(matrices.double())[:, 5:].pow(2).sum(1)
    errors = (matrices - approx).double().flatten(1).pow(2).sum(1)
    torch.testing.assert_close(errors, tail, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_truncated_svd_gram_gives_orthonormal_triplets(shape):
    matrices = random_weights(2, *shape, seed=70)
    u, s, vh = truncated_svd(matrices, 6, "gram")
    assert u.shape == (2, shape[0], 6) and s.shape == (2, 6) and vh.shape == (2, 6, shape[1])
    eye = torch.eye(6).expand(2, 6, 6)
    torch.testing.assert_close(u.mT @ u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.mT, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(s, torch.linalg.svdvals(matrices)[:, :6], atol=1e-4, rtol=1e-5)
    _, _, vh_exact = truncated_svd(matrices, 6, "exact")
    torch.testing.assert_close((vh @ vh_exact.mT).abs(), eye, atol=1e-4, rtol=0)


def test_gram_driver_on_a_rank_deficient_matrix_is_finite_and_exact():
    matrices = torch.stack([low_rank_matrix(20, 72, 3, seed=80), torch.zeros(20, 72)])
    u, s, vh = truncated_svd(matrices, 5, "gram")
    assert bool(torch.isfinite(u).all() and torch.isfinite(vh).all())
    torch.testing.assert_close((u * s.unsqueeze(-2)) @ vh, matrices, atol=1e-4, rtol=1e-4)
    projected = LoweredSVD().project(matrices.reshape(2, 20, 8, 3, 3), [5, 5], "gram")
    torch.testing.assert_close(projected, matrices.reshape(2, 20, 8, 3, 3), atol=1e-4, rtol=1e-4)


def test_gram_driver_through_project_():
    model = single_conv_model(out_channels=20, in_channels=8)
    expected = Tucker2().project(model.body.weight.detach().unsqueeze(0), [(3, 5)])[0]
    (stats,) = project_(model, "tucker2", rank=(3, 5), svd_driver="gram")
    torch.testing.assert_close(model.body.weight.detach(), expected, atol=1e-5, rtol=1e-4)
    assert stats.rank == (3, 5) and 0 < stats.rel_error < 1


def test_gram_tucker2_keeps_a_lower_rank_weight_whatever_the_unfolding_shape():
    weights = random_weights(2, 30, 2, 3, 3, seed=90)  # mode-out unfolding 30 x 18 is tall
    lower = Tucker2().project(weights, [(1, 4), (1, 4)])
    again = Tucker2().project(lower, [(2, 20), (2, 20)], "gram")
    torch.testing.assert_close(again, lower, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Tucker2().project(weights, [(2, 12)] * 2, "gram"),
                               Tucker2().project(weights, [(2, 12)] * 2, "exact"), atol=1e-4, rtol=1e-4)
