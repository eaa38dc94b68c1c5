"""A scheme applied group by group to a grouped conv (ResNeXt, RegNet; depthwise convs with ``spatial_svd``).

A grouped conv with g groups has the kernel (T, S/g, *kernel): group j maps input channels j·S/g … (j+1)·S/g − 1 to
output channels j·T/g … (j+1)·T/g − 1 with its own dense kernel (T/g, S/g, *kernel). Each group is projected at the
same rank by the inner scheme, so the layer's rank set is the product of the groups' sets and the projection onto
it is the groups' projections side by side (exact, batched in one call). The factorized layer is the inner
scheme's chain of convs with each stage grouped (``Scheme.chain_layer``).
Pure torch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import MatrixScheme, Rank, Scheme
from .weighting import Weighting, output_energies


class GroupedScheme(Scheme):
    """``inner`` on each of ``groups`` groups (``groups`` >= 2); shapes are the layer's (T, S/g, *kernel), ranks
    the rank of every group, parameters those of all groups."""

    def __init__(self, inner: Scheme, groups: int):
        if not (isinstance(groups, int) and groups >= 2):
            raise ValueError(f"`groups` of GroupedScheme must be an int >= 2, got {groups!r}")
        if not inner.groupable:
            raise ValueError(f"scheme {inner.name!r} does not factorize grouped convs (groups={groups})")
        self.inner, self.groups = inner, groups
        self.name, self.pair_rank, self.weighted = inner.name, inner.pair_rank, inner.weighted
        self.input_statistic, self.layer_types = inner.input_statistic, inner.layer_types
        self.kernel_dims, self.groupable = inner.kernel_dims, True

    def options(self):
        return self.inner.options()

    def __eq__(self, other):
        return type(other) is type(self) and (other.inner, other.groups) == (self.inner, self.groups)

    def __hash__(self):
        return hash((type(self), self.inner, self.groups))

    def __repr__(self):
        return f"GroupedScheme({self.inner!r}, groups={self.groups})"

    def group_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """One group's kernel shape (T/g, S/g, *kernel) of a layer kernel of ``shape``."""
        if shape[0] % self.groups:
            raise ValueError(f"a kernel of shape {shape} has {shape[0]} output channels, not divisible by "
                             f"groups={self.groups}")
        return (shape[0] // self.groups, *shape[1:])

    def split(self, weights: Tensor) -> Tensor:
        """(B, T, S/g, *kernel) → (B·g, T/g, S/g, *kernel): each layer's groups in order."""
        return weights.reshape(weights.shape[0] * self.groups, -1, *weights.shape[2:])

    def full_rank(self, shape):
        return self.inner.full_rank(self.group_shape(shape))

    def factorized_params(self, shape, rank):
        return self.groups * self.inner.factorized_params(self.group_shape(shape), rank)

    def rank_candidates(self, shape):
        return self.inner.rank_candidates(self.group_shape(shape))

    def rank_from_fraction(self, shape, fraction):
        return self.inner.rank_from_fraction(self.group_shape(shape), fraction)

    def clamp(self, shape, rank):
        return self.inner.clamp(self.group_shape(shape), rank)

    def per_group(self, ranks: Sequence[Rank]) -> list[Rank]:
        return [rank for rank in ranks for _ in range(self.groups)]

    def project(self, weights, ranks, driver="exact"):
        return self.inner.project(self.split(weights), self.per_group(ranks), driver).reshape(weights.shape)

    def group_weighting(self, weighting: Weighting) -> Weighting:
        """The weighting of each group: ``inputs`` (B, g, n, n) per-group moments → (B·g, n, n), ``outputs`` (B, T)
        → (B·g, T/g)."""
        inputs = weighting.inputs.reshape(-1, *weighting.inputs.shape[-2:])
        outputs = weighting.outputs
        if outputs is not None:
            outputs = outputs.reshape(outputs.shape[0] * self.groups, -1)
        return Weighting(inputs, outputs, weighting.ridge)

    def project_weighted(self, weights, ranks, driver, weighting):
        approx = self.inner.project_weighted(self.split(weights), self.per_group(ranks), driver,
                                             self.group_weighting(weighting))
        return approx.reshape(weights.shape)

    def output_error(self, weights, approx, weighting):
        """Each layer's relative output error over all its groups (B,), float64."""
        error, total = output_energies(self.split(weights), self.split(approx), self.group_weighting(weighting))
        error, total = error.reshape(-1, self.groups).sum(1), total.reshape(-1, self.groups).sum(1)
        return (error / total.clamp_min(torch.finfo(torch.float64).tiny)).sqrt()

    def energy_rank(self, weight, energy):
        """The largest of the groups' ranks: every group keeps at least ``energy`` of its own."""
        ranks = [self.inner.energy_rank(group, energy) for group in self.split(weight.unsqueeze(0))]
        if self.pair_rank:
            return tuple(max(rank[i] for rank in ranks) for i in range(2))
        return max(ranks)

    def rank_errors(self, weight, ranks, driver="exact"):
        """The groups' errors at each rank, weighted by their squared norms: ||W − W_r||² / ||W||² of the layer."""
        groups = self.split(weight.unsqueeze(0))
        if isinstance(self.inner, MatrixScheme):  # Eckart–Young on every group at once: one batched svdvals
            energy = torch.linalg.svdvals(self.inner.to_matrix(groups).double()).pow(2)  # (g, k)
            kept = torch.nn.functional.pad(energy.cumsum(1), (1, 0)).sum(0)
            total = float(kept[-1])
            return [max(0.0, 1.0 - float(kept[min(int(r), energy.shape[1])]) / total) if total > 0 else 0.0
                    for r in ranks]
        norms = groups.flatten(1).pow(2).sum(1).double()
        total = float(norms.sum())
        if total == 0:
            return [0.0] * len(ranks)
        errors = [0.0] * len(ranks)
        for group, norm in zip(groups, norms.tolist()):
            for index, error in enumerate(self.inner.rank_errors(group, ranks, driver)):
                errors[index] += error * norm / total
        return errors

    def factorized_layer(self, layer: nn.Module, rank):
        if layer.groups != self.groups:
            raise ValueError(f"layer has groups={layer.groups}, the scheme groups={self.groups}")
        return self.inner.chain_layer(layer, rank, self.groups)

    def layer_from_spec(self, spec):
        return self.inner.layer_from_spec(spec)
