"""Fixtures of the scheme tests: seeded random weights and a two-conv model whose second conv is under test."""
import pytest
import torch
from torch import nn


def draw_weights(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def build_conv_model(out_channels=10, in_channels=6, dtype=torch.float32, **conv_args):
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, in_channels, 3, padding=1))
    model.add_module("body", nn.Conv2d(in_channels, out_channels, **{"kernel_size": 3, "padding": 1, **conv_args}))
    return model.to(dtype)


@pytest.fixture
def random_weights():
    """``random_weights(*shape, seed=0)``: standard normal values from a generator seeded with ``seed``."""
    return draw_weights


@pytest.fixture
def conv_model():
    """``conv_model(out_channels=10, in_channels=6, dtype=float32, **conv_args)``: a stem conv (skipped as the
    first conv) then the conv under test, ``body`` (3×3, padding 1 unless ``conv_args`` say otherwise)."""
    return build_conv_model


@pytest.fixture
def low_rank_matrix():
    """``low_rank_matrix(rows, cols, rank, seed)``: a product of two seeded random factors of that inner size."""
    return lambda rows, cols, rank, seed: draw_weights(rows, rank, seed=seed) @ draw_weights(rank, cols, seed=seed + 1)
