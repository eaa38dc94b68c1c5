"""The global budget rule: ranks allocated across layers so that the whole model meets a parameter or MAC budget,
with less summed error than uniform ranks of the same size, and clear errors for bad or unreachable budgets."""
import copy
import random
import re
from dataclasses import replace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrlightning import (Budget, Latency, LowRankOptions, LowRankProjection, Selection, count_macs, count_params, factorize,
                         plan_layers, project_)
from lrlightning.budget import (LayerChoices, allocate, faster_frontier, in_model_costs, latency_ranks, layer_multiple,
                                layer_structure, rank_choices, rounded_rank, timing_layer)
from lrlightning.schemes import scheme_of
from lrlightning.speed.timing import Spread
from lrlightning.plan import allocate_plan
from lrlightning.training.summary import plan_table
from lrlightning.zoo import build_backbone

from helpers import quiet_trainer

SHAPE = (3, 16, 16)
WIDTH = 16  # channels 16, 32, 64: wide enough for rank multiples of 4 and 8


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_backbone("resnet20", num_classes=10, in_channels=3, width=WIDTH).eval()


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = build_backbone("resnet20", num_classes=10, in_channels=3, width=WIDTH)

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def whole_ratio(model, small, metric):
    if metric == "params":
        return count_params(model) / count_params(small)
    return count_macs(model, SHAPE) / count_macs(small, SHAPE)


def test_the_max_objective_takes_the_smallest_largest_error():
    a = LayerChoices("a", (1, 2, None), (0.6, 0.2, 0.0), (10.0, 20.0, 40.0))
    b = LayerChoices("b", (1, None), (0.3, 0.0), (5.0, 30.0))
    # largest errors: a1 b1 0.6 (15), a2 b1 0.3 (25), a- b1 0.3 (45), a2 b- 0.2 (50), a- b- 0 (70)
    assert allocate([a, b], 0.0, 25.0, "max") == {"a": 2, "b": 1}
    assert allocate([a, b], 0.0, 50.0, "max") == {"a": 2, "b": None}
    assert allocate([a, b], 0.0, 20.0, "max") == {"a": 1, "b": 1}


def test_allocate_takes_the_least_error_within_the_budget():
    a = LayerChoices("a", (1, 2, None), (0.6, 0.2, 0.0), (10.0, 20.0, 40.0))
    b = LayerChoices("b", (1, None), (0.3, 0.0), (5.0, 30.0))
    # totals and errors: a1 b1 15/0.9, a2 b1 25/0.5, a1 b- 40/0.6, a- b1 45/0.3, a2 b- 50/0.2, a- b- 70/0
    assert allocate([a, b], 0.0, 50.0) == {"a": 2, "b": None}
    assert allocate([a, b], 0.0, 45.0) == {"a": None, "b": 1}
    assert allocate([a, b], 0.0, 30.0) == {"a": 2, "b": 1}
    assert allocate([a, b], 0.0, 15.0) == {"a": 1, "b": 1}
    assert allocate([a, b], 0.0, 70.0) == {"a": None, "b": None}
    with pytest.raises(ValueError, match="smallest reachable size 25 exceeds the budget's 20"):
        allocate([a, b], 10.0, 20.0)


@pytest.mark.parametrize("objective", ["sum", "max"])
def test_allocate_never_exceeds_the_budget_and_spends_it(objective):
    rng = random.Random(0)
    for _ in range(30):
        layers = []
        for index in range(rng.randint(1, 6)):
            costs = sorted(rng.uniform(1, 100) for _ in range(5))
            errors = sorted((rng.random() for _ in range(4)), reverse=True) + [0.0]
            layers.append(LayerChoices(str(index), (1, 2, 3, 4, None), tuple(errors), tuple(costs)))
        cheapest, dearest = sum(c.costs[0] for c in layers), sum(c.costs[-1] for c in layers)
        target = rng.uniform(cheapest, dearest)
        chosen = allocate(layers, 0.0, target, objective)
        spent = sum(c.costs[c.ranks.index(chosen[c.name])] for c in layers)
        assert spent <= target + 1e-9
        for c in layers:  # no single upgrade still fits: the greedy completion spent what it could
            i = c.ranks.index(chosen[c.name])
            assert all(c.costs[j] - c.costs[i] > target - spent for j in range(i + 1, len(c.ranks)))


