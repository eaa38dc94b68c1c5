"""``objective="activation"`` per scheme: the whitened truncation is optimal in the output error it weights, lies in
the scheme's rank set, reduces to the weight objective under an isotropic metric, and exports exactly."""
import pytest
import torch
from torch import nn

from lrlightning.schemes import SCHEMES, Weighting, output_error
from lrlightning.schemes.weighting import kernel_trace, weighted_low_rank, whitening

T, S, K = 12, 6, 3
N = S * K * K
RANKS = {"svd": [2, 5], "spatial_svd": [2, 5], "tucker2": [(2, 3), (4, 5)], "tiled_svd": [2, 3]}
TILES = (6, 18)  # column tiles hold whole input channels (2 channels × 9 kernel positions)


def scheme(name):
    return SCHEMES[name](TILES) if name == "tiled_svd" else SCHEMES[name]()


def correlated_moment(n, seed=0, batch=2):
    """(batch, n, n) second moments of strongly anisotropic samples (singular values spread over 3 decades)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(0, -3, n, dtype=torch.float64)
    return (basis * spectrum) @ basis.mT


def structured_moment(name, seed=0):
    """A moment for which the scheme's reduction is exact: independent kernel positions (tucker2), independent
    kernel columns (spatial_svd), independent column tiles (tiled_svd); any moment for svd."""
    if name == "svd":
        return correlated_moment(N, seed)
    if name == "tucker2":
        return torch.kron(correlated_moment(S, seed), torch.eye(K * K, dtype=torch.float64))
    if name == "spatial_svd":
        return torch.kron(correlated_moment(S * K, seed), torch.eye(K, dtype=torch.float64))
    blocks = correlated_moment(TILES[1], seed, batch=2 * (N // TILES[1])).reshape(2, -1, TILES[1], TILES[1])
    return torch.stack([torch.block_diag(*b) for b in blocks])


@pytest.mark.parametrize("name", RANKS)
@pytest.mark.parametrize("scales", [False, True])
def test_weighted_projection_stays_in_the_rank_set_and_lowers_the_output_error(random_weights, name, scales):
    weights = random_weights(2, T, S, K, K)
    outputs = torch.rand(2, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 0.05 \
        if scales else None
    weighting = Weighting(structured_moment(name), outputs, ridge=1e-9)
    chosen = scheme(name)
    weighted = chosen.project_weighted(weights, RANKS[name], "exact", weighting)
    plain = chosen.project(weights, RANKS[name], "exact")
    again = chosen.project(weighted, RANKS[name], "exact")  # the rank set's projection leaves its members alone
    torch.testing.assert_close(again, weighted, rtol=1e-4, atol=1e-5)
    assert (output_error(weights, weighted, weighting) < output_error(weights, plain, weighting)).all()


def test_svd_weighted_error_is_the_tail_of_the_whitened_spectrum(random_weights):
    """Eckart–Young after whitening: E‖D(W − W_r)x‖² equals the discarded squared singular values of D·W·L."""
    weights = random_weights(2, T, S, K, K, seed=1)
    moment = correlated_moment(N, seed=4)
    scales = torch.rand(2, T, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.1
    weighting = Weighting(moment, scales, ridge=1e-12)
    ranks = [3, 7]
    approx = scheme("svd").project_weighted(weights, ranks, "exact", weighting)
    w = weights.double().reshape(2, T, -1)
    whitened = scales.unsqueeze(-1) * w @ torch.linalg.cholesky(moment)
    singular = torch.linalg.svdvals(whitened)
    tails = torch.stack([singular[b, r:].pow(2).sum() for b, r in enumerate(ranks)])
    total = singular.pow(2).sum(-1)
    torch.testing.assert_close(output_error(weights, approx, weighting).pow(2), tails / total, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", RANKS)
def test_an_isotropic_metric_gives_the_weight_objective(random_weights, name):
    weights = random_weights(2, T, S, K, K, seed=2)
    isotropic = Weighting(3.0 * torch.eye(N, dtype=torch.float64).expand(2, N, N), None)
    chosen = scheme(name)
    torch.testing.assert_close(chosen.project_weighted(weights, RANKS[name], "exact", isotropic),
                               chosen.project(weights, RANKS[name], "exact"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", RANKS)
def test_singular_and_zero_metrics_give_finite_projections(random_weights, name):
    """The ridge makes a metric the inputs never span (zero rows, a rank-1 moment, all zeros) invertible."""
    weights = random_weights(2, T, S, K, K, seed=3)
    v = torch.randn(2, N, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for moment in (v @ v.mT, torch.zeros(2, N, N, dtype=torch.float64)):
        approx = scheme(name).project_weighted(weights, RANKS[name], "exact",
                                               Weighting(moment, torch.zeros(2, T, dtype=torch.float64)))
        assert torch.isfinite(approx).all()


@pytest.mark.parametrize("driver", ["exact", "gram", "randomized"])
def test_weighted_truncation_is_the_same_with_every_driver(driver):
    g = torch.Generator().manual_seed(7)
    matrices = torch.randn(3, 9, 14, generator=g)
    columns, rows = correlated_moment(14, 8, batch=3), correlated_moment(9, 9, batch=3)
    reference = weighted_low_rank(matrices, [1, 4, 9], "exact", rows, columns, 1e-2)
    torch.testing.assert_close(weighted_low_rank(matrices, [1, 4, 9], driver, rows, columns, 1e-2), reference,
                               rtol=1e-4, atol=1e-4)


def test_whitening_factors_the_ridged_metric():
    metric = correlated_moment(7, seed=10)
    factor = whitening(metric, 0.5)
    mean = metric.diagonal(dim1=-2, dim2=-1).mean(-1)
    expected = metric + 0.5 * mean[:, None, None] * torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(factor @ factor.mT, expected)
    assert torch.equal(factor, factor.tril())


def test_kernel_trace_sums_the_kernel_positions():
    moment = correlated_moment(N, seed=11, batch=1)
    grid = moment.reshape(S, K, K, S, K, K)
    channels = torch.einsum("aijbij->ab", grid)
    rows = torch.einsum("aijbkj->aibk", grid).reshape(S * K, S * K)
    torch.testing.assert_close(kernel_trace(moment, S)[0], channels)
    torch.testing.assert_close(kernel_trace(moment, S, keep=K)[0], rows)


def test_output_error_is_the_error_on_the_samples_of_the_moment(random_weights):
    weights = random_weights(1, T, S, K, K, seed=4)
    approx = weights + 0.1 * random_weights(1, T, S, K, K, seed=5)
    samples = torch.randn(500, N, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    scales = torch.rand(1, T, dtype=torch.float64) + 0.5
    weighting = Weighting((samples.T @ samples / 500).unsqueeze(0), scales)
    w, a = weights.double().reshape(T, -1), approx.double().reshape(T, -1)
    direct = ((scales[0, :, None] * ((w - a) @ samples.T)).pow(2).sum()
              / (scales[0, :, None] * (w @ samples.T)).pow(2).sum()).sqrt()
    torch.testing.assert_close(output_error(weights, approx, weighting)[0], direct)


@pytest.mark.parametrize("name", RANKS)
def test_a_weighted_projection_exports_exactly(random_weights, name):
    torch.manual_seed(0)
    conv = nn.Conv2d(S, T, K, padding=1)
    chosen = scheme(name)
    rank = RANKS[name][1]
    weighting = Weighting(structured_moment(name)[:1], torch.rand(1, T, dtype=torch.float64) + 0.2)
    with torch.no_grad():
        conv.weight.copy_(chosen.project_weighted(conv.weight.detach().unsqueeze(0), [rank], "exact", weighting)[0])
    x = torch.randn(4, S, 9, 9)
    torch.testing.assert_close(chosen.factorized_layer(conv, rank)(x), conv(x), rtol=1e-4, atol=1e-5)


def test_channel_moments_weight_tucker2_as_their_im2col_equivalent(random_weights):
    """Channel moments C stand for the im2col moment C ⊗ I: the same projection and the same output error."""
    weights = random_weights(2, T, S, K, K, seed=6)
    channels = correlated_moment(S, seed=13)
    scales = torch.rand(2, T, dtype=torch.float64) + 0.3
    by_channels = Weighting(channels, scales)
    by_im2col = Weighting(torch.kron(channels, torch.eye(K * K, dtype=torch.float64)), scales)
    tucker2 = scheme("tucker2")
    approx = tucker2.project_weighted(weights, RANKS["tucker2"], "exact", by_channels)
    torch.testing.assert_close(approx, tucker2.project_weighted(weights, RANKS["tucker2"], "exact", by_im2col),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(output_error(weights, approx, by_channels), output_error(weights, approx, by_im2col))
