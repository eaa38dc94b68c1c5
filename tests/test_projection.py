"""In-place projection: layers of one shape share one batched decomposition, with the same result as projecting each
alone, and ``svd_driver="auto"`` takes the driver measured fastest on the weights' device."""
import copy

import pytest
import torch
from torch import nn

from lrlightning import LowRankOptions, factorize, plan_layers, project_
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


def batchnorm_convs():
    """Stem, then two 3×3 convs each feeding a BatchNorm, on 3×10×10 inputs with correlated channels."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12),
                         nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def calibration_batches(count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(3, 3, generator=g)
    return [torch.einsum("nchw,dc->ndhw", torch.randn(16, 3, 10, 10, generator=g), mixing) for _ in range(count)]


@pytest.mark.parametrize("scheme", sorted(RANKS))
def test_the_activation_objective_keeps_the_outputs_better_on_the_calibration_data(scheme):
    options, _ = RANKS[scheme]
    rank = (3, 4) if scheme == "tucker2" else 3
    errors = {}
    for objective in ("weight", "activation"):
        model = batchnorm_convs()
        stats = project_(model, scheme, rank, objective=objective, calibration=calibration_batches(), **options)
        errors[objective] = [s.output_rel_error for s in stats]
    assert all(a < w for a, w in zip(errors["activation"], errors["weight"]))


def test_project_without_calibration_under_the_activation_objective_names_it():
    with pytest.raises(ValueError, match=r"`objective`='activation' needs `calibration`: an iterable of input "
                                         r"batches .*got None"):
        project_(batchnorm_convs(), "svd", 3, objective="activation")
    assert all(s.output_rel_error is None for s in project_(batchnorm_convs(), "svd", 3))


def test_a_layer_without_statistics_is_named_before_anything_is_written():
    model = batchnorm_convs()
    options = LowRankOptions("svd", rank=3, objective="activation")
    plans, _ = plan_layers(model, options)
    before = copy.deepcopy(model.state_dict())
    from lrlightning.activations import input_statistics

    partial = input_statistics(model[:4], ["2"], calibration_batches(1))
    with pytest.raises(ValueError, match=r"input statistics of layer '5'"):
        project_planned_(model, plans, options, partial)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("bn_weighting", [False, True])
def test_factorize_with_the_activation_objective_is_the_exact_export_of_its_projection(bn_weighting):
    model = batchnorm_convs().eval()
    before = copy.deepcopy(model.state_dict())
    options = dict(objective="activation", bn_weighting=bn_weighting)
    small = factorize(model, "tucker2", (3, 4), calibration=calibration_batches(), **options).eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched
    projected = copy.deepcopy(model)
    project_(projected, "tucker2", (3, 4), calibration=calibration_batches(), **options)
    x = calibration_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), projected(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(projected(x), factorize(model, "tucker2", (3, 4)).eval()(x), atol=1e-3)
