"""Truncated SVD drivers, the Eckart–Young truncation and the energy rule on plain batches of matrices."""
import pytest
import torch

from lrlightning.schemes.linalg import low_rank_matrices, smallest_rank_for_energy, split_sqrt, truncated_svd


@pytest.mark.parametrize("driver", ["exact", "randomized", "gram"])
@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (16, 16)])
def test_low_rank_matrices_error_is_the_singular_value_tail(random_weights, shape, driver):
    matrices = random_weights(2, *shape, seed=60)
    approx = low_rank_matrices(matrices, [5, 3], driver)
    singular = torch.linalg.svdvals(matrices.double())
    tails = torch.stack([singular[0, 5:].pow(2).sum(), singular[1, 3:].pow(2).sum()])
    errors = (matrices - approx).double().flatten(1).pow(2).sum(1)
    if driver == "randomized":
        # Eckart–Young bounds it from below; with q = rank + 8 samples and 2 power iterations on matrices this
        # small it must also come within 1% of the optimum (returning zeros would give the whole energy) ...
        assert bool((errors >= tails * (1 - 1e-4)).all())
        assert bool((errors <= tails * 1.01 + 1e-6).all()), (errors, tails)
        assert bool((errors < 0.9 * matrices.double().flatten(1).pow(2).sum(1)).all())
        # ... at a rank no larger than asked, and nonzero.
        assert torch.linalg.matrix_rank(approx.double(), rtol=1e-5).tolist() == [5, 3]
    else:
        torch.testing.assert_close(errors, tails, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rank", [2, 4, 5])
def test_randomized_driver_is_exact_on_low_rank_input(low_rank_matrix, rank):
    matrices = torch.stack([low_rank_matrix(20, 72, 4, seed) for seed in (10, 20)])
    exact = low_rank_matrices(matrices, [rank, rank], "exact")
    randomized = low_rank_matrices(matrices, [rank, rank], "randomized")
    torch.testing.assert_close(randomized, exact, atol=1e-4, rtol=1e-4)
    if rank >= 4:
        torch.testing.assert_close(randomized, matrices, atol=1e-4, rtol=1e-4)


def test_truncated_svd_randomized_returns_the_requested_shapes(random_weights):
    matrices = random_weights(3, 30, 12, seed=40)
    u, s, vh = truncated_svd(matrices, 5, "randomized")
    assert u.shape == (3, 30, 5) and s.shape == (3, 5) and vh.shape == (3, 5, 12)
    exact = torch.linalg.svdvals(matrices)[:, :5]
    assert bool((s <= exact * (1 + 1e-4)).all())


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
def test_truncated_svd_gram_gives_orthonormal_triplets(random_weights, shape):
    matrices = random_weights(2, *shape, seed=70)
    u, s, vh = truncated_svd(matrices, 6, "gram")
    assert u.shape == (2, shape[0], 6) and s.shape == (2, 6) and vh.shape == (2, 6, shape[1])
    eye = torch.eye(6).expand(2, 6, 6)
    torch.testing.assert_close(u.mT @ u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(vh @ vh.mT, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(s, torch.linalg.svdvals(matrices)[:, :6], atol=1e-4, rtol=1e-5)
    _, _, vh_exact = truncated_svd(matrices, 6, "exact")
    torch.testing.assert_close((vh @ vh_exact.mT).abs(), eye, atol=1e-4, rtol=0)


def test_gram_driver_on_a_rank_deficient_matrix_is_finite_and_exact(low_rank_matrix):
    matrices = torch.stack([low_rank_matrix(20, 72, 3, seed=80), torch.zeros(20, 72)])
    u, s, vh = truncated_svd(matrices, 5, "gram")
    assert bool(torch.isfinite(u).all() and torch.isfinite(vh).all())
    torch.testing.assert_close((u * s.unsqueeze(-2)) @ vh, matrices, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(low_rank_matrices(matrices, [5, 5], "gram"), matrices, atol=1e-4, rtol=1e-4)


def test_split_sqrt_factors_multiply_back_with_equal_norms(random_weights):
    u, s, vh = truncated_svd(random_weights(1, 9, 14, seed=75), 4)
    left, right = split_sqrt(u, s, vh)
    torch.testing.assert_close(left @ right, (u * s.unsqueeze(-2)) @ vh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left.norm(dim=-2), right.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_smallest_rank_for_energy_edge_cases():
    singular = torch.tensor([3.0, 2.0, 1.0, 0.5])
    assert smallest_rank_for_energy(singular, 1.0) == 4
    assert smallest_rank_for_energy(singular, 9 / 14.25) == 1
    assert smallest_rank_for_energy(singular, 9 / 14.25 + 1e-6) == 2
    assert smallest_rank_for_energy(torch.zeros(5), 0.9) == 1
