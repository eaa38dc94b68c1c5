"""``tucker2``: both channel-mode ranks reached, the HOSVD error bound, HOOI never worse, the per-mode energy and
fraction rules, the gram driver on tall unfoldings and the three-conv export."""
import math

import pytest
import torch

from lrlightning import Energy, LowRankOptions, Solver, plan_layers, project_
from lrlightning.layers import LowRankConv2d
from lrlightning.schemes import Tucker2


def unfoldings(weights):
    """Mode-out (B, T, S·kh·kw) and mode-in (B, S, T·kh·kw) unfoldings."""
    return weights.flatten(2), weights.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("hooi_iters", [0, 2])
def test_tucker2_projection_reaches_both_mode_ranks(random_weights, hooi_iters):
    weights = random_weights(2, 10, 6, 3, 3, seed=5)
    approx = Tucker2(hooi_iters).project(weights, [(2, 5), (4, 3)])
    mode_out, mode_in = unfoldings(approx)
    assert torch.linalg.matrix_rank(mode_out).tolist() == [5, 3]
    assert torch.linalg.matrix_rank(mode_in).tolist() == [2, 4]


def test_hosvd_error_is_at_most_the_sum_of_the_two_mode_tails(random_weights):
    """Quasi-optimality of HOSVD: ||W - W'||² lies between the larger and the sum of the two mode tails (the
    discarded squared singular values of each unfolding; Eckart–Young bounds it from below on each)."""
    weights = random_weights(3, 12, 8, 3, 3, seed=6).double()
    ranks = [(2, 5), (4, 3), (8, 12)]
    errors = (weights - Tucker2().project(weights, ranks)).flatten(1).pow(2).sum(1)
    mode_out, mode_in = (torch.linalg.svdvals(m) for m in unfoldings(weights))
    tails = torch.tensor([[mode_out[b, r_out:].pow(2).sum(), mode_in[b, r_in:].pow(2).sum()]
                          for b, (r_in, r_out) in enumerate(ranks)], dtype=errors.dtype)
    assert bool((errors <= tails.sum(1) * (1 + 1e-9) + 1e-12).all())
    assert bool((errors >= tails.max(1).values * (1 - 1e-9)).all())
    assert errors[2].item() < 1e-12


def test_tucker2_hooi_error_is_at_most_the_hosvd_error(random_weights):
    weights = random_weights(4, 16, 12, 3, 3, seed=6)
    ranks = [(4, 5), (2, 9), (6, 3), (1, 1)]
    hosvd = (weights - Tucker2(0).project(weights, ranks)).double().flatten(1).norm(dim=1)
    hooi = (weights - Tucker2(5).project(weights, ranks)).double().flatten(1).norm(dim=1)
    assert bool((hooi <= hosvd * (1 + 1e-6)).all()), (hooi, hosvd)
    assert bool((hooi < hosvd).any())


def test_energy_rule_for_tucker2_uses_each_channel_mode(conv_model):
    model = conv_model(out_channels=24, in_channels=16)
    mode_out, mode_in = unfoldings(model.body.weight.detach().unsqueeze(0))

    def smallest(matrix, energy=0.8):
        power = torch.linalg.svdvals(matrix[0]).double().pow(2)
        return int((power.cumsum(0) < energy * power.sum() - 1e-12).sum().item()) + 1

    (plan,), _ = plan_layers(model, LowRankOptions("tucker2", rank=Energy(0.8)), warn=False)
    assert plan.rank == (smallest(mode_in), smallest(mode_out))


@pytest.mark.parametrize("fraction, expected", [(0.3, 19), (0.45, 28), (0.5, 32), (0.01, 1), (1 / 3, 21)])
def test_fraction_rule_takes_that_fraction_of_each_channel_dimension(fraction, expected):
    scheme = Tucker2()
    assert scheme.rank_from_fraction((64, 64, 3, 3), fraction) == (expected, expected)
    assert scheme.rank_from_fraction((10, 7, 3, 3), fraction) == (max(1, math.floor(fraction * 7 + 1e-9)),
                                                                   max(1, math.floor(fraction * 10 + 1e-9)))


def test_gram_driver_through_project_(conv_model):
    model = conv_model(out_channels=20, in_channels=8)
    expected = Tucker2().project(model.body.weight.detach().unsqueeze(0), [(3, 5)])[0]
    (stats,) = project_(model, "tucker2", rank=(3, 5), solver=Solver(driver="gram"))
    torch.testing.assert_close(model.body.weight.detach(), expected, atol=1e-5, rtol=1e-4)
    assert stats.rank == (3, 5) and 0 < stats.rel_error < 1


def test_gram_tucker2_keeps_a_lower_rank_weight_whatever_the_unfolding_shape(random_weights):
    weights = random_weights(2, 30, 2, 3, 3, seed=90)  # mode-out unfolding 30 x 18 is tall
    lower = Tucker2().project(weights, [(1, 4), (1, 4)])
    again = Tucker2().project(lower, [(2, 20), (2, 20)], "gram")
    torch.testing.assert_close(again, lower, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(Tucker2().project(weights, [(2, 12)] * 2, "gram"),
                               Tucker2().project(weights, [(2, 12)] * 2, "exact"), atol=1e-4, rtol=1e-4)


def test_tucker2_exports_pointwise_core_pointwise_convs(conv_model):
    model = conv_model(out_channels=12, in_channels=8, stride=2)
    module = Tucker2().factorized_layer(model.body, (3, 5))
    assert isinstance(module, LowRankConv2d) and module.scheme == "tucker2" and module.rank == (3, 5)
    first, core, last = module
    assert first.weight.shape == (3, 8, 1, 1) and core.weight.shape == (5, 3, 3, 3) and core.stride == (2, 2)
    assert last.weight.shape == (12, 5, 1, 1) and torch.equal(last.bias, model.body.bias)
