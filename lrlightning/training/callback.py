"""``LowRankProjection``: the Lightning callback that projects selected weights every S_D optimizer steps."""
from __future__ import annotations

import os
import weakref
from functools import partial
from operator import attrgetter
from typing import Any, Callable

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from ..batchnorm import batchnorm_layers
from .distributed import made_on_rank_zero
from .divergence import LossRecord, NonFiniteTrainingError
from ..export import save_factorized
from ..objectives import WEIGHT, Objective
from ..options import LowRankOptions, Selection, Solver, requested
from .passes import Passes, batch_forward, first_item, trainer_passes
from .projector import Projector
from ..rules import DEFAULT_RULE, RankRule
from .schedule import ProjectionSchedule
from ..schemes import Scheme
from .summary import plan_table

__all__ = ["LowRankProjection", "NonFiniteTrainingError"]

SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
FORWARD_HINT = ("HINT: pass `recalibration_step=` (a function (module, batch) running the forward pass on a "
                "training batch)")
RECALIBRATION_HINT = (f"{FORWARD_HINT}, or set `bn_recalibration_batches=0` to keep the running statistics "
                      "accumulated on the unprojected weights.")


def _delegated(path: str, doc: str | None = None) -> property:
    """A read-only attribute of the callback's ``projector`` (``path``: dotted)."""
    return property(lambda self: attrgetter(path)(self.projector), doc=doc)


