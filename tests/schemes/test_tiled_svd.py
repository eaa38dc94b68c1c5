"""``tiled_svd``: one truncated SVD per tile, ragged edges included, its energy rule and its two exports."""
import pytest
import torch
from torch import nn

from lrlightning import Energy, LowRankOptions, plan_layers
from lrlightning.layers import LowRankConv2d
from lrlightning.schemes import TiledSVD
from lrlightning.schemes.tiled_svd import TiledSVDConv2d

ROWS, COLS = 4, 8


def tiles_of(matrix):
    """Every (rows × cols) tile of a matrix, ragged edge tiles at their own size."""
    return [matrix[top : top + ROWS, left : left + COLS]
            for top in range(0, matrix.shape[0], ROWS) for left in range(0, matrix.shape[1], COLS)]


def test_tiled_svd_projection_reaches_the_rank_in_every_tile_including_ragged_edges(random_weights):
    weights = random_weights(1, 10, 4, 3, 3, seed=4)
    rank = 3
    approx = TiledSVD((ROWS, COLS)).project(weights, [rank])[0].reshape(10, 36)
    tiles = tiles_of(approx)
    assert len(tiles) == 3 * 5
    assert [torch.linalg.matrix_rank(tile).item() for tile in tiles] == [min(rank, *tile.shape) for tile in tiles]


def test_tiled_svd_error_is_the_sum_of_the_tail_energies_of_the_tiles(random_weights):
    weights = random_weights(1, 10, 4, 3, 3, seed=5)
    approx = TiledSVD((ROWS, COLS)).project(weights, [2])
    tail = sum(torch.linalg.svdvals(tile.double())[2:].pow(2).sum() for tile in tiles_of(weights[0].reshape(10, 36)))
    error = (weights - approx).double().pow(2).sum()
    torch.testing.assert_close(error, tail, rtol=1e-4, atol=1e-6)


def test_energy_rule_for_tiled_svd_takes_the_largest_tile_rank(conv_model):
    model = conv_model(out_channels=16, in_channels=8)
    tiles = TiledSVD((8, 24)).tiles(model.body.weight.detach().unsqueeze(0)).flatten(0, 2)
    power = torch.linalg.svdvals(tiles).double().pow(2)
    kept = power.cumsum(1) / power.sum(1, keepdim=True)
    expected = int((kept < 0.6 - 1e-12).sum(1).max().item()) + 1
    (plan,), _ = plan_layers(model, LowRankOptions(TiledSVD(tile_shape=(8, 24)), rank=Energy(0.6)), warn=False)
    assert plan.rank == expected


@pytest.mark.parametrize("tile_shape, exported", [((8, 18), LowRankConv2d), ((5, 7), TiledSVDConv2d)])
def test_tiles_holding_whole_channels_export_grouped_convs_and_others_the_im2col_module(conv_model, tile_shape,
                                                                                       exported):
    model = conv_model(out_channels=16, in_channels=8)
    module = TiledSVD(tile_shape).factorized_layer(model.body, 2)
    assert type(module) is exported
    if exported is LowRankConv2d:
        assert [type(m) for m in module] == [nn.Conv2d, nn.ChannelShuffle, nn.Conv2d]
        assert module[0].groups == 72 // 18 and module[2].groups == 16 // 8
    else:
        assert module.spec()["tile_shape"] == list(tile_shape) and module.spec()["scheme"] == "tiled_svd"
