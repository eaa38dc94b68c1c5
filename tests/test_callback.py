import copy
import csv
import math
import pickle

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lrlightning import (Activation, Budget, Compression, Energy, LowRankOptions, LowRankProjection,
                         NonFiniteTrainingError, Selection, Solver, TiledSVD, Tucker2, factorize)
from lrlightning.plan import annealed_plans
from lrlightning.training.callback import SHARDED_STRATEGIES
from lrlightning.training.projector import Projector

from helpers import CountingProjection, ManualTinyCNN, ScaledOnRankOne, TinyCNN, ddp_trainer, loader, quiet_trainer


def test_schedule_counts_optimizer_steps_not_batches(tmp_path):
    callback = CountingProjection("svd", 0.5, every_n_train_steps=3, final_projection=False)
    trainer = quiet_trainer(tmp_path, [callback], accumulate_grad_batches=2)
    trainer.fit(TinyCNN(), loader())
    assert trainer.global_step == 8
    assert callback.steps == [3, 6]
    assert callback.num_projections == 2


@pytest.mark.parametrize("every, start, expected", [
    (3, 0, [4, 6, 10, 12, 16]),  # steps 3, 6, 9, 12, 15 fall in the batches ending at these steps
    (2, 1, [2, 4, 6, 8, 10, 12, 14, 16]),
])
def test_manual_optimization_with_two_optimizers_honours_every_scheduled_step(tmp_path, every, start, expected):
    model = ManualTinyCNN()
    callback = CountingProjection("svd", 2, every_n_train_steps=every, start_step=start, final_projection=False)
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(model, loader())
    assert trainer.global_step == 16, "two optimizer steps per batch"
    assert callback.steps == expected
    assert torch.linalg.matrix_rank(model.net[2].weight.detach().flatten(1)).item() == 2


def test_start_and_stop_steps(tmp_path):
    callback = CountingProjection("svd", 0.5, every_n_train_steps=2, start_step=3, stop_step=11)
    trainer = quiet_trainer(tmp_path, [callback])
    trainer.fit(TinyCNN(), loader())
    assert trainer.global_step == 16
    assert callback.steps == [3, 5, 7, 9, 11, 16]


@pytest.mark.parametrize("objective", ["weight", "activation"])
@pytest.mark.parametrize("scheme, rank, options", [
    ("svd", 3, {}),
    ("tucker2", (3, 4), {}),
    ("spatial_svd", 4, {}),
    ("tiled_svd", 2, {"tile_shape": (6, 27)}),
])
def test_weights_end_exactly_low_rank(tmp_path, scheme, rank, options, objective):
    model = TinyCNN()
    configured = TiledSVD(**options) if scheme == "tiled_svd" else scheme
    callback = LowRankProjection(configured, rank, every_n_train_steps=5, objective=objective)
    quiet_trainer(tmp_path, [callback]).fit(model, loader())
    assert all((s.output_rel_error is not None) == (objective == "activation") for s in callback.last_stats)
    assert len(callback.history) == 3 and all(("output_rel_error" in h) == (objective == "activation")
                                               for h in callback.history)
    assert [p.name for p in callback.plans] == ["net.2", "net.5"]
    for plan in callback.plans:
        w = model.get_submodule(plan.name).weight.detach()
        if scheme == "svd":
            assert torch.linalg.matrix_rank(w.flatten(1)).item() == rank
        elif scheme == "tucker2":
            assert torch.linalg.matrix_rank(w.transpose(0, 1).flatten(1)).item() == rank[0]
            assert torch.linalg.matrix_rank(w.flatten(1)).item() == rank[1]
        elif scheme == "spatial_svd":
            t, s, kh, kw = w.shape
            assert torch.linalg.matrix_rank(w.permute(1, 2, 0, 3).reshape(s * kh, t * kw)).item() == rank
        else:
            matrix = w.flatten(1)
            tiles = [matrix[i:i + 6, j:j + 27] for i in range(0, matrix.shape[0], 6) for j in range(0, matrix.shape[1], 27)]
            assert max(torch.linalg.matrix_rank(t).item() for t in tiles) == rank
    untouched = model.get_submodule("net.0").weight.detach().flatten(1)
    assert torch.linalg.matrix_rank(untouched).item() == 8


def test_structure_and_parameters_unchanged(tmp_path):
    model = TinyCNN()
    keys = list(model.state_dict())
    ids = [id(p) for p in model.parameters()]
    quiet_trainer(tmp_path, [LowRankProjection("tucker2", 0.5, every_n_train_steps=2)]).fit(model, loader())
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == ids