@pytest.mark.parametrize("scheme", ["svd", "tucker2", "spatial_svd"])
@pytest.mark.parametrize("metric, budget", [("params", 2.0), ("params", 4.0), ("macs", 3.0)])
def test_the_whole_model_meets_the_budget_within_five_percent(resnet, scheme, metric, budget):
    small = factorize(resnet, scheme, Budget(budget, metric=metric, input_shape=SHAPE))
    assert budget <= whole_ratio(resnet, small, metric) <= 1.05 * budget


@pytest.mark.parametrize("objective", ["sum", "max"])
def test_allocated_ranks_err_less_than_uniform_ranks_of_the_same_size(resnet, objective):
    uniform = factorize(resnet, "tucker2", 0.3)
    budget = whole_ratio(resnet, uniform, "params")
    errors = {}
    for name, rank in (("uniform", 0.3), ("budget", Budget(budget, objective=objective))):
        model = build_backbone("resnet20", num_classes=10, in_channels=3, width=WIDTH)
        model.load_state_dict(resnet.state_dict())
        plans = plan_layers(model, LowRankOptions("tucker2", rank), warn=False)[0]
        stats = project_(model, "tucker2", rank={p.name: p.rank for p in plans})
        squared = [s.rel_error ** 2 for s in stats]
        errors[name] = sum(squared) if objective == "sum" else max(squared)
    small = factorize(resnet, "tucker2", Budget(budget, objective=objective))
    assert whole_ratio(resnet, small, "params") >= budget
    assert errors["budget"] < (0.8 if objective == "sum" else 1.0) * errors["uniform"]


def test_an_unreachable_budget_names_the_best_reachable(resnet):
    with pytest.raises(ValueError, match=r"`Budget.factor`=50.0 \(params\) is out of reach: .* at most \d+\.\d\dx "
                                         r"smaller in params"):
        factorize(resnet, "svd", Budget(50.0))


@pytest.mark.parametrize("options, match", [
    (dict(factor=1.0), r"`Budget.factor` must be a number > 1 .* got 1.0"),
    (dict(factor=2.0, metric="flops"),
     r"`Budget.metric` must be one of \('params', 'macs', 'latency'\), got 'flops'"),
    (dict(factor=2.0, metric="macs"), r"`Budget.metric`='macs' needs `input_shape`"),
    (dict(factor=2.0, out_of_reach="fastest"),
     r"`Budget.out_of_reach` must be one of \('raise', 'closest'\), got 'fastest'"),
    (dict(factor=2.0, input_shape=(3, 0, 16)), r"`Budget.input_shape` must be the shape of one sample, such as \(C, H, W\), \(C, L\) or \(C, D, H, W\)"),
])
def test_bad_budgets_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        LowRankOptions("svd", Budget(**options))


def test_a_rank_rule_is_one_argument_and_the_old_flat_budget_keywords_are_gone():
    # the old "give exactly one rank rule of `rank`, `energy`, `compression`, `budget`" check: the rule is now the
    # single `rank` argument, which refuses what is no rule and names the rules it takes
    with pytest.raises(ValueError, match=r"`rank` must be an int >= 1, a float in \(0, 1\], a mapping of layer names "
                                         r"to ranks, Energy\(fraction\), Compression\(factor\) or "
                                         r"Budget\(factor, \.\.\.\); got None"):
        LowRankOptions("svd", None)
    with pytest.raises(TypeError, match="budget"):
        LowRankOptions("svd", 0.5, budget=2.0)
    assert LowRankOptions("svd", Budget(2.0)).rank == Budget(2.0, metric="params")


