"""``svd``: Eckart–Young on the lowered matrix, its rank rules, its exported structure and low-precision weights."""
import math

import pytest
import torch
from torch import nn

from lrlightning import Compression, Energy, LowRankOptions, Solver, plan_layers, project_
from lrlightning.layers import LowRankConv2d, LowRankLinear
from lrlightning.schemes import LoweredSVD


def test_svd_error_is_the_tail_singular_value_energy(random_weights):
    """Eckart–Young: ||W - W_r||_F² equals the sum of the discarded squared singular values."""
    weights = random_weights(3, 12, 5, 3, 3)
    ranks = [1, 4, 7]
    approx = LoweredSVD().project(weights, ranks)
    singular = torch.linalg.svdvals(weights.double().reshape(3, 12, -1))
    tails = torch.stack([singular[b, r:].pow(2).sum() for b, r in enumerate(ranks)])
    errors = (weights - approx).double().flatten(1).pow(2).sum(1)
    torch.testing.assert_close(errors, tails, rtol=1e-4, atol=1e-6)


def test_svd_projection_reaches_the_rank(random_weights):
    weights = random_weights(3, 10, 6, 3, 3, seed=2)
    ranks = [1, 3, 6]
    approx = LoweredSVD().project(weights, ranks)
    assert torch.linalg.matrix_rank(approx.reshape(3, 10, -1)).tolist() == ranks


def test_layer_stats_report_the_eckart_young_error_and_energy(conv_model):
    model = conv_model(out_channels=12, in_channels=8)
    weight = model.body.weight.detach().double().reshape(12, -1).clone()
    singular = torch.linalg.svdvals(weight).pow(2)
    (stats,) = project_(model, "svd", rank=5)
    total = singular.sum().item()
    assert stats.name == "body" and stats.rank == 5
    assert stats.rel_error == pytest.approx(math.sqrt(singular[5:].sum().item() / total), rel=1e-4)
    assert stats.energy == pytest.approx(singular[:5].sum().item() / total, rel=1e-5)
    assert stats.rel_error**2 + stats.energy == pytest.approx(1.0, abs=1e-5)


def test_svd_exports_a_conv_as_kernel_then_pointwise_conv(conv_model):
    model = conv_model(out_channels=12, in_channels=8, kernel_size=(3, 5), stride=2, padding=(1, 2), dilation=1)
    module = LoweredSVD().factorized_layer(model.body, 4)
    assert isinstance(module, LowRankConv2d) and module.scheme == "svd" and module.rank == 4
    first, second = module
    assert first.weight.shape == (4, 8, 3, 5) and first.stride == (2, 2) and first.bias is None
    assert second.weight.shape == (12, 4, 1, 1) and torch.equal(second.bias, model.body.bias)


def test_svd_exports_a_linear_as_two_linears():
    dense = nn.Linear(20, 9)
    module = LoweredSVD().factorized_layer(dense, 3)
    assert isinstance(module, LowRankLinear) and module.rank == 3
    assert module[0].weight.shape == (3, 20) and module[0].bias is None and torch.equal(module[1].bias, dense.bias)
    approx = LoweredSVD().project(dense.weight.detach().unsqueeze(0), [3])[0]
    x = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(module(x), nn.functional.linear(x, approx, dense.bias), atol=1e-5, rtol=1e-4)


def decaying_spectrum_model(conv_model, out_channels, in_channels, decay=0.8):
    """``conv_model`` whose ``body`` kernel has singular values decay**k (lowered view)."""
    model = conv_model(out_channels=out_channels, in_channels=in_channels)
    cols = in_channels * 9
    left, _ = torch.linalg.qr(torch.randn(out_channels, out_channels, generator=torch.Generator().manual_seed(7)))
    right, _ = torch.linalg.qr(torch.randn(cols, out_channels, generator=torch.Generator().manual_seed(8)))
    values = decay ** torch.arange(out_channels, dtype=torch.float32)
    with torch.no_grad():
        model.body.weight.copy_(((left * values) @ right.T).reshape(out_channels, in_channels, 3, 3))
    return model


def smallest_rank_by_hand(singular_values, energy):
    power = singular_values.double().pow(2)
    kept = 0.0
    for k, value in enumerate(power.tolist(), start=1):
        kept += value
        if kept >= energy * power.sum().item():
            return k
    return len(power)


@pytest.mark.parametrize("energy", [0.3, 0.75, 0.95, 0.99])
def test_energy_rule_gives_the_smallest_rank_keeping_that_energy(conv_model, energy):
    model = decaying_spectrum_model(conv_model, out_channels=24, in_channels=12)
    singular = torch.linalg.svdvals(model.body.weight.detach().reshape(24, -1))
    expected = smallest_rank_by_hand(singular, energy)
    (plan,), _ = plan_layers(model, LowRankOptions("svd", rank=Energy(energy)), warn=False)
    assert plan.rank == expected
    power = singular.double().pow(2)
    assert power[:expected].sum() >= energy * power.sum() * (1 - 1e-12)
    if expected > 1:
        assert power[: expected - 1].sum() < energy * power.sum()


def test_compression_rule_svd_rank_by_hand(conv_model):
    model = conv_model(out_channels=32, in_channels=16)
    (plan,), _ = plan_layers(model, LowRankOptions("svd", rank=Compression(3.0)), warn=False)
    dense = 32 * 16 * 9
    assert plan.rank == math.floor(dense / (3.0 * (32 + 16 * 9)))
    assert plan.params_factorized == plan.rank * (32 + 16 * 9)


@pytest.mark.parametrize("fraction, expected", [(0.3, 19), (0.45, 28), (0.5, 32), (0.01, 1), (1 / 3, 21)])
def test_fraction_rule_floors_and_is_at_least_one(conv_model, fraction, expected):
    model = conv_model(out_channels=64, in_channels=64)
    (plan,), _ = plan_layers(model, LowRankOptions("svd", rank=fraction), warn=False)
    assert plan.rank == expected


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_weights_keep_their_dtype_and_are_projected(conv_model, dtype, tolerance):
    model = conv_model(out_channels=16, in_channels=8, dtype=dtype)
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


def test_randomized_driver_through_project_(conv_model, low_rank_matrix):
    model = conv_model(out_channels=20, in_channels=8)
    with torch.no_grad():
        model.body.weight.copy_(low_rank_matrix(20, 72, 3, seed=30).reshape(20, 8, 3, 3))
    before = model.body.weight.detach().clone()
    (stats,) = project_(model, "svd", rank=3, solver=Solver(driver="randomized"))
    torch.testing.assert_close(model.body.weight.detach(), before, atol=1e-4, rtol=1e-4)
    assert stats.rel_error < 1e-5
