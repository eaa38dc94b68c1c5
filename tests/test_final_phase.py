"""The final phase (a projection after every optimizer step at the end of fit) and the input statistics recorded
on the training step's own forward passes."""
import copy
import math

import lightning as L
import pytest
import torch
from torch import nn

from lrlightning import Activation, LowRankProjection
from lrlightning.activations import input_statistics
from lrlightning.training.schedule import ProjectionSchedule

from helpers import CountingProjection, ManualTinyCNN, ScaledOnRankOne, TinyCNN, ddp_trainer, loader, quiet_trainer


@pytest.mark.parametrize("final_phase, expected_start, expected", [
    (0.25, 12, [5, 10, 13, 14, 15, 16]),  # 16 optimizer steps: the last 4 project after every step
    (3, 13, [5, 10, 14, 15, 16]),
    (0, None, [5, 10, 15]),
])
def test_the_final_phase_projects_after_every_step_of_the_end(tmp_path, final_phase, expected_start, expected):
    callback = CountingProjection("svd", 2, every_n_train_steps=5, final_phase=final_phase, final_projection=False)
    model = TinyCNN()
    quiet_trainer(tmp_path, [callback]).fit(model, loader())
    assert callback.final_phase_start == expected_start
    assert callback.steps == expected
    rank = torch.linalg.matrix_rank(model.net[2].weight.detach().flatten(1)).item()
    assert (rank == 2) == bool(final_phase), "with a final phase the last step ends projected"


def test_the_final_phase_counts_optimizer_steps_under_gradient_accumulation(tmp_path):
    callback = CountingProjection("svd", 2, every_n_train_steps=3, final_phase=0.25, final_projection=False)
    trainer = quiet_trainer(tmp_path, [callback], accumulate_grad_batches=2)
    trainer.fit(TinyCNN(), loader())
    assert trainer.global_step == 8 and callback.final_phase_start == 6
    assert callback.steps == [3, 6, 7, 8]


def test_the_final_phase_under_manual_optimization_with_two_steps_a_batch(tmp_path):
    callback = CountingProjection("svd", 2, every_n_train_steps=6, final_phase=4, final_projection=False)
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(ManualTinyCNN(), loader())
    assert trainer.global_step == 16 and callback.final_phase_start == 12
    assert callback.steps == [6, 12, 14, 16]  # steps 13-16 fall in the batches ending at 14 and 16