@pytest.mark.parametrize("metric", ["macs", "latency"])
@pytest.mark.parametrize("shape", [(3, 8), (1, 16, 16)])
def test_an_input_shape_the_model_cannot_take_is_refused_before_anything_is_projected(resnet, metric, shape,
                                                                                        mac_latency, monkeypatch):
    def never_reached(*args, **kwargs):
        raise AssertionError("the layers' candidates are costed only once the input shape fits the model")

    monkeypatch.setattr("lrlightning.budget.layer_choices", never_reached)
    model = copy.deepcopy(resnet)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"`Budget.input_shape`={re.escape(str(shape))} does not fit CifarResNet: "
                                         r"its forward pass on a batch of one zero sample of that shape fails .* "
                                         r"It must be one sample's shape without the batch dimension: \(C, H, W\), \(C, L\) for Conv1d"):
        project_(model, "svd", Budget(2.0, metric=metric, input_shape=shape, latency=Latency(device="cpu")))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert mac_latency.made == []  # not even a latency table was made


def test_callback_allocates_once_at_fit_start_and_ends_low_rank(tmp_path, resnet):
    model = Classifier()
    model.backbone.load_state_dict(resnet.state_dict())
    # the callback's old default objective was "activation": kept explicit so the same projection is tested
    callback = LowRankProjection("svd", Budget(3.0), every_n_train_steps=2, bn_recalibration_batches=2,
                                 objective="activation")
    data = TensorDataset(torch.randn(32, *SHAPE), torch.randint(0, 10, (32,)))
    quiet_trainer(tmp_path, [callback], max_epochs=1).fit(model, DataLoader(data, batch_size=8))
    assert callback.allocation.errors == "output"  # allocated when fit started, from the output errors
    assert callback.ranks == {name: rank for name, rank in callback.allocation.ranks.items() if rank is not None}
    assert callback.state_dict()["ranks"] == callback.ranks
    for plan in callback.plans:
        weight = model.get_submodule(plan.name).weight.detach().flatten(1)
        assert torch.linalg.matrix_rank(weight).item() == plan.rank
    small = factorize(model, "svd", rank=callback.ranks)
    assert whole_ratio(model, small, "params") >= 3.0


def test_rank_steps_follow_the_layer_width():
    assert [layer_multiple(full, 8) for full in (3, 16, 32, 64, 127, 128, 512)] == [1, 1, 2, 4, 4, 8, 8]
    assert [rounded_rank(r, 256, 8) for r in (256, 255, 27, 8, 7, 5, 3, 1)] == [256, 248, 24, 8, 4, 4, 2, 1]
    assert rounded_rank((13, 27), (32, 128), 8) == (12, 24)
    assert rounded_rank(27, 64, 1) == 27


@pytest.mark.parametrize("scheme", ["svd", "tucker2", "spatial_svd"])
def test_allocated_ranks_are_multiples_where_layers_are_wide(resnet, scheme):
    options = LowRankOptions(scheme, Budget(3.0))
    plans, _, allocation = allocate_plan(resnet, options, warn=False)
    assert allocation.achieved >= 3.0
    for plan in plans:
        full = options.scheme.full_rank(plan.shape)
        for rank, limit in zip(plan.rank if isinstance(plan.rank, tuple) else (plan.rank,),
                               full if isinstance(full, tuple) else (full,)):
            step = layer_multiple(limit, 8)
            assert rank % step == 0 or (rank < step and rank & (rank - 1) == 0), (plan.name, plan.rank)