def test_validation_sees_the_projected_weights(tmp_path):
    class Recording(TinyCNN):
        def validation_step(self, batch, batch_idx):
            self.val_logits = self(batch[0]).detach().clone()

    model = Recording()
    callback = LowRankProjection("svd", 1, every_n_train_steps=3, final_projection=False, bn_recalibration_batches=0,
                                 objective="weight")  # factorize below truncates the weights as they are
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=7, limit_val_batches=1,
                           num_sanity_val_steps=0)
    trainer.fit(model, loader(), loader(32, batch_size=32, seed=1))
    x, _ = next(iter(loader(32, batch_size=32, seed=1)))
    weights_after_fit = model.net[2].weight.detach().clone()
    assert torch.linalg.matrix_rank(weights_after_fit.flatten(1)).item() > 1, "training weights stay unprojected"

    small = factorize(model, "svd", rank=callback.ranks).eval()
    with torch.no_grad():
        factorized_logits, dense_logits = small(x), model.eval()(x)
    assert (model.val_logits - factorized_logits).abs().max().item() < 1e-5
    assert (model.val_logits - dense_logits).abs().max().item() > 1e-3, "projection changes the logits measurably"
    assert torch.equal(model.net[2].weight, weights_after_fit)


@pytest.mark.parametrize("rule", [dict(rank=0.5), dict(rank=Budget(2.0, reallocations=4)),
                                  dict(rank=0.5, objective=Activation(bn_weighting=True)),
                                  dict(rank=0.5, objective="activation", final_phase=0.25)])