def test_momentum_is_kept_inside_the_final_phase(tmp_path):
    class Zeroed(LowRankProjection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.zeroed = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            buffer = trainer.optimizers[0].state[pl_module.net[2].weight]["momentum_buffer"]
            self.zeroed.append(bool(torch.all(buffer == 0)))

    callback = Zeroed("svd", 2, every_n_train_steps=2, final_phase=4, reset_momentum=True, final_projection=False)
    quiet_trainer(tmp_path, [callback], max_epochs=1).fit(TinyCNN(), loader())
    assert callback.zeroed == [False, True, False, True, False, False, False, False]


@pytest.mark.parametrize("value", [1.5, -1, True, "0.1", 1.0])
def test_final_phase_validation(value):
    with pytest.raises(ValueError, match=r"`final_phase` must be a fraction of training in \(0, 1\) or a number"):
        LowRankProjection(final_phase=value)


def test_a_fractional_final_phase_needs_a_finite_training_length():
    with pytest.raises(ValueError, match=r"`final_phase`=0.1 needs a finite training length"):
        ProjectionSchedule(final_phase=0.1).final_phase_start(math.inf)
    assert ProjectionSchedule(final_phase=0.1).final_phase_start(100.0) == 90


class ForwardCounter(TinyCNN):
    def __init__(self):
        super().__init__()
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return super().forward(x)


@pytest.mark.parametrize("observe", [True, False])
def test_statistics_from_the_training_passes_need_no_extra_forward_pass(tmp_path, observe):
    model = ForwardCounter()
    callback = LowRankProjection("svd", 2, every_n_train_steps=2, final_projection=False, validate_projected=False,
                                 bn_recalibration_batches=0,
                                 objective=Activation(batches=3, observe_training=observe))
    quiet_trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
    start_checks = 2  # at train start: the forward check and one statistics pass
    assert callback.num_projections == 4
    assert model.forwards == 8 + start_checks + (0 if observe else 4 * 3)


class Snapshots(L.Callback):
    """The module and the batch of every training batch whose step is about to end at ``steps``."""

    def __init__(self, steps):
        self.steps, self.taken = steps, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 in self.steps:
            self.taken[trainer.global_step + 1] = (copy.deepcopy(pl_module.net), batch[0].clone())


class RecordedStatistics(LowRankProjection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded = {}

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        window = self.projector.window
        recorded = window.statistics

        def kept(step, plans, objective, warn):
            self.recorded[step] = recorded(step, plans, objective, warn)
            return self.recorded[step]

        window.statistics = kept


@pytest.mark.parametrize("scheme, batches, accumulate", [("tucker2", 2, 1), ("tucker2", 2, 2), ("svd", 1, 1)])
def test_recorded_statistics_are_those_of_the_steps_own_batches(tmp_path, scheme, batches, accumulate):
    """Each projection's statistics are the moments of the inputs its last ceil(batches / accumulate) optimizer
    steps' training passes saw, under the weights of each pass (all pixels for tucker2's channel moments; svd's
    sampled im2col rows: the same count, and moments of the same size)."""
    steps_per_window = math.ceil(batches / accumulate)
    callback = RecordedStatistics(scheme, 0.5, every_n_train_steps=3, final_projection=False,
                                  objective=Activation(batches=batches))
    snapshots = Snapshots({2, 3}) if accumulate == 1 else None
    callbacks = [callback] + ([snapshots] if snapshots else [])
    quiet_trainer(tmp_path, callbacks, max_epochs=1, accumulate_grad_batches=accumulate).fit(TinyCNN(), loader())
    recorded = callback.recorded[3]
    assert set(recorded) == {"net.2", "net.5"}
    images_per_step = 8 * accumulate
    if scheme == "svd":
        for name, features, positions in (("net.2", 72, 64), ("net.5", 108, 16)):  # net.5 has stride 2
            assert recorded[name].moment_sum.shape == (features, features)
            assert recorded[name].rows.item() == min(images_per_step * positions, 4 * features) * steps_per_window
        return
    assert recorded["net.2"].rows.item() == images_per_step * 64 * steps_per_window  # every pixel of every batch
    if snapshots is None:
        return
    expected = None
    for step in range(3 - steps_per_window + 1, 4):
        net, x = snapshots.taken[step]
        stats = input_statistics(net, ["2", "5"], [x], channels={"2", "5"})
        expected = stats if expected is None else {k: expected[k] + stats[k] for k in stats}
    for name in ("2", "5"):
        torch.testing.assert_close(recorded[f"net.{name}"].moment_sum, expected[name].moment_sum)
        torch.testing.assert_close(recorded[f"net.{name}"].row_sum, expected[name].row_sum)
        assert (recorded[f"net.{name}"].output_scale is None) == (expected[name].output_scale is None)


class PartialStep(TinyCNN):
    """A ``training_step`` that leaves out the last conv (``forward`` runs it): its statistics need separate
    passes."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        features = self.net[:5](x).mean((2, 3))
        return nn.functional.cross_entropy(features[:, :4], y)


def test_a_layer_the_training_step_does_not_run_takes_separate_passes(tmp_path):
    callback = RecordedStatistics("svd", 2, every_n_train_steps=4, final_projection=False, objective="activation")
    with pytest.warns(UserWarning, match=r"training step's forward passes do not run \['net.5'\]"):
        quiet_trainer(tmp_path, [callback], max_epochs=1).fit(PartialStep(), loader())
    assert callback.num_projections == 2
    assert callback.recorded == {4: None, 8: None}


class RecordedOnEveryRank(RecordedStatistics):
    def __init__(self, path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path = path

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        vectors = torch.stack([torch.cat([s["net.2"].moment_sum.flatten(), s["net.2"].rows.view(1)]).float()
                               for s in self.recorded.values()])
        gathered = [torch.empty_like(vectors) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, vectors)
        if trainer.is_global_zero:
            torch.save(torch.stack(gathered), self.path)


@pytest.mark.slow  # two spawned processes
def test_ddp_processes_sum_the_statistics_their_training_passes_recorded(tmp_path):
    path = str(tmp_path / "recorded.pt")
    callback = RecordedOnEveryRank(path, "tucker2", 0.5, every_n_train_steps=2, final_phase=1,
                                   final_projection=False, objective=Activation(batches=1))
    trainer = ddp_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=3)
    trainer.fit(ScaledOnRankOne(), loader())
    gathered = torch.load(path)
    assert gathered.shape[:2] == (2, 2)  # two processes, projections at steps 2 and 3
    assert torch.equal(gathered[0], gathered[1])
    assert gathered[0, 0, -1].item() == 2 * 8 * 64  # both processes' pixels of one batch each
