"""``spatial_svd``: the (S·kh) × (T·kw) matrix of Jaderberg et al. (beyond the paper)."""
from __future__ import annotations

from torch import nn

from .base import MatrixScheme
from .weighting import kernel_trace


def split_geometry(conv: nn.Conv2d) -> tuple[dict, dict]:
    """Stride/padding/dilation of a kh×kw conv split into its kh×1 and 1×kw parts (exact for every padding mode)."""
    pad = conv.padding
    vertical_pad = pad if isinstance(pad, str) else (pad[0], 0)
    horizontal_pad = pad if isinstance(pad, str) else (0, pad[1])
    vertical = dict(stride=(conv.stride[0], 1), padding=vertical_pad, dilation=(conv.dilation[0], 1),
                    padding_mode=conv.padding_mode)
    horizontal = dict(stride=(1, conv.stride[1]), padding=horizontal_pad, dilation=(1, conv.dilation[1]),
                      padding_mode=conv.padding_mode)
    return vertical, horizontal


class SpatialSVD(MatrixScheme):
    """``spatial_svd``: exports as a kh×1 conv S→r then a 1×kw conv r→T with the bias."""

    name = "spatial_svd"
    weighted = True
    groupable = True

    def matrix_metrics(self, weighting, shape):
        """Rows (s, i): the im2col moments summed over the kernel's columns j (an approximation, exact when the
        moment is the same at every column j and zero across columns); columns (t, j): the output scales, repeated
        over j."""
        t, s, kh, kw = shape
        return kernel_trace(weighting.inputs, s, keep=kh), weighting.output_metric(repeat=kw)

    def to_matrix(self, weights):
        b, t, s, kh, kw = weights.shape
        return weights.permute(0, 2, 3, 1, 4).reshape(b, s * kh, t * kw)

    def from_matrix(self, matrices, shape):
        t, s, kh, kw = shape
        return matrices.reshape(-1, s, kh, t, kw).permute(0, 3, 1, 2, 4)

    def factorized_layer(self, layer, rank):
        return self.chain_layer(layer, rank)

    def stages(self, layer, kernels, rank):
        """A kh×1 conv S→r then a 1×kw conv r→T (``split_geometry``)."""
        count, t, s, kh, kw = kernels.shape
        left, right = self.batch_factors(kernels, rank)
        vertical = left.reshape(count, s, kh, -1).permute(0, 3, 1, 2).unsqueeze(-1)
        horizontal = right.reshape(count, -1, t, kw).permute(0, 2, 1, 3).unsqueeze(3)
        vertical_args, horizontal_args = split_geometry(layer)
        return [(vertical, vertical_args), (horizontal, horizontal_args)]