def test_latency_budget_allocates_measured_costs_and_never_picks_a_slower_layer(resnet, mac_latency, monkeypatch):
    class SlowWideTable(mac_latency):
        """MAC-proportional latencies, except that every tucker2 candidate of rank (R, R) with R > 8 in the last
        stage is made slower than dense: the allocation must never pick one."""

        def layer_times(self, module, input_shape, candidates):
            times = super().layer_times(module, input_shape, candidates)
            if module.out_channels == 4 * WIDTH:
                times.ratios.update({label: self.exact(2.0) for label in candidates
                                     if int(label.split("(")[1].split(",")[0]) > 8})
            return times

    monkeypatch.setattr("lrlightning.budget.LatencyTable", SlowWideTable)
    options = LowRankOptions("tucker2", Budget(2.0, metric="latency", input_shape=SHAPE, latency=Latency(
                                               (4,), "cpu")))
    plans, _, allocation = allocate_plan(resnet, options, warn=False)
    assert mac_latency.made[-1].batch_size == 4 and mac_latency.made[-1].device == torch.device("cpu")
    assert 2.0 <= allocation.achieved <= 2.1 and allocation.metric == "latency"
    assert allocation.dense == pytest.approx(count_macs(resnet, SHAPE) / 1e6)
    last_stage = [p for p in plans if p.shape[0] == 4 * WIDTH]
    assert all(p.rank[0] <= 8 for p in last_stage)
    for plan in plans:
        before, after = allocation.costs[plan.name]
        assert after < before
    with pytest.raises(ValueError, match=r"`Budget.factor`=1000.0 \(latency\) is out of reach: .* at most "
                                         r"\d+\.\d\dx \(IQR [\d.-]+\) faster \(measured\)"):
        allocate_plan(resnet, options.replace_rank(replace(options.rank, factor=1000.0)), warn=False)


def test_a_latency_budget_out_of_reach_keeps_the_fastest_allocation_when_asked(resnet, mac_latency):
    options = LowRankOptions("tucker2", Budget(1000.0, metric="latency", input_shape=SHAPE, latency=Latency(
                                               (4,), "cpu"), out_of_reach="closest"))
    with pytest.warns(UserWarning, match=r"`Budget.factor`=1000.0 \(latency\) is out of reach: .* kept the closest "
                                         r"allocation \(`Budget.out_of_reach`='closest'\)"):
        plans, _, allocation = allocate_plan(resnet, options, warn=False)
    check = allocation.check
    assert (check.verdict, check.attempts, check.budget) == ("short", 1, 1000.0)
    factorized = {name: rank for name, rank in allocation.ranks.items() if rank is not None}
    fastest = count_macs(resnet, SHAPE) / count_macs(factorize(resnet, "tucker2", factorized), SHAPE)
    assert check.measured.median == pytest.approx(fastest) and 1.0 < check.measured.median < 1000.0
    assert check.text().startswith(f"short: out of reach on this machine, the fastest allocation measured "
                                   f"{check.measured.median:.2f}x")
    reach = allocate_plan(resnet, options.replace_rank(replace(options.rank, factor=0.999 * fastest,
                                                               out_of_reach="raise")), warn=False)[2]
    assert reach.check.measured.median >= 0.97 * 0.999 * fastest  # what it measured is reachable as a request
    assert plans and all(allocation.ranks[p.name] == p.rank for p in plans)


def test_a_size_budget_out_of_reach_keeps_the_smallest_allocation_when_asked(resnet):
    with pytest.warns(UserWarning, match=r"`Budget.factor`=50.0 \(params\) is out of reach"):
        small = factorize(resnet, "svd", Budget(50.0, out_of_reach="closest"))
    smallest = factorize(resnet, "svd", Budget(whole_ratio(resnet, small, "params") * 0.999))
    assert count_params(small) == count_params(smallest)
    assert whole_ratio(resnet, small, "params") < 50.0


def spread(value, width=0.0):
    return Spread(value, value - width / 2, value + width / 2, 7)


