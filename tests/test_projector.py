"""The projector without Lightning: a plain torch training loop drives the schedule, the projections, the finish
and the export; the ``Plan`` a request resolves to; the schedule's arithmetic."""
import math

import pytest
import torch
from torch import nn

from lrlightning import LowRankOptions, Plan, factorize_planned, make_plan, plan_layers
from lrlightning.training.passes import Passes
from lrlightning.training.projector import Projector
from lrlightning.training.schedule import ProjectionSchedule


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                         nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))


def batches(count: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 4, (8,), generator=generator))
            for _ in range(count)]


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.detach().flatten(1))


def test_a_plain_torch_loop_trains_to_exactly_low_rank_weights_and_exports_them():
    model, data = small_cnn(), batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    projector = Projector(LowRankOptions("svd", 2), ProjectionSchedule(every_n_train_steps=3), reset_momentum=True)
    projector.resolve(model)
    projector.start()
    assert [p.name for p in projector.plans] == ["2", "5"]
    for step in range(1, 13):
        inputs, targets = data[step % len(data)]
        loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = projector.after_step(model, step, loss=loss, optimizers=[optimizer])
        assert (metrics is not None) == (step % 3 == 0)
    assert projector.projections == 4 and [entry["step"] for entry in projector.history] == [3, 6, 9, 12]
    for index in (2, 5):
        values = singular_values(model[index].weight)
        assert values[2] <= 1e-5 * values[0], "the last step ended on a projection"
        assert torch.count_nonzero(optimizer.state[model[index].weight]["momentum_buffer"]) == 0
    passes = Passes(lambda count, seed: data[:count], lambda module, batch, index: module(batch[0]))
    projector.finish(model, passes, seed=12)
    small = projector.factorize(model)
    model.eval(), small.eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_the_projector_state_resumes_the_schedule_and_the_ranks():
    model = small_cnn()
    first = Projector(LowRankOptions("svd", 0.5), ProjectionSchedule(every_n_train_steps=2, final_phase=2))
    first.resolve(model)
    first.start(lambda: 10)
    for step in range(1, 6):
        first.after_step(model, step)
    state = first.state_dict()
    assert (state["last_step"], state["projections"], state["final_phase_start"]) == (5, 2, 8)
    resumed = Projector(LowRankOptions("svd", 0.1), ProjectionSchedule(every_n_train_steps=2, final_phase=2))
    resumed.load_state_dict(state)
    resumed.resolve(small_cnn())
    resumed.start(lambda: 10)
    assert resumed.ranks == first.ranks and resumed.final_phase_start == 8
    steps = [step for step in range(6, 11) if resumed.after_step(model, step) is not None]
    assert steps == [6, 8, 9, 10] and resumed.projections == 6


def test_a_plan_carries_its_options_layers_skipped_layers_and_allocation():
    model = small_cnn()
    options = LowRankOptions("tucker2", 0.5)
    plan = make_plan(model, options)
    layers, skipped = plan_layers(model, options)
    assert isinstance(plan, Plan) and list(plan.layers) == layers and list(plan.skipped) == skipped
    assert plan.allocation is None and plan.ranks == {p.name: p.rank for p in layers}
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    torch.testing.assert_close(factorize_planned(model, plan)(x), factorize_planned(model, layers, options)(x),
                               rtol=0, atol=0)
    wrapped = nn.Sequential(model)
    assert [p.name for p in make_plan(wrapped, options).relative("0").layers] == [p.name for p in layers]
    with pytest.raises(ValueError, match=r"`options`=.* differ from the `Plan`'s own options"):
        factorize_planned(model, plan, LowRankOptions("svd", 0.5))
    with pytest.raises(ValueError, match=r"`options` is needed with a list of `LayerPlan`s"):
        factorize_planned(model, layers)
    torch.testing.assert_close(factorize_planned(model, plan, {"scheme": "tucker2", "rank": 0.5})(x),
                               factorize_planned(model, plan)(x), rtol=0, atol=0)


def test_a_projector_that_needs_training_batches_says_so_without_passes():
    model = small_cnn()
    for projector, purpose in ((Projector(LowRankOptions("svd", 2, objective="activation")), "`objective`="),
                               (Projector(LowRankOptions("svd", 2), loss_jump_batches=2), "`loss_jump_batches`")):
        projector.resolve(model)
        projector.start()
        with pytest.raises(ValueError, match=f"{purpose}.* runs forward passes on training batches: give `passes`"):
            projector.project(model, 1)


def test_the_schedule_projects_every_s_d_steps_between_start_and_stop_then_every_step_of_the_final_phase():
    schedule = ProjectionSchedule(every_n_train_steps=3, start_step=1, stop_step=10, final_phase=0.25)
    start = schedule.final_phase_start(16)
    assert start == 12
    assert [step for step in range(0, 17) if schedule.due(step, start)] == [1, 4, 7, 10, 13, 14, 15, 16]
    assert ProjectionSchedule().final_phase_start(math.inf) is None
    for arguments, match in ((dict(every_n_train_steps=0), r"`every_n_train_steps` must be an int >= 1, got 0"),
                             (dict(start_step=4, stop_step=2), r"`stop_step` must be None or an int >= `start_step` "
                                                               r"\(4\), got 2"),
                             (dict(rank_warmup=-1), r"`rank_warmup` must be an int >= 0, got -1")):
        with pytest.raises(ValueError, match=match):
            ProjectionSchedule(**arguments)
