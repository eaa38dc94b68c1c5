"""In-place projection: layers of one shape share one batched decomposition, with the same result as projecting each
alone, and ``svd_driver="auto"`` takes the driver measured fastest on the weights' device."""
import copy

import pytest
import torch
from torch import nn

from lrlightning import LowRankOptions, plan_layers, project_
from lrlightning.projection import host_lists, project_planned_
from lrlightning.schemes import resolve_driver

RANKS = {
    "svd": (dict(), [2, 5, 3, 8]),
    "spatial_svd": (dict(), [2, 5, 3, 7]),
    "tucker2": (dict(), [(2, 3), (5, 4), (3, 3), (6, 8)]),
    "tiled_svd": (dict(tile_shape=(4, 24)), [1, 3, 2, 4]),
}


def same_shape_convs():
    """A stem, then four 12→12 3×3 convs and one 12→16 conv: one group of four and a group of one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3), *[nn.Conv2d(12, 12, 3) for _ in range(4)], nn.Conv2d(12, 16, 3))


@pytest.mark.parametrize("scheme", sorted(RANKS))
@pytest.mark.parametrize("driver", ["exact", "gram"])
def test_one_batched_call_per_shape_equals_projecting_each_layer_alone(scheme, driver):
    extra, ranks = RANKS[scheme]
    rank = {str(index + 1): r for index, r in enumerate(ranks)} | {"5": ranks[0]}
    options = LowRankOptions(scheme, rank, svd_driver=driver, **extra)
    model = same_shape_convs()
    plans = plan_layers(model, options)[0]
    alone = copy.deepcopy(model)
    for plan in plans:
        project_planned_(alone, [plan], options)
    project_planned_(model, plans, options)
    for plan in plans:
        grouped, single = model.get_submodule(plan.name).weight, alone.get_submodule(plan.name).weight
        assert (grouped - single).norm() <= 1e-5 * single.norm(), plan.name


@pytest.mark.parametrize("device, driver", [("cpu", "gram"), ("cuda", "exact"), ("mps", "exact")])
def test_auto_driver_is_the_one_measured_fastest_on_the_device(device, driver):
    assert resolve_driver("auto", torch.device(device)) == driver
    assert resolve_driver("randomized", torch.device(device)) == "randomized"


def test_auto_is_the_default_and_projects_as_gram_on_the_cpu():
    assert LowRankOptions("tucker2", 0.5).svd_driver == "auto"
    auto, gram = same_shape_convs(), same_shape_convs()
    project_(auto, "tucker2", 0.5)
    project_(gram, "tucker2", 0.5, svd_driver="gram")
    for a, g in zip(auto.parameters(), gram.parameters()):
        assert torch.equal(a, g)


def test_host_lists_split_one_transfer_back_into_each_tensor():
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([True, False]), torch.tensor([]), torch.tensor([3.5])]
    assert host_lists(tensors) == [[1.0, 2.0], [1.0, 0.0], [], [3.5]]
    assert host_lists([torch.tensor([True, False])]) == [[True, False]]