def test_the_frontier_keeps_a_rank_only_when_it_runs_faster_than_every_larger_rank_kept_beyond_the_noise():
    # measured on a 16-channel layer: kernels favour 8 channels, so rank 8 beats ranks 7 to 5
    measured = {9: spread(1.40, 0.1), 8: spread(0.72, 0.05), 7: spread(0.90, 0.1), 6: spread(0.83, 0.1),
                5: spread(0.77, 0.05), 4: spread(0.66, 0.02), 3: spread(0.61, 0.02), 2: spread(0.60, 0.02),
                1: spread(0.55, 0.02)}
    assert faster_frontier(list(measured), list(measured.values())) == {8: 0.72, 4: 0.66, 3: 0.61, 1: 0.55}
    tied = faster_frontier([4, 3], [spread(0.50, 0.1), spread(0.48, 0.1)])
    assert tied == {4: 0.50}  # a tie within the noise goes to the larger rank, the smaller error
    assert faster_frontier([4, 3], [spread(0.97, 0.06), spread(0.99, 0.06)]) == {}  # no faster than dense
    in_int8 = spread(0.6, 0.04)  # the layer left dense runs in int8 at 0.6 of its fp32 time
    assert faster_frontier([8, 4], [spread(0.7, 0.02), spread(0.3, 0.02)], in_int8) == {4: 0.3}


def test_a_latency_budget_times_only_ranks_doing_fewer_macs_than_the_dense_layer():
    # strided: tucker2's first 1x1 runs at the input's resolution, four times the output's
    layer, shape, scheme = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), (16, 28, 28), scheme_of("tucker2")
    dense = count_macs(layer, shape)

    def macs(rank):
        return count_macs(layer_structure(layer, scheme, rank), shape)

    every = rank_choices(scheme, (32, 16, 3, 3), 1, 16)
    timed = latency_ranks(layer, scheme, shape, 1)
    assert any(macs(rank) >= dense for rank in every)  # fewer parameters, yet as much work or more
    assert timed and all(macs(rank) < dense for rank in timed)
    assert len(timed) == len(every) == 16  # the candidates timed are all ones the allocator could pick


def test_a_candidate_only_noise_makes_look_faster_is_not_a_candidate(resnet, mac_latency, monkeypatch):
    class NearlyEqualTable(mac_latency):
        """The last stage's candidates all time like dense, give or take 3 %: none is faster beyond the noise."""

        def layer_times(self, module, input_shape, candidates):
            times = super().layer_times(module, input_shape, candidates)
            if module.out_channels == 4 * WIDTH:
                times.ratios.update({label: spread(1.0 + 0.03 * (-1) ** i, 0.06)
                                     for i, label in enumerate(candidates)})
            return times

    monkeypatch.setattr("lrlightning.budget.LatencyTable", NearlyEqualTable)
    options = LowRankOptions("tucker2", Budget(1.3, metric="latency", input_shape=SHAPE, latency=Latency(
                                               (4,), "cpu")))
    plans, skipped, allocation = allocate_plan(resnet, options, warn=False)
    last_stage = {name for name, module in resnet.named_modules() if isinstance(module, nn.Conv2d)
                  and module.out_channels == 4 * WIDTH and module.kernel_size == (3, 3)}
    assert last_stage and not last_stage & {p.name for p in plans}
    assert all(allocation.ranks[name] is None for name in last_stage)


def test_a_latency_budget_is_allocated_again_until_the_allocated_model_measures_the_speedup(resnet, mac_latency,
                                                                                            monkeypatch):
    class SlowerThanPredicted(mac_latency):
        """Whole models gain only MAC reduction ** 0.7: the per-layer costs overrate the factorized model."""

        def speedup(self, dense, factorized, input_shape):
            return self.exact(super().speedup(dense, factorized, input_shape).median ** 0.7)

    monkeypatch.setattr("lrlightning.budget.LatencyTable", SlowerThanPredicted)
    options = LowRankOptions("tucker2", Budget(1.5, metric="latency", input_shape=SHAPE, latency=Latency(
                                               (4,), "cpu")))
    plans, _, allocation = allocate_plan(resnet, options, warn=False)
    check = allocation.check
    assert check.verdict == "met" and check.attempts >= 2 and abs(check.measured.median / 1.5 - 1) <= 0.03
    assert allocation.achieved > 1.6  # predicted from the layer costs, which the measurement corrected
    table = plan_table(plans, [], "tucker2", allocation)
    assert f"Speedup of the allocated model: measured {check.measured.median:.2f}x" in table
    assert f"as asked ({check.attempts} allocations timed)" in table


