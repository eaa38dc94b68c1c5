"""``spatial_svd``: Eckart–Young on the (S·kh) × (T·kw) matrix and the kh×1, 1×kw export."""
import torch

from lrlightning.layers import LowRankConv2d
from lrlightning.schemes import SpatialSVD


def spatial_matrix(weights):
    b, t, s, kh, kw = weights.shape
    return weights.permute(0, 2, 3, 1, 4).reshape(b, s * kh, t * kw)


def test_spatial_svd_projection_reaches_the_rank_of_the_spatial_matrix(random_weights):
    weights = random_weights(2, 10, 6, 3, 3, seed=3)
    approx = SpatialSVD().project(weights, [2, 5])
    assert torch.linalg.matrix_rank(spatial_matrix(approx)).tolist() == [2, 5]
    assert torch.linalg.matrix_rank(approx.reshape(2, 10, -1)).tolist() == [min(10, 2 * 3), min(10, 5 * 3)]


def test_spatial_svd_error_is_the_tail_of_the_spatial_singular_values(random_weights):
    weights = random_weights(2, 8, 5, 3, 5, seed=4)
    approx = SpatialSVD().project(weights, [3, 6])
    singular = torch.linalg.svdvals(spatial_matrix(weights).double())
    tails = torch.stack([singular[0, 3:].pow(2).sum(), singular[1, 6:].pow(2).sum()])
    torch.testing.assert_close((weights - approx).double().flatten(1).pow(2).sum(1), tails, rtol=1e-4, atol=1e-6)
    assert SpatialSVD().matrix_shape((8, 5, 3, 5)) == (15, 40)


def test_spatial_svd_exports_a_vertical_then_a_horizontal_conv(conv_model):
    model = conv_model(out_channels=12, in_channels=8, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2))
    module = SpatialSVD().factorized_layer(model.body, 4)
    assert isinstance(module, LowRankConv2d) and module.scheme == "spatial_svd"
    vertical, horizontal = module
    assert vertical.weight.shape == (4, 8, 3, 1) and vertical.stride == (2, 1) and vertical.padding == (1, 0)
    assert horizontal.weight.shape == (12, 4, 1, 5) and horizontal.padding == (0, 2)
    assert torch.equal(horizontal.bias, model.body.bias) and vertical.bias is None
