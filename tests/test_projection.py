"""In-place projection: layers of one shape share one batched decomposition, with the same result as projecting each
alone, and ``Solver(driver="auto")`` takes the driver measured fastest on the weights' device."""
import copy

import pytest
import torch
from torch import nn

from lrlightning import Activation, Budget, LowRankOptions, Solver, TiledSVD, factorize, plan_layers, project_
from lrlightning.projection import gather_statistics, project_planned_
from lrlightning.transfer import host_lists, moved
from lrlightning.schemes import resolve_driver

RANKS = {  # the scheme (a name or a configured scheme) and four layer ranks
    "svd": ("svd", [2, 5, 3, 8]),
    "spatial_svd": ("spatial_svd", [2, 5, 3, 7]),
    "tucker2": ("tucker2", [(2, 3), (5, 4), (3, 3), (6, 8)]),
    "tiled_svd": (TiledSVD(tile_shape=(4, 24)), [1, 3, 2, 4]),
}


def same_shape_convs():
    """A stem, then four 12→12 3×3 convs and one 12→16 conv: one group of four and a group of one."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3), *[nn.Conv2d(12, 12, 3) for _ in range(4)], nn.Conv2d(12, 16, 3))


@pytest.mark.parametrize("scheme", sorted(RANKS))
@pytest.mark.parametrize("driver", ["exact", "gram"])
def test_one_batched_call_per_shape_equals_projecting_each_layer_alone(scheme, driver):
    scheme, ranks = RANKS[scheme]
    rank = {str(index + 1): r for index, r in enumerate(ranks)} | {"5": ranks[0]}
    options = LowRankOptions(scheme, rank, solver=Solver(driver=driver))
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
    assert LowRankOptions("tucker2", 0.5).solver.driver == "auto"
    auto, gram = same_shape_convs(), same_shape_convs()
    project_(auto, "tucker2", 0.5)
    project_(gram, "tucker2", 0.5, solver=Solver(driver="gram"))
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
    configured, _ = RANKS[scheme]
    rank = (3, 4) if scheme == "tucker2" else 3
    errors = {}
    for objective in ("weight", "activation"):
        model = batchnorm_convs()
        stats = project_(model, configured, rank, objective=objective, calibration=calibration_batches())
        errors[objective] = [s.output_rel_error for s in stats]
    assert all(a < w for a, w in zip(errors["activation"], errors["weight"]))


def test_project_without_calibration_under_the_activation_objective_names_it():
    with pytest.raises(ValueError, match=r"`objective`=Activation\(batches=2, ridge=0.01, "
                                         r"bn_weighting=False, observe_training=True\) needs `calibration`: an iterable of input batches .*got None"):
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
    options = dict(objective=Activation(bn_weighting=bn_weighting))
    small = factorize(model, "tucker2", (3, 4), calibration=calibration_batches(), **options).eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input is untouched
    projected = copy.deepcopy(model)
    project_(projected, "tucker2", (3, 4), calibration=calibration_batches(), **options)
    x = calibration_batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), projected(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(projected(x), factorize(model, "tucker2", (3, 4)).eval()(x), atol=1e-3)


def test_a_cusolver_driver_is_accepted_by_the_options_and_refused_by_name_off_cuda():
    assert LowRankOptions("svd", 2, solver=Solver(driver="gesvdj")).solver.driver == "gesvdj"
    with pytest.raises(ValueError, match=r"`Solver.driver`='gesvdj' is a cuSOLVER driver and runs on CUDA only; the "
                                         r"weights decompose on 'cpu': use one of \('auto', 'exact', 'randomized', "
                                         r"'gram'\) or `Solver.device` 'cuda'"):
        project_(same_shape_convs(), "svd", 2, solver=Solver(driver="gesvdj"))
    with pytest.raises(ValueError, match=r"`Solver.driver`='gesvda' is a cuSOLVER driver"):  # when fit starts, too
        plan_layers(same_shape_convs(), LowRankOptions("tucker2", Budget(2.0), solver={"driver": "gesvda"}))


@pytest.mark.parametrize("value", ["gpu0", "meta", "cuda:64", -1])
def test_projection_device_names_what_it_allows(value):
    with pytest.raises(ValueError, match=rf"`Solver.device` must be 'cpu' or a CUDA device of this machine .*"
                                         rf"got {value!r}"):
        Solver(device=value)


def test_moved_makes_one_copy_per_source_device_dtype_and_target(monkeypatch):
    tensors = [torch.randn(2, 3), torch.randn(4), torch.randn(3, dtype=torch.float64), torch.randn(1, 1)]
    copies = []
    original = torch.Tensor.to

    def counted(self, *args, **kwargs):
        copies.append((str(self.dtype), self.numel()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted)
    out = moved(tensors, ["meta", "meta", "meta", "cpu"])
    assert sorted(copies) == [("torch.float32", 10), ("torch.float64", 3)]
    assert [t.device.type for t in out] == ["meta", "meta", "meta", "cpu"] and out[3] is tensors[3]
    assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in tensors]
    copies.clear()
    assert all(a is b for a, b in zip(moved(tensors, "cpu"), tensors)) and not copies


def test_projecting_on_the_cpu_is_projecting_in_place_for_cpu_weights():
    model, reference = same_shape_convs(), same_shape_convs()
    stats = project_(model, "tucker2", 0.5, solver=Solver(device="cpu"))
    project_(reference, "tucker2", 0.5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert [s.name for s in stats] == ["1", "2", "3", "4", "5"]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("scheme", sorted(RANKS))
@pytest.mark.parametrize("objective", ["weight", "activation"])
def test_projecting_on_another_device_matches_projecting_where_the_weights_are(scheme, objective):
    """Only the devices differ between the cases: the same driver, and the same statistics (gathered once, on
    the CPU, then moved by the projection to where it decomposes)."""
    scheme, ranks = RANKS[scheme]
    rank = {str(index + 1): r for index, r in enumerate(ranks)} | {"5": ranks[0]}
    options = dict(objective=objective)
    plans = plan_layers(same_shape_convs(), LowRankOptions(scheme, rank, solver=Solver("exact"), **options))[0]
    statistics = None
    if objective == "activation":
        inputs = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        statistics = gather_statistics(same_shape_convs(), plans, LowRankOptions(scheme, rank, **options), inputs,
                                       seed=0)
    results = []
    for where, projection_device in (("cuda", None), ("cuda", "cpu"), ("cpu", "cuda")):
        model = same_shape_convs().to(where)
        stats = project_planned_(model, plans, LowRankOptions(scheme, rank, solver=Solver(
            "exact", projection_device), **options), statistics)
        assert all(p.device.type == where for p in model.parameters())
        results.append(([p.detach().cpu() for p in model.parameters()], [s.rel_error for s in stats]))
    (reference, errors), *others = results
    for weights, other_errors in others:
        for a, b in zip(weights, reference):
            assert (a - b).norm() <= 1e-4 * b.norm()
        assert other_errors == pytest.approx(errors, rel=1e-4)


@CUDA
@pytest.mark.parametrize("driver", ["gesvd", "gesvdj", "gesvda"])
def test_each_cusolver_driver_is_eckart_young_optimal(driver):
    model = same_shape_convs().cuda()
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    stats = project_(model, "svd", 3, solver=Solver(driver=driver))
    for s in stats:
        singular = torch.linalg.svdvals(weights[s.name].double().reshape(weights[s.name].shape[0], -1))
        best = (singular[3:].pow(2).sum() / singular.pow(2).sum()).sqrt().item()
        assert s.rel_error == pytest.approx(best, rel=1e-4, abs=1e-6)


def synchronizations(function) -> int:
    """How many times ``function()`` makes the host wait for the CUDA device (``torch.cuda`` sync debug mode)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@CUDA
@pytest.mark.parametrize("scheme", sorted(RANKS))
def test_the_host_waits_per_group_of_layers_not_per_layer(scheme):
    scheme, ranks = RANKS[scheme]
    counts = {}
    for layers in (2, 8):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 12, 3), *[nn.Conv2d(12, 12, 3) for _ in range(layers)]).cuda()
        options = LowRankOptions(scheme, ranks[1])
        plans = plan_layers(model, options)[0]
        project_planned_(model, plans, options)  # warm-up: cuSOLVER handles, workspaces
        counts[layers] = synchronizations(lambda: project_planned_(model, plans, options))
        offloaded = LowRankOptions(scheme, ranks[1], solver=Solver(device="cpu"))
        assert synchronizations(lambda: project_planned_(model, plans, offloaded)) <= 2
    assert counts[2] == counts[8]