def test_plan_table_shows_each_layers_cost_and_the_whole_model(resnet):
    options = LowRankOptions("tucker2", Budget(3.0, metric="macs", input_shape=SHAPE))
    plans, skipped, allocation = allocate_plan(resnet, options, warn=False)
    text = plan_table(plans, skipped, "tucker2", allocation)
    assert "macs dense -> allocated" in text
    assert "Budget 3x in MACs per sample: whole model" in text and f"({allocation.achieved:.2f}x)" in text
    assert sum(after for _, after in allocation.costs.values()) < sum(before for before, _ in allocation.costs.values())


@pytest.mark.parametrize("options, match", [
    (dict(rank_multiple=0), r"`Budget.rank_multiple` must be an int >= 1, got 0"),
    (dict(objective="mean"), r"`Budget.objective` must be None or one of \('max', 'sum'\), got 'mean'"),
    (dict(latency=dict(batch_sizes=2.5)), r"`Latency.batch_sizes` must be one or more distinct ints >= 1, such as "
                                          r"\(1, 32\), got 2.5"),
    (dict(latency=dict(batch_sizes=(32, 1, 32))), r"`Latency.batch_sizes` must be .* got \(32, 1, 32\)"),
    (dict(latency=dict(batch_sizes=())), r"`Latency.batch_sizes` must be .* got \(\)"),
    (dict(latency=dict(batch_size=4)), r"`Budget.latency` has unknown fields \['batch_size'\]; a Latency has "
                                       r"\['batch_sizes', 'device'"),
    (dict(latency=4), r"`Budget.latency` must be a lrlightning.Latency, a mapping of its fields or None, got 4"),
    (dict(latency=Latency(), latency_device="cpu"), r"`Budget` got both `latency` and the flat keywords "
                                                     r"latency_device=...; give `latency` only"),
    (dict(metric="latency"), r"`Budget.metric`='latency' needs `input_shape`"),
    (dict(latency=dict(device="gpu0")), r"`Latency.device` must be 'cpu' or a CUDA device .* got 'gpu0'"),
    (dict(latency=dict(device="meta")), r"`Latency.device` must be 'cpu' or a CUDA device .* got 'meta'"),
    (dict(latency=dict(device="cuda:64")), r"`Latency.device` must be 'cpu' or a CUDA device .* got 'cuda:64'"),
])
def test_bad_latency_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        LowRankOptions("svd", Budget(2.0, **options))


def test_the_callback_reallocates_from_the_current_weights_for_k_projections_then_keeps_the_ranks(tmp_path, resnet):
    model = Classifier()
    model.backbone.load_state_dict(resnet.state_dict())
    callback = LowRankProjection("tucker2", Budget(3.0, reallocations=2), every_n_train_steps=2,
                                 bn_recalibration_batches=0)
    projector, allocations, plan = callback.projector, [], callback.projector.resolve

    def recorded_plan(module, passes=None, seed=0, reallocate=False, on_rank_zero=None):
        expected = allocate_plan(copy.deepcopy(module), projector.options, warn=False)[0] if reallocate else None
        plan(module, passes, seed, reallocate, on_rank_zero)
        if reallocate:  # at a periodic projection, seeded with its optimizer step
            allocations.append((seed, projector.ranks))
            assert projector.ranks == {p.name: p.rank for p in expected}

    projector.resolve = recorded_plan
    # weight errors, so that the expected allocation needs no batches (test_output_allocation covers output errors)
    data = TensorDataset(torch.randn(64, *SHAPE), torch.randint(0, 10, (64,)))
    quiet_trainer(tmp_path, [callback], max_epochs=1).fit(model, DataLoader(data, batch_size=8))
    assert [step for step, _ in allocations] == [2, 4]
    assert callback.budget_reallocations == 2
    assert callback.num_projections == 4 and callback.ranks == allocations[-1][1]
    assert callback.allocation.achieved >= 3.0


