"""``svd``: the im2col-lowered matrix T × (S·kh·kw) (paper §4.1; T × (S·k) for Conv1d, T × (S·kd·kh·kw) for
Conv3d, T × S for a pointwise conv); Linear weights as they are."""
from __future__ import annotations

import torch
from torch import nn

from ..layers import LowRankConv2d, LowRankLinear, geometry
from .base import MatrixScheme


class LoweredSVD(MatrixScheme):
    """``svd``: exports a conv as a conv S→r with its kernel (original stride, padding, dilation, padding mode) then
    a pointwise conv r→T with the bias, and a Linear as Linear in→r then Linear r→out with the bias."""

    name = "svd"
    layer_types = (LowRankConv2d, LowRankLinear)
    weighted = True
    kernel_dims = (1, 2, 3)
    groupable = True

    def matrix_metrics(self, weighting, shape):
        """Exact: the output scales on the rows (T), the im2col moments on the columns (S·kh·kw)."""
        return weighting.output_metric(), weighting.inputs

    def to_matrix(self, weights):
        return weights.reshape(weights.shape[0], weights.shape[1], -1)

    def from_matrix(self, matrices, shape):
        return matrices.reshape(-1, *shape)

    def factorized_layer(self, layer, rank):
        rank = int(rank if isinstance(rank, int) else min(rank))
        if isinstance(layer, nn.Linear):
            weight = layer.weight.detach()
            left, right = self.matrix_factors(weight, rank)
            module = LowRankLinear(layer.in_features, layer.out_features, rank, layer.bias is not None)
            module = module.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                module[0].weight.copy_(right)
                module[1].weight.copy_(left)
                if layer.bias is not None:
                    module[1].bias.copy_(layer.bias)
            return module
        return self.chain_layer(layer, rank)

    def stages(self, layer, kernels, rank):
        """A conv S→r with the kernel and geometry of ``layer``, then a pointwise conv r→T."""
        rank = int(rank if isinstance(rank, int) else min(rank))
        count, t, s, *kernel = kernels.shape
        left, right = self.batch_factors(kernels, rank)
        first = right.reshape(count, -1, s, *kernel)
        second = left.reshape(count, t, -1, *[1] * len(kernel))
        return [(first, geometry(layer)), (second, {})]