def test_resume_between_projections_matches_uninterrupted_run(tmp_path, rule):
    """Under the activation objective the checkpoint at step 8 lies inside the statistics window of the
    projection at step 9 (steps 8 and 9): what step 8's passes recorded travels in it."""
    def make():
        torch.manual_seed(0)
        return TinyCNN()

    def run(model, root, **kwargs):
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        callback = LowRankProjection("svd", every_n_train_steps=3, **rule)
        trainer = quiet_trainer(root, [callback, checkpoint], max_epochs=3, enable_checkpointing=True, **kwargs)
        return trainer, callback

    full_model = make()
    trainer, full_callback = run(full_model, tmp_path / "full")
    trainer.fit(full_model, loader())

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 5:
                raise RuntimeError("simulated crash")

    crashed_model = make()
    trainer, _ = run(crashed_model, tmp_path / "crash")
    trainer.callbacks.append(Crash())
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(crashed_model, loader())
    checkpoint = next((tmp_path / "crash").glob("epoch=0*.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("LowRankProjection"))
    assert saved["last_step"] == 8 and saved["projections"] == 2  # epoch end at step 8: between projections 6 and 9
    assert list(saved["statistics_window"]) == ([8] if "objective" in rule else [])

    resumed_model = make()
    trainer, callback = run(resumed_model, tmp_path / "resume")
    trainer.fit(resumed_model, loader(), ckpt_path=checkpoint)
    assert callback.num_projections == full_callback.num_projections == (8 if "final_phase" not in rule else 12)
    assert callback.ranks == full_callback.ranks
    assert callback.final_phase_start == full_callback.final_phase_start
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_rank_warmup_anneals_down_to_target():
    callback = LowRankProjection("tucker2", 0.25, every_n_train_steps=1, rank_warmup=3)
    callback.projector.resolve(TinyCNN())
    schedule = [[p.rank for p in annealed_plans(callback.plans, callback.options, i, 3)] for i in range(5)]
    assert schedule[3] == schedule[4] == [p.rank for p in callback.plans]
    for layer in range(2):
        out_ranks = [ranks[layer][1] for ranks in schedule]
        assert out_ranks == sorted(out_ranks, reverse=True)
        assert out_ranks[0] > out_ranks[3]


class EveryStepsProbe(L.Callback):
    """``records``: ``record(pl_module)`` after each optimizer step that is a multiple of ``every``."""

    def __init__(self, every, record):
        self.every, self.record, self.records = every, record, []

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step % self.every == 0:
            self.records.append(self.record(pl_module))


def test_rank_warmup_trains_through_annealed_ranks(tmp_path):
    probe = EveryStepsProbe(2, lambda module: [torch.linalg.matrix_rank(module.net[i].weight.detach().flatten(1)).item()
                                               for i in (2, 5)])
    callback = LowRankProjection("svd", 2, every_n_train_steps=2, rank_warmup=3)
    quiet_trainer(tmp_path, [callback, probe], max_epochs=1).fit(TinyCNN(), loader())
    # full rank 12, target 2: 2 + floor(10 * (1 - (i + 1) / 4) ** 3) for projections i = 0, 1, 2
    assert probe.records == [[6, 6], [3, 3], [2, 2], [2, 2]]
    assert callback.num_projections == 4


class MomentumProbe(L.Callback):
    """Records the SGD momentum buffers of conv2/conv3 (projected) and the head (not) after each optimizer step."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        state = trainer.optimizers[0].state
        layers = (pl_module.net[2], pl_module.net[5], pl_module.net[9])
        self.norms.append([state[layer.weight]["momentum_buffer"].norm().item() for layer in layers])


@pytest.mark.parametrize("reset", [False, True])
def test_reset_momentum_zeroes_only_projected_weights_at_projections(tmp_path, reset):
    callback = LowRankProjection("svd", 2, every_n_train_steps=3, reset_momentum=reset)
    probe = MomentumProbe()
    quiet_trainer(tmp_path, [callback, probe]).fit(TinyCNN(), loader())
    for step, (conv2, conv3, head) in enumerate(probe.norms, start=1):
        assert head > 0
        zeroed = reset and step % 3 == 0
        assert (conv2 == 0 and conv3 == 0) == zeroed, (step, conv2, conv3)


def test_logged_projection_metrics_match_the_singular_values(tmp_path):
    before = EveryStepsProbe(4, lambda module: [module.net[i].weight.detach().clone() for i in (2, 5)])
    class LossLogging(TinyCNN):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("loss_at_step", float(self.trainer.global_step + 1))
            return loss

    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    callback = LowRankProjection("svd", 2, every_n_train_steps=4, objective="weight")  # the weights' spectrum
    trainer = quiet_trainer(tmp_path, [before, callback], logger=logger, log_every_n_steps=1)
    trainer.fit(LossLogging(), loader())
    with (tmp_path / "lightning_logs/version_0/metrics.csv").open() as handle:
        table = list(csv.DictReader(handle))
    logged = [row for row in table if row["lowrank/rel_error"]]
    rows = [row for i, row in enumerate(logged) if i == 0 or row["lowrank/seconds"] != logged[i - 1]["lowrank/seconds"]]
    lightning_step = {float(row["loss_at_step"]): int(row["step"]) for row in table if row["loss_at_step"]}
    assert [int(row["step"]) for row in rows] == [lightning_step[s] for s in (4, 8, 12, 16)], \
        "each projection first logged on the logging step Lightning gives the batch of optimizer steps 4, 8, 12, 16"
    assert [float(row["lowrank/seconds"]) for row in rows] == pytest.approx([h["seconds"] for h in callback.history])
    assert trainer.callback_metrics["lowrank/rel_error"].item() == pytest.approx(float(rows[-1]["lowrank/rel_error"]))
    assert len(before.records) == 4
    compression = (12 * 72 + 12 * 108) / (2 * (12 + 72) + 2 * (12 + 108))
    for row, weights in zip(rows, before.records):
        squares = [torch.linalg.svdvals(w.flatten(1)).pow(2) for w in weights]
        errors = [(s[2:].sum() / s.sum()).sqrt().item() for s in squares]
        energies = [(s[:2].sum() / s.sum()).item() for s in squares]
        assert float(row["lowrank/rel_error"]) == pytest.approx(sum(errors) / 2, rel=1e-4)
        assert float(row["lowrank/energy"]) == pytest.approx(sum(energies) / 2, rel=1e-4)
        assert float(row["lowrank/compression"]) == pytest.approx(compression, rel=1e-6)
        assert 0 < float(row["lowrank/seconds"]) < 10


def test_plan_table_printed_at_fit_start(tmp_path, caplog):
    callback = LowRankProjection("svd", 2, every_n_train_steps=4)
    with caplog.at_level("INFO"):
        quiet_trainer(tmp_path, [callback], max_epochs=1).fit(TinyCNN(), loader())
    text = caplog.text
    assert "net.2" in text and "net.5" in text and "first conv" in text and "total" in text


class Diverging(TinyCNN):
    """Multiplies the loss by ``factor`` (NaN or Inf) in the training steps taken at the given ``global_step``s,
    and records the ``global_step`` of every training step it runs."""

    def __init__(self, bad_steps, factor=float("nan")):
        super().__init__()
        self.bad_steps, self.factor, self.steps = set(bad_steps), factor, []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.steps.append(self.global_step)
        return loss * self.factor if self.global_step in self.bad_steps else loss


def test_non_finite_loss_stops_with_step(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match=r"nan at optimizer step 3\..*HINT"):
        quiet_trainer(tmp_path, [LowRankProjection("svd", 2, every_n_train_steps=4)]).fit(Diverging(range(2, 99)),
                                                                                          loader())


def test_a_loss_that_diverges_between_projections_is_named_at_its_first_step_within_the_check_period(tmp_path):
    from lrlightning.training.divergence import FINITE_CHECK_STEPS

    model = Diverging((5, 6), float("inf"))
    callback = LowRankProjection("svd", 2, every_n_train_steps=1000, final_projection=False,
                                 validate_projected=False)
    with pytest.raises(NonFiniteTrainingError, match=r"became (inf|nan) at optimizer step 6\..*HINT"):
        quiet_trainer(tmp_path, [callback], max_epochs=100).fit(model, loader())
    assert max(model.steps) < FINITE_CHECK_STEPS  # stopped at the first read, not at the (far) next projection
    # a new fit starts with a clean record, its sanity check included
    quiet_trainer(tmp_path, [callback], max_steps=4).fit(TinyCNN(), loader(), loader(16))


def test_a_diverged_loss_is_named_before_validation_sees_the_weights(tmp_path):
    model = Diverging([1])
    callback = LowRankProjection("svd", 2, every_n_train_steps=1000, final_projection=False)
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1, limit_val_batches=1, val_check_interval=3,
                           num_sanity_val_steps=0)
    with pytest.raises(NonFiniteTrainingError, match=r"nan at optimizer step 2\."):
        trainer.fit(model, loader(), loader())
    assert model.steps == [0, 1, 2] and not model.val_acc  # stopped when validation began, after step 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_recording_the_loss_never_waits_for_the_device():
    callback = LowRankProjection("svd", 2)
    loss = torch.tensor(0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 5):
            callback.projector.losses.add(loss * (float("nan") if step == 3 else 1.0), step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(NonFiniteTrainingError, match=r"nan at optimizer step 3\."):
        callback.projector.losses.check()


def test_non_finite_weight_names_layer_and_step(tmp_path):
    class Poison(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                with torch.no_grad():
                    pl_module.net[5].weight[0, 0, 0, 0] = float("inf")

    callback = LowRankProjection("svd", 2, every_n_train_steps=4)
    with pytest.raises(NonFiniteTrainingError, match=r"'net\.5'.*optimizer step 4"):
        quiet_trainer(tmp_path, [Poison(), callback]).fit(TinyCNN(), loader())


def test_bf16_true_precision_keeps_dtype(tmp_path):
    model = TinyCNN()
    callback = LowRankProjection("svd", 2, every_n_train_steps=2)
    quiet_trainer(tmp_path, [callback], precision="bf16-true", max_epochs=1).fit(model, loader())
    weight = model.net[2].weight
    assert weight.dtype == torch.bfloat16
    singular_values = torch.linalg.svdvals(weight.detach().float().flatten(1))
    assert singular_values[2] < 1e-2 * singular_values[0], "rank 2 up to bf16 rounding"


def test_two_instances_coexist_and_pickle(tmp_path):
    first = LowRankProjection("svd", 2, every_n_train_steps=2, layers=Selection(include="net.2"))
    second = LowRankProjection("tucker2", 0.5, every_n_train_steps=3, layers={"include": "net.5"})
    assert first.state_key != second.state_key
    model = TinyCNN()
    trainer = quiet_trainer(tmp_path, [first, second], max_epochs=1)
    trainer.fit(model, loader())
    assert [p.name for p in first.plans] == ["net.2"] and [p.name for p in second.plans] == ["net.5"]
    assert torch.linalg.matrix_rank(model.net[2].weight.detach().flatten(1)).item() == 2
    clone = pickle.loads(pickle.dumps(first))
    assert clone.ranks == first.ranks and clone.state_dict() == first.state_dict()


def test_restored_ranks_win_over_rule():
    callback = LowRankProjection("svd", Energy(0.5), every_n_train_steps=2)
    callback.load_state_dict({"last_step": 4, "projections": 2, "ranks": {"net.2": 3, "net.5": 5}})
    callback.projector.resolve(TinyCNN())
    assert callback.ranks == {"net.2": 3, "net.5": 5}
    assert callback.state_dict() == {"last_step": 4, "projections": 2, "ranks": {"net.2": 3, "net.5": 5},
                                     "final_phase_start": None, "statistics_window": {}}
    callback.load_state_dict({})  # a checkpoint without the callback's state: a fresh start under the rule
    callback.projector.resolve(TinyCNN())
    assert callback.state_dict()["last_step"] == 0 and callback.num_projections == 0
    fresh = LowRankProjection("svd", Energy(0.5), every_n_train_steps=2)
    fresh.projector.resolve(TinyCNN())
    assert callback.ranks == fresh.ranks != {"net.2": 3, "net.5": 5}


def test_sharded_strategy_rejected():
    fake_trainer = type("FakeTrainer", (), {"strategy": type(SHARDED_STRATEGIES[0], (), {})()})()
    with pytest.raises(NotImplementedError, match="FSDPStrategy"):
        LowRankProjection("svd", 2).setup(fake_trainer, TinyCNN(), "fit")


def test_no_layer_selected_lists_candidates(tmp_path):
    callback = LowRankProjection("svd", 2, layers=Selection(include="backbone.*"))
    with pytest.raises(ValueError, match=r"no layer selected.*net\.0"):
        quiet_trainer(tmp_path, [callback], max_epochs=1).fit(TinyCNN(), loader())


def test_rank_above_full_rank_is_clamped_with_warning(tmp_path):
    callback = LowRankProjection("tucker2", (100, 3), every_n_train_steps=2, layers=Selection(include="net.5"))
    with pytest.warns(UserWarning, match=r"rank \(100, 3\) of layer 'net\.5'.*clamped to \(12, 3\)"):
        callback.projector.resolve(TinyCNN())


@pytest.mark.parametrize("kwargs, match", [
    ({"scheme": "cp", "rank": 2}, r"`scheme` must be one of .* or a configured Scheme .* got 'cp'"),
    ({"rank": 0}, r"`rank` must be .* got 0"),
    ({"rank": 1.5}, r"`rank` .* \(0, 1\], got 1.5"),
    ({"rank": 2, "every_n_train_steps": 0}, r"`every_n_train_steps` must be an int >= 1, got 0"),
    ({"rank": 2, "every_n_train_steps": 2.5}, r"`every_n_train_steps` must be an int >= 1, got 2.5"),
    ({"rank": 2, "start_step": -1}, r"`start_step` must be an int >= 0, got -1"),
    ({"rank": 2, "start_step": 5, "stop_step": 2}, r"`stop_step` must be None or an int >= `start_step` \(5\), got 2"),
    ({"rank": 2, "rank_warmup": -2}, r"`rank_warmup` must be an int >= 0, got -2"),
    ({"rank": 2, "reset_momentum": "yes"}, r"`reset_momentum` must be a bool, got 'yes'"),
    ({"scheme": "tiled_svd", "rank": 2}, r"`scheme`='tiled_svd' needs options of its own .*tile_shape.*TiledSVD"),
    ({"rank": 2, "objective": {"batches": 0}}, r"`Activation.batches` must be an int >= 1, got 0"),
    ({"rank": 2, "layers": {"include": 3}}, r"`Selection.include` must be a glob pattern .* got 3"),
    ({"rank": 2, "layers": Solver()}, r"`layers` must be a Selection or a mapping of its fields, got Solver"),
    ({"rank": 2, "solver": {"driver": "lapack"}}, r"`Solver.driver` must be one of .* got 'lapack'"),
    ({"rank": None}, r"`rank` must be .* Energy\(fraction\), Compression\(factor\) or Budget"),
    ({"rank": 2, "loss_jump_batches": -1}, r"`loss_jump_batches` must be an int >= 0, got -1"),
    ({"rank": 2, "objective": "outputs"}, r"`objective` must be 'weight', 'activation' or Activation\(.*got 'outputs'"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankProjection(**kwargs)


@pytest.mark.parametrize("rule", [dict(rank=2), dict(rank=Budget(2.0, reallocations=2)),
                                  dict(rank=2, objective="activation", final_phase=2)])
@pytest.mark.slow  # two spawned processes
def test_ddp_two_processes_hold_identical_weights(tmp_path, rule):
    model = TinyCNN()
    callback = LowRankProjection("svd", every_n_train_steps=2, final_projection=False, **rule)
    skew = [SkewedRankOne()] if isinstance(rule["rank"], Budget) else []  # rank 1's own allocation would differ from rank 0's
    check = SameWeightsCheck(str(tmp_path / "spread.txt"))
    trainer = ddp_trainer(tmp_path, [*skew, callback, check], max_epochs=1, limit_train_batches=4)
    trainer.fit(model, loader())
    spreads = [float(v) for v in (tmp_path / "spread.txt").read_text().split()]
    assert len(spreads) == 2
    assert max(spreads) == 0.0
    ranks = (tmp_path / "spread.txt.ranks").read_text().splitlines()
    assert len(ranks) == 2 and ranks[0] == ranks[1]


class SkewedRankOne(L.Callback):
    """On global rank 1, before each batch: scale conv2's leading singular direction up and conv3's down."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1:
            with torch.no_grad():
                for index, scale in ((2, 5.0), (5, 0.2)):
                    weight = pl_module.net[index].weight
                    u, s, vh = torch.linalg.svd(weight.flatten(1), full_matrices=False)
                    s[0] *= scale
                    weight.copy_(((u * s) @ vh).reshape(weight.shape))


class SameWeightsCheck(L.Callback):
    """After the projection at step 2 and at the end, the spread of conv weights across ranks (rank 0 writes)."""

    def __init__(self, path):
        self.path = path
        self.spreads = []

    def record(self, trainer, pl_module):
        vector = torch.cat([pl_module.net[i].weight.detach().flatten() for i in (2, 5)])
        gathered = [torch.empty_like(vector) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, vector)
        gathered = torch.stack(gathered)
        self.spreads.append((gathered.max(0).values - gathered.min(0).values).abs().max().item())
        assert math.isfinite(self.spreads[-1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            self.record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.record(trainer, pl_module)
        projection = next(c for c in trainer.callbacks if isinstance(c, LowRankProjection))
        ranks = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, sorted(projection.ranks.items()))
        if trainer.is_global_zero:
            with open(self.path, "w") as handle:
                handle.write(" ".join(map(str, self.spreads)))
            with open(self.path + ".ranks", "w") as handle:
                handle.write("\n".join(map(str, ranks)))


def test_callback_copy_is_independent():
    callback = LowRankProjection("svd", 2)
    callback.load_state_dict({"last_step": 4, "projections": 2, "ranks": {"net.2": 3, "net.5": 2}})
    callback.projector.resolve(TinyCNN())
    plans, state = list(callback.plans), callback.state_dict()
    clone = copy.deepcopy(callback)
    clone.plans.clear()  # changed in place: a shallow copy would share the list
    clone.load_state_dict({"last_step": 9, "projections": 5, "ranks": {"net.2": 1}})
    clone.projector.resolve(TinyCNN())
    assert callback.plans == plans and callback.state_dict() == state
    assert clone.ranks == {"net.2": 1} and clone.state_dict()["last_step"] == 9


def test_final_projection_recalibrates_batchnorm_on_projected_weights(tmp_path):
    model = TinyCNN()
    data = loader()
    callback = LowRankProjection("svd", 2, every_n_train_steps=5, bn_recalibration_batches=3)
    trainer = quiet_trainer(tmp_path, [callback])
    trainer.fit(model, data)

    expected = copy.deepcopy(model)
    expected.net[3].reset_running_stats()
    expected.net[3].momentum = None
    generator = torch.Generator().manual_seed(trainer.global_step)
    replay = DataLoader(data.dataset, batch_size=8, shuffle=True, generator=generator)
    expected.train()
    with torch.no_grad():
        for x, _ in list(replay)[:3]:
            expected(x)
    assert torch.allclose(model.net[3].running_mean, expected.net[3].running_mean, atol=1e-6)
    assert torch.allclose(model.net[3].running_var, expected.net[3].running_var, atol=1e-6)
    assert model.net[3].momentum == 0.1


def test_projected_validation_restores_weights_and_batchnorm(tmp_path):
    class Snapshot(L.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    class During(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            self.rank = torch.linalg.matrix_rank(pl_module.net[2].weight.detach().flatten(1)).item()
            self.running_mean = pl_module.net[3].running_mean.clone()

    class After(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            self.after = {k: v.clone() for k, v in pl_module.state_dict().items()}

    snapshot, during, after = Snapshot(), During(), After()
    callback = LowRankProjection("svd", 2, every_n_train_steps=3, bn_recalibration_batches=2)
    trainer = quiet_trainer(tmp_path, [snapshot, callback, during, after], max_epochs=1, limit_train_batches=4,
                           limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(TinyCNN(), loader(), loader(16, seed=2))
    assert torch.linalg.matrix_rank(snapshot.before["net.2.weight"].flatten(1)).item() > 2
    assert during.rank == 2, "validation ran on projected weights"
    assert not torch.allclose(during.running_mean, snapshot.before["net.3.running_mean"]), "statistics re-estimated"
    for name, value in snapshot.before.items():
        assert torch.equal(value, after.after[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fit_ends_low_rank_and_factorizes_exactly(tmp_path):
    model = TinyCNN()
    callback = LowRankProjection("tucker2", (3, 4), every_n_train_steps=3, reset_momentum=True,
                                 bn_recalibration_batches=2)
    quiet_trainer(tmp_path, [callback], accelerator="gpu").fit(model, loader())
    model = model.cuda().eval()
    for plan in callback.plans:
        w = model.get_submodule(plan.name).weight.detach()
        assert w.is_cuda
        assert torch.linalg.matrix_rank(w.flatten(1)).item() == 4
    ranks = {name.removeprefix("net."): rank for name, rank in callback.ranks.items()}
    small = factorize(model.net, "tucker2", rank=ranks).eval()
    x = torch.randn(16, 3, 8, 8, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-4, rtol=1e-4)


def first_item_forward(module, batch):
    """A ``recalibration_step`` given to LightningCLI by its import path."""
    module(batch[0])


def test_lightning_cli_sets_every_option(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(f"""
trainer:
  default_root_dir: {tmp_path}
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  max_epochs: 1
  callbacks:
    - class_path: lrlightning.LowRankProjection
      init_args:
        scheme:
          class_path: lrlightning.TiledSVD
          init_args: {{tile_shape: [6, 27]}}
        rank: {{net.2: 2, net.5: 3}}
        every_n_train_steps: 2
        start_step: 1
        stop_step: 5
        final_phase: 3
        final_projection: true
        validate_projected: false
        rank_warmup: 1
        reset_momentum: true
        bn_recalibration_batches: 2
        recalibration_step: test_callback.first_item_forward
        check_finite: false
        objective:
          class_path: lrlightning.Activation
          init_args: {{batches: 3, ridge: 0.05}}
        layers: {{exclude: [net.0], linear: false, skip_first_conv: false}}
        solver: {{driver: gram, device: cpu}}
        loss_jump_batches: 1
""")
    cli = LightningCLI(TinyCNN, args=["--config", str(config)], run=False, save_config_callback=None)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, LowRankProjection))
    assert callback.options == LowRankOptions(TiledSVD(tile_shape=(6, 27)), {"net.2": 2, "net.5": 3},
                                              Activation(batches=3, ridge=0.05),
                                              Selection(exclude=("net.0",), skip_first_conv=False),
                                              Solver(driver="gram", device="cpu"))
    assert (callback.every_n_train_steps, callback.start_step, callback.stop_step, callback.rank_warmup) == (2, 1, 5, 1)
    assert callback.reset_momentum and not callback.validate_projected and not callback.check_finite
    assert callback.recalibration_step is first_item_forward and callback.bn_recalibration_batches == 2
    assert callback.loss_jump_batches == 1 and callback.final_phase == 3
    cli.trainer.fit(cli.model, loader())
    assert callback.ranks == {"net.2": 2, "net.5": 3}

    def from_flags(*flags):
        cli = LightningCLI(TinyCNN, run=False, save_config_callback=None, args=[
            "--trainer.logger=false", "--trainer.callbacks+=lrlightning.LowRankProjection", *flags])
        return next(c for c in cli.trainer.callbacks if isinstance(c, LowRankProjection))

    callback = from_flags("--trainer.callbacks.scheme=lrlightning.Tucker2", "--trainer.callbacks.scheme.hooi_iters=1",
                          "--trainer.callbacks.rank=lrlightning.Energy", "--trainer.callbacks.rank.fraction=0.9",
                          "--trainer.callbacks.layers.include=[net.5]", "--trainer.callbacks.layers.linear=true")
    assert callback.options == LowRankOptions(Tucker2(hooi_iters=1), Energy(0.9), layers=Selection(("net.5",), linear=True))
    callback = from_flags("--trainer.callbacks.rank={class_path: lrlightning.Budget, init_args: {factor: 3.5, "
                          "metric: macs, input_shape: [3, 8, 8], reallocations: 2}}")
    assert callback.options == LowRankOptions("svd", Budget(3.5, metric="macs", input_shape=(3, 8, 8), reallocations=2))
    assert callback.budget_reallocations == 2
    assert from_flags("--trainer.callbacks.scheme=spatial_svd", "--trainer.callbacks.rank=4").options == \
        LowRankOptions("spatial_svd", 4)
    assert from_flags().options == LowRankOptions()  # every default: svd at Compression(2.0), the weight objective


def mean_loss(model, step, count=2):
    """Mean cross-entropy of ``model`` (train mode, no grad) on the ``count`` batches drawn with seed ``step``."""
    from lrlightning.training.recalibration import reshuffled

    with torch.no_grad():
        model.train()
        return sum(nn.functional.cross_entropy(model(x), y).item()
                   for x, y in reshuffled(loader(), count, seed=step)) / count


class LossBeforeProjection(L.Callback):
    """At the end of step 8, before the projection callback that follows it, the loss ``mean_loss`` measures."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 8:
            self.loss = mean_loss(pl_module, 8)


def test_loss_jump_is_the_training_loss_just_before_and_after_the_projection(tmp_path):
    model = TinyCNN()
    probe = LossBeforeProjection()
    callback = LowRankProjection("svd", 2, every_n_train_steps=8, final_projection=False, validate_projected=False,
                                 loss_jump_batches=2)
    quiet_trainer(tmp_path, [probe, callback], max_epochs=1).fit(model, loader())
    (entry,) = callback.history
    assert entry["step"] == 8
    assert entry["loss_before"] == pytest.approx(probe.loss, rel=1e-5)
    assert entry["loss_after"] == pytest.approx(mean_loss(model, 8), rel=1e-5)  # the projected weights are the last
    assert entry["loss_after"] != pytest.approx(entry["loss_before"], rel=1e-4)
    assert "output_rel_error" in entry  # measured on the same batches under the weight objective


def test_loss_jump_needs_automatic_optimization(tmp_path):
    callback = LowRankProjection("svd", 2, every_n_train_steps=2, loss_jump_batches=1)
    with pytest.raises(ValueError, match=r"`loss_jump_batches`=1 .* ManualTinyCNN uses manual optimization"):
        quiet_trainer(tmp_path, [callback]).fit(ManualTinyCNN(), loader())


class SpareConvCNN(TinyCNN):
    """``TinyCNN`` holding a conv its forward never runs."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Conv2d(12, 12, 3)


def test_the_activation_objective_refuses_a_layer_the_forward_skips_at_train_start(tmp_path):
    callback = LowRankProjection("svd", 2, every_n_train_steps=2, objective="activation")
    with pytest.raises(ValueError, match=r"does not run \['spare'\]"):
        quiet_trainer(tmp_path, [callback]).fit(SpareConvCNN(), loader())


class StatisticsRecordingProjector(Projector):
    """Keeps the statistics of conv ``net.2`` that every rank gathered, after the DDP sum."""

    def statistics(self, model, passes, seed, count=None):
        statistics = super().statistics(model, passes, seed, count)
        if statistics:
            layer = statistics["net.2"]
            vector = torch.cat([layer.moment_sum.flatten(), layer.rows.view(1)]).float()
            gathered = [torch.empty_like(vector) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, vector)
            self.seen.append(torch.stack(gathered))
        return statistics


class StatisticsRecorder(LowRankProjection):
    """Writes (global rank 0) what ``StatisticsRecordingProjector`` kept."""

    def __init__(self, path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path = path
        self.projector.__class__ = StatisticsRecordingProjector
        self.projector.seen = []

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero:
            torch.save(self.projector.seen, self.path)


@pytest.mark.slow  # two spawned processes
def test_ddp_processes_sum_their_input_statistics(tmp_path):
    path = str(tmp_path / "statistics.pt")
    callback = StatisticsRecorder(path, "svd", 2, every_n_train_steps=2, final_projection=False,
                                  objective=Activation(batches=2, observe_training=False))
    trainer = ddp_trainer(tmp_path, [callback], max_epochs=1, limit_train_batches=2)
    torch.manual_seed(0)
    model = ScaledOnRankOne()
    initial = copy.deepcopy(model.net)
    trainer.fit(model, loader())
    seen = torch.load(path)
    assert len(seen) == 2  # the check at train start (1 batch, initial weights) and the projection at step 2
    for gathered in seen:
        assert torch.equal(gathered[0], gathered[1])  # every process holds the same sums
    from lrlightning.activations import ROWS_PER_FEATURE, input_statistics
    from lrlightning.training.recalibration import reshuffled

    drawn = [next(iter(reshuffled(loader(), 1, seed=rank)))[0] for rank in (0, 1)]  # step 0: seed 0 · 2 + rank
    assert not torch.equal(drawn[0], drawn[1])  # each process draws its own batches
    expected = sum(input_statistics(initial, ["2"], [x * scale], seed=0)["2"].moment_sum  # the rows each rank drew
                   for x, scale in zip(drawn, (1.0, 3.0)))
    torch.testing.assert_close(seen[0][0, :-1].double(), expected.flatten(), rtol=1e-4, atol=1e-3)
    rows = min(8 * 64, ROWS_PER_FEATURE * 72)  # a batch's rows of conv net.2: all of them, or fewer drawn
    assert seen[0][0, -1].item() == 2 * rows and seen[1][0, -1].item() == 2 * 2 * rows  # rows of both ranks


def test_the_sanity_check_validates_weights_projected_from_training_statistics(tmp_path):
    """Before training, the training loader is loaded for the statistics (Lightning loads it lazily)."""
    model = TinyCNN()
    callback = LowRankProjection("svd", 2, every_n_train_steps=4, objective="activation")
    trainer = quiet_trainer(tmp_path, [callback], limit_val_batches=1, num_sanity_val_steps=1, max_epochs=1)
    trainer.fit(model, loader(), loader())
    assert len(model.val_acc) == 2  # the sanity check and the epoch's validation, both on projected weights
    assert callback.num_projections == 2


def test_the_callback_factorizes_and_saves_what_it_trained(tmp_path):
    from lrlightning import load_factorized

    model = TinyCNN()
    callback = LowRankProjection(TiledSVD(tile_shape=(6, 27)), 2, every_n_train_steps=4)
    with pytest.raises(ValueError, match=r"no plans yet: fit with the callback first"):
        callback.factorize(model)
    quiet_trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    small = callback.factorize(model).eval()
    head = callback.factorize(model.net).eval()  # a submodule: the plans named relative to it
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(head(x), model.net(x), atol=1e-5, rtol=1e-4)
    assert type(small.net[2]) is not nn.Conv2d and type(small.net[0]) is nn.Conv2d
    path = tmp_path / "small.pt"
    callback.save(model.net, path)
    with torch.no_grad():
        torch.testing.assert_close(load_factorized(path, TinyCNN().net).eval()(x), model.net(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"`model` \(Sequential\) does not hold the planned layers \['net.2', 'net.5'\]"):
        callback.factorize(nn.Sequential(nn.Conv2d(3, 4, 3)))

    restored = LowRankProjection(TiledSVD(tile_shape=(6, 27)), 2, every_n_train_steps=4)  # another process
    restored.load_state_dict(pickle.loads(pickle.dumps(callback)).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored.factorize(model).eval()(x), model(x), atol=1e-5, rtol=1e-4)


def test_no_arguments_project_every_conv_but_the_first_at_half_the_parameters(tmp_path):
    model = TinyCNN()
    callback = LowRankProjection(every_n_train_steps=4)
    assert callback.options == LowRankOptions("svd", Compression(2.0), "weight")
    quiet_trainer(tmp_path, [callback], max_epochs=1).fit(model, loader())
    assert [p.name for p in callback.plans] == ["net.2", "net.5"]
    assert all(2 * p.params_factorized <= p.params_dense for p in callback.plans)
    for plan in callback.plans:
        w = model.get_submodule(plan.name).weight.detach().flatten(1)
        assert torch.linalg.matrix_rank(w).item() == plan.rank < min(w.shape)


def test_a_subclass_schedule_decides_the_projection_steps(tmp_path):
    class OddSteps(CountingProjection):
        def should_project(self, step):
            return step % 2 == 1

    callback = OddSteps("svd", 2, final_projection=False, validate_projected=False)
    quiet_trainer(tmp_path, [callback], max_steps=6).fit(TinyCNN(), loader())
    assert callback.steps == [1, 3, 5] and callback.num_projections == 3