def test_reallocations_need_a_budget():
    # reallocations are a field of the Budget now: no other rank rule can carry them, and the flat keyword is gone
    with pytest.raises(TypeError, match="budget_reallocations"):
        LowRankProjection("svd", rank=2, budget_reallocations=2)
    assert LowRankProjection("svd", rank=2).budget_reallocations == 0
    assert LowRankProjection("svd", Budget(2.0)).budget_reallocations == 0
    assert LowRankProjection("svd", Budget(2.0, reallocations=2)).budget_reallocations == 2
    with pytest.raises(ValueError, match=r"`Budget.reallocations` must be an int >= 0, got -1"):
        LowRankProjection("svd", Budget(2.0, reallocations=-1))


@pytest.mark.parametrize("scheme, rank", [("svd", 8), ("tucker2", (8, 16)), ("spatial_svd", 8)])
def test_candidate_structures_count_the_macs_of_the_real_factorized_layer(resnet, scheme, rank):
    options = LowRankOptions(scheme, rank=2)
    layer = resnet.layer2[0].conv1
    structure = layer_structure(layer, options.scheme, rank)
    assert next(structure.parameters()).device.type == "meta"
    real = options.scheme.factorized_layer(layer, rank)
    assert count_macs(structure, (16, 16, 16)) == count_macs(real, (16, 16, 16))
    timed = timing_layer(layer, options.scheme, rank)
    assert timed(torch.randn(2, 16, 16, 16)).shape == real(torch.randn(2, 16, 16, 16)).shape


def test_in_model_costs_rescale_every_candidate_by_one_factor_the_dense_layers_took_in_the_model():
    a = LayerChoices("a", (4, 2, None), (0.1, 0.4, 0.0), (1.0, 0.5, 2.0))
    b = LayerChoices("b", (8, None), (0.2, 0.0), (1.0, 4.0))
    scaled = in_model_costs([a, b], {"a": 5.0, "b": 4.0})  # 9 ms in the model against 6 ms alone: 1.5x
    assert [c.costs for c in scaled] == [(1.5, 0.75, 3.0), (1.5, 6.0)]
    assert [(c.name, c.ranks, c.errors) for c in scaled] == [(c.name, c.ranks, c.errors) for c in (a, b)]


def test_a_budget_that_selects_nothing_or_a_layer_the_forward_skips_is_refused(resnet):
    with pytest.raises(ValueError, match=r"no layer selected for budget=2x params \(Selection\(include=\('nomatch\*',\)"):
        plan_layers(resnet, LowRankOptions("svd", Budget(2.0), layers=Selection(include="nomatch*")))

    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = copy.deepcopy(resnet)
            self.head = nn.Conv2d(3, 8, 3)  # used only for another loss, never in forward

        def forward(self, x):
            return self.body(x)

    with pytest.raises(ValueError, match=r"these do not: \['head'\]. HINT: leave them out with `Selection.exclude`"):
        plan_layers(WithHead(), LowRankOptions("svd", Budget(2.0, metric="macs", input_shape=SHAPE),
                                               layers=Selection(skip_first_conv=False)))