class LowRankProjection(Callback):
    r"""Overwrite selected conv (and optionally Linear) weights by their low-rank projection, in place, after
    every ``every_n_train_steps``-th optimizer step (the paper's S_D), so that training ends on exactly low-rank
    weights and ``projection.factorize(model)`` turns them into small layers with identical outputs.
    ``LowRankProjection()`` projects every conv but the first onto ``svd`` at ranks at least 2× smaller, every 200
    steps, keeping the weights (``objective="weight"``).

    Args:
        scheme: a registered name (``"svd"``, ``"tucker2"``, ``"spatial_svd"``) or a configured ``Scheme`` such as
            ``TiledSVD(tile_shape=(32, 32))`` or ``Tucker2(hooi_iters=1)``.
        rank: the rank rule: an int, a fraction in (0, 1], a tucker2 pair, ``{layer name: rank}``, ``Energy``,
            ``Compression`` or ``Budget`` (``lrlightning.rules``; default ``Compression(2.0)``), resolved when fit
            starts and kept in ``ranks`` and in checkpoints, so that export and resume use the same ranks.
        every_n_train_steps, start_step, stop_step, final_phase, rank_warmup: the schedule
            (``lrlightning.training.schedule.ProjectionSchedule``), in optimizer steps: S_D, after steps
            ``start_step + j * S_D > 0`` up to ``stop_step``, then after every step of the final phase (a fraction
            in (0, 1) of ``trainer.estimated_stepping_batches``, or a step count; kept in checkpoints).
        final_projection: project once more when training ends, so the final weights are exactly low-rank.
        validate_projected: validation during fit sees the projected weights, then training resumes unprojected.
        reset_momentum: zero the optimizers' first moments (``momentum_buffer``, ``exp_avg``) of the projected
            weights after each periodic projection before the final phase.
        bn_recalibration_batches: re-estimate BatchNorm statistics over this many training batches after each
            projection whose weights are evaluated (validation, the final projection); 0 keeps them (default 20).
        recalibration_step: ``(module, batch)``, a forward pass where ``module(batch[0])``/``training_step`` won't do.
        check_finite: stop with ``NonFiniteTrainingError`` when the loss or a selected weight becomes NaN/Inf.
        objective: ``"weight"`` (default), ``"activation"`` or ``Activation(batches=2, ridge=1e-2)``: keep each
            layer's outputs on the training batches of the steps before each projection, recorded on the training
            step's own forward passes (``Activation.observe_training``; ``lrlightning.objectives``).
        layers: which layers are projected (``Selection``: include, exclude, linear, skip_first_conv).
        solver: how and where projections decompose (``Solver``: driver, device).
        options: ``scheme``, ``rank``, ``objective``, ``layers`` and ``solver`` in one ``LowRankOptions``.
        loss_jump_batches: when > 0, log the training loss on this many batches just before and after each
            periodic projection, and the output-space error (automatic optimization only; default 0).

    Batches of passes are drawn with the optimizer step as seed (under DDP each process draws its own; statistics
    are summed or averaged, rank 0's projected weights shared). Layer names (``plans``, ``ranks``) are those of the
    uncompiled module. With manual optimization every optimizer step counts.

    This callback routes the Trainer's hooks to ``projector`` (``lrlightning.training.projector.Projector``, usable
    without Lightning). Logged with ``pl_module.log_dict`` at each periodic projection (``lowrank/``): ``rel_error``
    and ``energy`` (means over layers), ``compression`` (dense / factorized params of the projected layers),
    ``seconds``, ``output_rel_error`` (input statistics), ``loss_before``/``loss_after`` (``loss_jump_batches``).
    """

    def __init__(self, scheme: Scheme | str = "svd", rank: RankRule = DEFAULT_RULE, every_n_train_steps: int = 200,
                 *, start_step: int = 0, stop_step: int | None = None, final_phase: int | float = 0,
                 final_projection: bool = True, validate_projected: bool = True, rank_warmup: int = 0,
                 reset_momentum: bool = False, bn_recalibration_batches: int = 20,
                 recalibration_step: Callable[[LightningModule, Any], Any] | None = None,
                 check_finite: bool = True, objective: Objective = WEIGHT, layers: Selection | None = None,
                 solver: Solver | None = None, options: LowRankOptions | None = None, loss_jump_batches: int = 0):
        super().__init__()
        for argument, value in (("final_projection", final_projection), ("validate_projected", validate_projected)):
            if not isinstance(value, bool):
                raise ValueError(f"`{argument}` must be a bool, got {value!r}")
        if recalibration_step is not None and not callable(recalibration_step):
            raise ValueError(f"`recalibration_step` must be None or a callable (module, batch), got {recalibration_step!r}")
        schedule = ProjectionSchedule(every_n_train_steps, start_step, stop_step, final_phase, rank_warmup)
        self.projector = Projector(requested(options, scheme, rank, objective, layers, solver), schedule,
                                   reset_momentum=reset_momentum, loss_jump_batches=loss_jump_batches,
                                   recalibration_batches=bn_recalibration_batches, check_finite=check_finite)
        self.final_projection, self.validate_projected = final_projection, validate_projected
        self.recalibration_step, self._trained = recalibration_step, None  # _trained: a weakref to the fitted module
        self._fit: tuple[Passes, Any] | None = None  # this fit's passes and rank-zero runner
        self.projector.warn = rank_zero_warn
        if type(self).should_project is not LowRankProjection.should_project:  # a schedule of the subclass
            self.projector.should_project = self.should_project

    options = _delegated("options", "The ``LowRankOptions``: scheme, rank rule, objective, layers, solver.")
    plans = _delegated("plans", "The ``LayerPlan`` of every projected layer, resolved at fit start.")
    skipped = _delegated("skipped", "The selected layers left dense, with the reason.")
    allocation = _delegated("allocation", "A ``Budget``'s ``Allocation`` (else None).")
    ranks = _delegated("ranks", "``{layer name: rank}`` resolved at fit start (names of the trained module).")
    history = _delegated("history", "The logged metrics of every periodic projection, with its ``step``.")
    last_stats = _delegated("last_stats", "The ``LayerStats`` of the last projection.")
    num_projections = _delegated("projections", "Periodic projections so far.")
    budget_reallocations, final_phase_start = _delegated("budget_reallocations"), _delegated("final_phase_start")
    every_n_train_steps, start_step, stop_step, final_phase, rank_warmup = (_delegated(f"schedule.{name}") for name in (
        "every_n_train_steps", "start_step", "stop_step", "final_phase", "rank_warmup"))
    bn_recalibration_batches, reset_momentum, check_finite, loss_jump_batches = map(_delegated, (
        "recalibration_batches", "reset_momentum", "check_finite", "loss_jump_batches"))

    def __getstate__(self) -> dict[str, Any]:  # the callback pickles; the module does not
        return {**self.__dict__, "_trained": None, "_fit": None}

    @property
    @override
    def state_key(self) -> str:
        scheme, rank = self.options.scheme, self.options.rank
        return self._generate_state_key(scheme=repr(scheme) if scheme.options() else scheme.name,
                                        rank=rank if isinstance(rank, (int, float, tuple, dict)) else repr(rank),
                                        include=self.options.layers.include, exclude=self.options.layers.exclude)

    def should_project(self, step: int) -> bool:
        """Whether to project after optimizer step ``step`` (override for another schedule)."""
        return self.projector.schedule.due(step, self.projector.final_phase_start)

    def in_final_phase(self, step: int) -> bool:
        return self.projector.in_final_phase(step)

    def recalibration_input(self, batch: Any) -> Any:
        """What the module's forward takes from a training batch (default: the first item of a tuple/list)."""
        return first_item(batch)

    def factorize(self, model: nn.Module) -> nn.Module:
        """A factorized copy of ``model`` at this callback's plans: the trained module, or a submodule of it (plans
        named relative to it), or any module whose layers carry the plans' names; ``model`` is untouched."""
        return self.projector.factorize(model, self._trained() if self._trained is not None else None)

    def save(self, model: nn.Module, path: str | os.PathLike, backbone: dict[str, Any] | None = None,
             metadata: dict[str, Any] | None = None) -> None:
        """``save_factorized(self.factorize(model), path, backbone, metadata)``; ``load_factorized`` reads it."""
        save_factorized(self.factorize(model), path, backbone, metadata)

    def _fitting(self, trainer: Trainer, pl_module: LightningModule) -> tuple[Passes, Any]:
        """This fit's ``Passes`` and rank-zero runner (None on one process), built once per fit."""
        if self._fit is None:
            chosen = type(self).recalibration_input is not LowRankProjection.recalibration_input
            forward = batch_forward(self.recalibration_step, self.recalibration_input, chosen)
            self._fit = (trainer_passes(trainer, pl_module, forward), partial(
                made_on_rank_zero, trainer.strategy, trainer.is_global_zero) if trainer.world_size > 1 else None)
        return self._fit

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if stage == "fit" and name in SHARDED_STRATEGIES:
            raise NotImplementedError(f"LowRankProjection does not support the sharded strategy {name}: each rank "
                                      "holds only a shard of every weight. Use DDP, or project after training.")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trained, self.projector.losses, self._fit = weakref.ref(pl_module), LossRecord(), None
        passes, on_rank_zero = self._fitting(trainer, pl_module)
        self.projector.resolve(pl_module, passes, trainer.global_step, on_rank_zero=on_rank_zero)
        rank_zero_info(plan_table(self.plans, self.skipped, self.options.scheme.name, self.allocation))

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        projector, options = self.projector, self.options
        if projector.loss_jump_batches and not pl_module.automatic_optimization:
            raise ValueError(f"`loss_jump_batches`={projector.loss_jump_batches} measures the loss `training_step` "
                             f"returns, which needs automatic optimization; {type(pl_module).__name__} uses manual "
                             "optimization: set `loss_jump_batches=0`")
        manual = 1 if pl_module.automatic_optimization else max(1, len(trainer.optimizers))  # each steps a batch
        projector.start(lambda: trainer.estimated_stepping_batches * manual)
        passes, step = self._fitting(trainer, pl_module)[0], trainer.global_step
        if projector.recalibration_batches and (self.final_projection or self.validate_projected):
            if batchnorm_layers(pl_module):
                passes.check(pl_module, "BatchNorm re-estimation", RECALIBRATION_HINT, step)
        if options.weighted and self.plans:
            passes.check(pl_module, f"objective={options.objective}", FORWARD_HINT + ".", step)
            gathered = projector.statistics(pl_module, passes, step, count=1)
            missing = [p.name for p in self.plans if p.name not in gathered]
            if missing:
                raise ValueError(f"`objective`={options.objective} needs the inputs of every projected layer, "
                                 f"but the forward pass on a training batch does not run {missing}. {FORWARD_HINT}.")
            projector.record_training(pl_module, trainer.accumulate_grad_batches)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.projector.before_batch(trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        passes, on_rank_zero = self._fitting(trainer, pl_module)
        metrics = self.projector.after_step(pl_module, trainer.global_step, passes, loss, trainer.optimizers,
                                            on_rank_zero)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.projector.losses.check()
        if self.final_projection and self.plans:
            self.projector.finish(pl_module, self._fitting(trainer, pl_module)[0], trainer.global_step,
                                  synchronize=True)
        self._fit = None  # its passes hold the trainer

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.projector.losses.check()

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit":
            return
        self.projector.losses.check()  # before validation (and checkpointing or early stopping) sees diverged weights
        if self.validate_projected and self.plans:
            self.projector.evaluate_projected(pl_module, self._fitting(trainer, pl_module)[0], trainer.global_step)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.projector.restore()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.projector.stop()
        self._fit = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.projector.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.projector.load_state_dict(state_dict)
