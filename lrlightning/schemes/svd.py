"""``svd``: the im2col-lowered matrix T × (S·kh·kw) (paper §4.1); Linear weights as they are."""
from __future__ import annotations

import torch
from torch import nn

from ..layers import LowRankConv2d, LowRankLinear, geometry, new_conv
from .base import MatrixScheme


class LoweredSVD(MatrixScheme):
    """``svd``: exports a conv as a kh×kw conv S→r (original stride, padding, dilation, padding mode) then a 1×1
    conv r→T with the bias, and a Linear as Linear in→r then Linear r→out with the bias."""

    name = "svd"
    layer_types = (LowRankConv2d, LowRankLinear)
    weighted = True

    def matrix_metrics(self, weighting, shape):
        """Exact: the output scales on the rows (T), the im2col moments on the columns (S·kh·kw)."""
        return weighting.output_metric(), weighting.inputs

    def to_matrix(self, weights):
        return weights.reshape(weights.shape[0], weights.shape[1], -1)

    def from_matrix(self, matrices, shape):
        return matrices.reshape(-1, *shape)

    def factorized_layer(self, layer, rank):
        rank = int(rank if isinstance(rank, int) else min(rank))
        weight = layer.weight.detach()
        left, right = self.matrix_factors(weight, rank)
        if isinstance(layer, nn.Linear):
            module = LowRankLinear(layer.in_features, layer.out_features, rank, layer.bias is not None)
            module = module.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                module[0].weight.copy_(right)
                module[1].weight.copy_(left)
                if layer.bias is not None:
                    module[1].bias.copy_(layer.bias)
            return module
        t, s, kh, kw = weight.shape
        first = self.from_matrix(right.unsqueeze(0), (rank, s, kh, kw))[0]
        second = self.from_matrix(left.unsqueeze(0), (t, rank, 1, 1))[0]
        return LowRankConv2d(self.name, rank, [new_conv(first.to(weight.dtype), **geometry(layer)),
                                               new_conv(second.to(weight.dtype), layer.bias)])