def test_a_reallocation_follows_weights_that_moved(tmp_path, resnet):
    class Skew(L.Callback):
        """Before the last step, make layer3.2.conv2 rank 1 and large, so one SGD step leaves it nearly rank 1."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    weight = pl_module.backbone.layer3[2].conv2.weight
                    flat = weight.flatten(1)
                    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
                    weight.copy_((100 * s[0] * u[:, :1] @ vh[:1]).reshape(weight.shape))

    model = Classifier()
    model.backbone.load_state_dict(resnet.state_dict())
    callback = LowRankProjection("svd", Budget(2.0, reallocations=2), every_n_train_steps=2,
                                 bn_recalibration_batches=0, objective="activation")  # the old default objective
    data = TensorDataset(torch.randn(32, *SHAPE), torch.randint(0, 10, (32,)))
    trainer = quiet_trainer(tmp_path, [Skew(), callback], max_steps=4)
    first = plan_layers(model, LowRankOptions("svd", Budget(2.0)), warn=False)[0]
    trainer.fit(model, DataLoader(data, batch_size=8))
    assert callback.ranks["backbone.layer3.2.conv2"] < {p.name: p.rank for p in first}["backbone.layer3.2.conv2"]


def test_a_latency_budget_over_several_batch_sizes_meets_it_at_the_slowest_and_keeps_only_layers_faster_at_each(
        resnet, mac_latency, monkeypatch):
    class SmallBatchesGainLess(mac_latency):
        """At batch 1 a factorized layer gains only the square root of its MAC reduction, and the first stage's
        candidates run slower than dense; at larger batches time follows MACs."""

        def layer_times(self, module, input_shape, candidates):
            times = super().layer_times(module, input_shape, candidates)
            if self.batch_size == 1:
                slower = module.out_channels == WIDTH
                times.ratios.update({label: self.exact(1.2 if slower else ratio.median ** 0.5)
                                     for label, ratio in times.ratios.items()})
            return times

        def speedup(self, dense, factorized, input_shape):
            speedup = super().speedup(dense, factorized, input_shape).median
            return self.exact(speedup ** 0.5 if self.batch_size == 1 else speedup)

    monkeypatch.setattr("lrlightning.budget.LatencyTable", SmallBatchesGainLess)
    options = LowRankOptions("tucker2", Budget(1.3, metric="latency", input_shape=SHAPE,
                                               latency=Latency(batch_sizes=(1, 32), device="cpu")))
    plans, _, allocation = allocate_plan(resnet, options, warn=False)
    assert [table.batch_size for table in mac_latency.made] == [1, 32]
    check = allocation.check
    assert check.verdict == "met" and check.batch_size == 1 and abs(check.measured.median / 1.3 - 1) <= 0.03
    assert check.by_batch[32].median > 1.3 * 1.2  # the larger batch gains more than asked
    assert set(allocation.predicted) == {1, 32} and allocation.batch_size == 1
    first_stage = {name for name, module in resnet.named_modules() if isinstance(module, nn.Conv2d)
                   and module.out_channels == WIDTH and module.kernel_size == (3, 3)} & set(allocation.ranks)
    assert first_stage and all(allocation.ranks[name] is None for name in first_stage)
    table = plan_table(plans, [], "tucker2", allocation)
    assert "at batch 1 on cpu" in table and "; at batch 32: " in table
    assert "at batch 1, the slowest of batches 1, 32" in table


def test_flat_latency_keywords_of_earlier_configs_still_build_the_latency_they_name():
    with pytest.warns(DeprecationWarning, match=r"`Budget\(latency_batch_size=..., latency_device=...\)` is "
                                                r"deprecated: give `latency=Latency\(...\)`"):
        rule = Budget(2.0, metric="latency", input_shape=SHAPE, latency_batch_size=4, latency_device="cpu")
    assert rule.latency == Latency(batch_sizes=(4,), device="cpu")
    assert Budget(2.0, metric="latency", input_shape=SHAPE, latency={"batch_sizes": [1, 32]}).latency.batch_sizes \
        == (1, 32)
    assert Budget(2.0).latency is None and Budget(2.0, metric="latency", input_shape=SHAPE).latency == Latency()
