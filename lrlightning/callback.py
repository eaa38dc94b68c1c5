"""``LowRankProjection``: the Lightning callback that projects selected weights every S_D optimizer steps."""
from __future__ import annotations

import math
import os
import time
import weakref
from functools import partial
from typing import Any, Callable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from .batchnorm import batchnorm_buffers, batchnorm_layers
from .budget import Allocation
from .distributed import broadcast_weights, made_on_rank_zero
from .divergence import FINITE_CHECK_STEPS, LossRecord, NonFiniteTrainingError, divergence_named
from .export import factorize_planned, save_factorized
from .activations import InputRecorder, LayerStatistics
from .names import COMPILED_SEGMENT, canonical_name, named_modules
from .objectives import WEIGHT, Objective
from .options import LowRankOptions, Selection, Solver
from .passes import Passes, module_forward, trainer_passes
from .momentum import zero_first_moments
from .plan import LayerPlan, SkippedLayer, allocate_plan, annealed_plans, frozen_ranks, plans_within
from .projection import LayerStats, project_planned_, weights_channels
from .recalibration import defines_forward
from .rules import DEFAULT_RULE, Budget, RankRule, is_int, is_number
from .schemes import Scheme
from .summary import plan_table, projection_metrics

__all__ = ["LowRankProjection", "NonFiniteTrainingError"]

SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
FORWARD_HINT = ("HINT: pass `recalibration_step=` (a function (module, batch) running the forward pass on a "
                "training batch)")
RECALIBRATION_HINT = (f"{FORWARD_HINT}, or set `bn_recalibration_batches=0` to keep the running statistics "
                      "accumulated on the unprojected weights.")


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
        every_n_train_steps: S_D, in optimizer steps (gradient accumulation does not change the schedule).
        start_step: projections follow optimizer steps ``k = start_step + j * every_n_train_steps > 0``.
        stop_step: no periodic projection after this optimizer step (None: never stop).
        final_phase: project after every optimizer step of the last part of fit: a fraction in (0, 1) of the
            optimizer steps the Trainer will take (``trainer.estimated_stepping_batches``) or a number of steps
            (default 0: none; under manual optimization each optimizer is taken to step once a batch). Resolved
            when fit starts and kept in checkpoints; ``reset_momentum`` skips it.
        final_projection: project once more when training ends, so the final weights are exactly low-rank.
        validate_projected: validation during fit sees the projected weights (the exportable model), then
            training resumes from the unprojected ones.
        rank_warmup: the first ``rank_warmup`` projections anneal the ranks from full down to the target (cubic).
        reset_momentum: zero the optimizers' first moments (``momentum_buffer``, ``exp_avg``) of the projected
            weights after each periodic projection before the final phase.
        bn_recalibration_batches: re-estimate BatchNorm statistics over this many training batches after each
            projection whose weights are evaluated (validation, the final projection); 0 keeps them (default 20).
        recalibration_step: ``(module, batch) -> Any``, a forward pass on a training batch, for modules whose
            batches or forward the default (``module(batch[0])``, else ``training_step``) does not fit.
        check_finite: stop with ``NonFiniteTrainingError`` when the loss or a selected weight becomes NaN/Inf
            (read by the host every ``FINITE_CHECK_STEPS`` steps and before each projection and validation).
        objective: ``"weight"`` (default), ``"activation"`` or ``Activation(batches=2, ridge=1e-2)``: keep each
            layer's outputs on the training batches of the steps before each projection, recorded on the training
            step's own forward passes (``Activation.observe_training``; ``lrlightning.objectives``).
        layers: which layers are projected (``Selection``: include, exclude, linear, skip_first_conv).
        solver: how and where projections decompose (``Solver``: driver, device).
        loss_jump_batches: when > 0, log the training loss on this many batches just before and after each
            periodic projection, and the output-space error (automatic optimization only; default 0).

    Batches of passes are drawn with the optimizer step as seed (under DDP each process draws its own; statistics
    are summed or averaged, rank 0's projected weights shared). Layer names (``plans``, ``ranks``) are those of the
    uncompiled module. With manual optimization every optimizer step counts.

    Logged at each periodic projection (``lowrank/``): ``rel_error`` and ``energy`` (means over layers),
    ``compression`` (dense / factorized params of the projected layers), ``seconds``, with input statistics
    ``output_rel_error``, with ``loss_jump_batches`` ``loss_before`` and ``loss_after``; also in ``history``.
    """

    def __init__(self, scheme: Scheme | str = "svd", rank: RankRule = DEFAULT_RULE, every_n_train_steps: int = 200,
                 *, start_step: int = 0, stop_step: int | None = None, final_phase: int | float = 0,
                 final_projection: bool = True,
                 validate_projected: bool = True, rank_warmup: int = 0, reset_momentum: bool = False,
                 bn_recalibration_batches: int = 20,
                 recalibration_step: Callable[[LightningModule, Any], Any] | None = None,
                 check_finite: bool = True, objective: Objective = WEIGHT, layers: Selection | None = None,
                 solver: Solver | None = None, loss_jump_batches: int = 0):
        super().__init__()
        for argument, value, least in (("every_n_train_steps", every_n_train_steps, 1), ("start_step", start_step, 0),
                                       ("rank_warmup", rank_warmup, 0), ("loss_jump_batches", loss_jump_batches, 0),
                                       ("bn_recalibration_batches", bn_recalibration_batches, 0)):
            if not (is_int(value) and value >= least):
                raise ValueError(f"`{argument}` must be an int >= {least}, got {value!r}")
        if stop_step is not None and not (is_int(stop_step) and stop_step >= start_step):
            raise ValueError(f"`stop_step` must be None or an int >= `start_step` ({start_step}), got {stop_step!r}")
        if not ((is_int(final_phase) and final_phase >= 0) or (is_number(final_phase) and 0 <= final_phase < 1)):
            raise ValueError(f"`final_phase` must be a fraction of training in (0, 1) or a number of optimizer steps "
                             f"(an int >= 0), got {final_phase!r}")
        for argument, value in (("final_projection", final_projection), ("validate_projected", validate_projected),
                                ("reset_momentum", reset_momentum), ("check_finite", check_finite)):
            if not isinstance(value, bool):
                raise ValueError(f"`{argument}` must be a bool, got {value!r}")
        if recalibration_step is not None and not callable(recalibration_step):
            raise ValueError(f"`recalibration_step` must be None or a callable (module, batch), "
                             f"got {recalibration_step!r}")
        self.options = LowRankOptions(scheme, rank, objective, layers, solver)
        self.every_n_train_steps, self.start_step, self.stop_step = every_n_train_steps, start_step, stop_step
        self.final_phase = final_phase
        self.final_projection, self.validate_projected = final_projection, validate_projected
        self.rank_warmup, self.reset_momentum, self.check_finite = rank_warmup, reset_momentum, check_finite
        self.bn_recalibration_batches, self.recalibration_step = bn_recalibration_batches, recalibration_step
        self.loss_jump_batches = loss_jump_batches
        self.plans: list[LayerPlan] = []
        self.skipped: list[SkippedLayer] = []
        self.allocation: Allocation | None = None
        self.last_stats: list[LayerStats] = []
        self.history: list[dict[str, float]] = []
        self._last_step = 0
        self._projections = 0
        self._restored_ranks: dict | None = None
        self._backup: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._losses = LossRecord()
        self._trained: weakref.ref | None = None
        self.final_phase_start: int | None = None  # the final phase projects after every step after this one
        self._recorder: InputRecorder | None = None
        self._generator: torch.Generator | None = None
        self._window: dict[int, dict[str, LayerStatistics]] = {}  # optimizer step -> statistics of its passes
        self._window_steps = 1
        self._recorded_fallback = False
        self._restored_phase: tuple[int | None, dict] | None = None

    def __getstate__(self) -> dict[str, Any]:  # the callback pickles; the module and its hooks do not
        return {**self.__dict__, "_trained": None, "_recorder": None, "_generator": None}

    @property
    @override
    def state_key(self) -> str:
        scheme, rank = self.options.scheme, self.options.rank
        return self._generate_state_key(scheme=repr(scheme) if scheme.options() else scheme.name,
                                        rank=rank if isinstance(rank, (int, float, tuple, dict)) else repr(rank),
                                        include=self.options.layers.include, exclude=self.options.layers.exclude)

    @property
    def ranks(self) -> dict[str, Any]:
        """``{layer name: rank}`` resolved at fit start (names of the trained module)."""
        return frozen_ranks(self.plans)

    @property
    def num_projections(self) -> int:
        return self._projections

    @property
    def budget_reallocations(self) -> int:
        """How many periodic projections allocate a ``Budget`` again first (``Budget.reallocations``; else 0)."""
        return self.options.rank.reallocations if isinstance(self.options.rank, Budget) else 0

    def in_final_phase(self, step: int) -> bool:
        """Whether optimizer step ``step`` lies in the final phase (known once fit has started)."""
        return self.final_phase_start is not None and step > self.final_phase_start

    def should_project(self, step: int) -> bool:
        """Whether to project after optimizer step ``step`` (override for another schedule)."""
        if step > 0 and self.in_final_phase(step):
            return True
        if step <= 0 or step < self.start_step or (self.stop_step is not None and step > self.stop_step):
            return False
        return (step - self.start_step) % self.every_n_train_steps == 0

    def _resolve_final_phase(self, trainer: Trainer) -> None:
        """The final phase's start and the recorded statistics: restored from a checkpoint, else new."""
        restored, self._restored_phase = self._restored_phase, None
        self._window = restored[1] if restored else {}
        self.final_phase_start = restored[0] if restored else None
        if not self.final_phase or self.final_phase_start is not None:
            return
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(f"`final_phase`={self.final_phase!r} needs a finite training length: set the Trainer's "
                             "`max_epochs` or `max_steps`")
        if not trainer.lightning_module.automatic_optimization:  # every optimizer is taken to step once a batch
            total *= max(1, len(trainer.optimizers))
        steps = self.final_phase if is_int(self.final_phase) else round(self.final_phase * total)
        self.final_phase_start = max(0, int(total) - steps)

    def recalibration_input(self, batch: Any) -> Any:
        """What the module's forward takes from a training batch (default: the first item of a tuple/list)."""
        return batch[0] if isinstance(batch, (tuple, list)) and batch else batch

    def factorize(self, model: nn.Module) -> nn.Module:
        """A factorized copy of ``model`` at this callback's plans: the trained module, or a submodule of it (plans
        named relative to it), or any module whose layers carry the plans' names; ``model`` is untouched."""
        plans = self.plans
        if not plans and self._restored_ranks:  # state loaded from a checkpoint, not fitted in this process
            plans = allocate_plan(model, self.options.replace_rank(self._restored_ranks), warn=False)[0]
        trained = self._trained() if self._trained is not None else None
        return factorize_planned(model, plans_within(plans, model, trained), self.options)

    def save(self, model: nn.Module, path: str | os.PathLike, backbone: dict[str, Any] | None = None,
             metadata: dict[str, Any] | None = None) -> None:
        """``save_factorized(self.factorize(model), path, backbone, metadata)``; ``load_factorized`` reads it."""
        save_factorized(self.factorize(model), path, backbone, metadata)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if stage == "fit" and name in SHARDED_STRATEGIES:
            raise NotImplementedError(f"LowRankProjection does not support the sharded strategy {name}: each rank "
                                      "holds only a shard of every weight. Use DDP, or project after training.")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._losses = LossRecord()
        self._trained = weakref.ref(pl_module)
        self._make_plan(pl_module, trainer)
        if trainer.is_global_zero:
            rank_zero_info(plan_table(self.plans, self.skipped, self.options.scheme.name, self.allocation))

    def _make_plan(self, pl_module: LightningModule, trainer: Trainer | None = None, reallocate: bool = False) -> None:
        """Resolve the layers and ranks (restored ranks win unless ``reallocate``); a ``Budget`` under
        torch.distributed is allocated on global rank zero and broadcast; under ``objective="activation"`` from
        the output errors on ``Activation.batches`` training batches."""
        options = self.options
        if self._restored_ranks and not reallocate:
            options = options.replace_rank(self._restored_ranks)
        statistics = None
        if trainer is not None and options.weighted and isinstance(options.rank, Budget):
            passes = self._passes(trainer, pl_module)
            passes.reduce = None  # allocated on global rank zero alone, from its own batches
            statistics = partial(passes.statistics, pl_module, options=options, count=options.objective.batches,
                                 seed=trainer.global_step)
        if trainer is not None and trainer.world_size > 1 and isinstance(options.rank, Budget):
            planned = made_on_rank_zero(trainer.strategy, trainer.is_global_zero,
                                        lambda: allocate_plan(pl_module, options, statistics=statistics))
        else:
            planned = allocate_plan(pl_module, options, statistics=statistics)
        self.plans, self.skipped, self.allocation = planned

    def _forward(self, pl_module: LightningModule, batch: Any, index: int) -> None:
        inputs = None
        if self.recalibration_step is None and defines_forward(pl_module):
            inputs = self.recalibration_input(batch)
            overridden = type(self).recalibration_input is not LowRankProjection.recalibration_input
            inputs = inputs if overridden or isinstance(inputs, torch.Tensor) else None
        module_forward(pl_module, batch, index, self.recalibration_step, inputs)

    def _passes(self, trainer: Trainer, pl_module: LightningModule) -> Passes:
        return trainer_passes(trainer, pl_module, self._forward)

    def _statistics(self, trainer: Trainer, pl_module: LightningModule, count: int | None = None):
        """Input statistics of the planned layers (``count`` batches, default the objective's), else None."""
        if count is None and not self.options.weighted:
            return None
        count = self.options.objective.batches if count is None else count
        return self._passes(trainer, pl_module).statistics(pl_module, self.plans, self.options, count,
                                                           trainer.global_step)

    def _project(self, pl_module: LightningModule, step: int, plans: list[LayerPlan], statistics) -> list[LayerStats]:
        with divergence_named(step):
            stats = project_planned_(pl_module, plans, self.options, statistics)
        broadcast_weights(pl_module, plans)
        return stats

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.loss_jump_batches and not pl_module.automatic_optimization:
            raise ValueError(f"`loss_jump_batches`={self.loss_jump_batches} measures the loss `training_step` "
                             f"returns, which needs automatic optimization; {type(pl_module).__name__} uses manual "
                             "optimization: set `loss_jump_batches=0`")
        self._resolve_final_phase(trainer)
        passes, step = self._passes(trainer, pl_module), trainer.global_step
        if self.bn_recalibration_batches and (self.final_projection or self.validate_projected):
            if batchnorm_layers(pl_module):
                passes.check(pl_module, "BatchNorm re-estimation", RECALIBRATION_HINT, step)
        if self.options.weighted and self.plans:
            passes.check(pl_module, f"objective={self.options.objective}", FORWARD_HINT + ".", step)
            gathered = self._statistics(trainer, pl_module, count=1)
            missing = [p.name for p in self.plans if p.name not in gathered]
            if missing:
                raise ValueError(f"`objective`={self.options.objective} needs the inputs of every projected layer, "
                                 f"but the forward pass on a training batch does not run {missing}. {FORWARD_HINT}.")
            self._start_recording(trainer, pl_module)

    def _start_recording(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hooks that record the input statistics on the training step's own passes (``observe_training``),
        unless the module is compiled (hooks would not see its layers run)."""
        self._recorder = None
        compiled = any(COMPILED_SEGMENT in name.split(".") for name, _ in pl_module.named_modules())
        if not self.options.objective.observe_training or compiled:
            return
        channels = {p.name for p in self.plans if weights_channels(p, self.options)}
        self._generator = torch.Generator(pl_module.device)
        self._recorder = InputRecorder(pl_module, [p.name for p in self.plans], channels, self._generator)
        self._window_steps = math.ceil(self.options.objective.batches / trainer.accumulate_grad_batches)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._recorder is None:
            return
        upcoming = trainer.global_step + 1  # the optimizer step this batch's passes count towards
        if any(self.should_project(step) for step in range(upcoming, upcoming + self._window_steps)):
            if not self._recorder.sums:  # the first batch of the step: its row draws follow the step
                self._generator.manual_seed(upcoming)
            self._recorder.attach()

    def _record_step(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Close the recording of this batch's passes; when the batch ended optimizer step ``step``, keep what the
        step's passes recorded (summed over processes) for the projections of the next steps."""
        if self._recorder is None:
            return
        self._recorder.detach()
        if step <= self._last_step:
            return
        if self._recorder.sums:
            recorded = self._passes(trainer, pl_module).reduced(pl_module, self.plans, self.options,
                                                                self._recorder.result())
            self._window[step] = recorded
            self._recorder.reset()
        self._window = {taken: recorded for taken, recorded in self._window.items()
                        if taken > step - self._window_steps}

    def _recorded_statistics(self, step: int) -> dict[str, LayerStatistics] | None:
        """The statistics the training passes recorded over the steps ending at ``step``, or None (the separate
        passes take over, with a warning naming the layers) when a planned layer is missing or a step of the
        window was not recorded (resumed inside it, or the projection was not foreseen)."""
        if self._recorder is None:
            return None
        steps = range(step - self._window_steps + 1, step + 1)
        if any(taken not in self._window for taken in steps if taken > 0):
            return None
        entries = [self._window[taken] for taken in steps if taken > 0]
        missing = [p.name for p in self.plans if not all(p.name in entry for entry in entries)]
        if missing:
            if not self._recorded_fallback:
                rank_zero_warn(f"`objective`={self.options.objective}: the training step's forward passes do not "
                               f"run {missing}; their input statistics come from separate passes instead.")
            self._recorded_fallback = True
            return None
        device = next(self._recorder.model.parameters()).device
        statistics = {}
        for plan in self.plans:
            layers = [entry[plan.name].to(device) for entry in entries]
            statistics[plan.name] = sum(layers[1:], layers[0])
        return statistics

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        self._record_step(trainer, pl_module, step)
        if self.check_finite:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self._losses.add(loss, step)
        if step <= self._last_step:
            return
        due = any(self.should_project(taken) for taken in range(self._last_step + 1, step + 1))
        if due or step // FINITE_CHECK_STEPS > self._last_step // FINITE_CHECK_STEPS:
            self._losses.check()
        self._last_step = step
        if not due:
            return
        if self._projections < self.budget_reallocations:
            with divergence_named(step):
                self._make_plan(pl_module, trainer, reallocate=True)
        plans = annealed_plans(self.plans, self.options, self._projections, self.rank_warmup)
        passes = self._passes(trainer, pl_module)
        start, jump = time.perf_counter(), {}
        if self.loss_jump_batches:
            jump["lowrank/loss_before"] = passes.mean_loss(pl_module, self.loss_jump_batches, step)
        statistics = self._recorded_statistics(step) if self.options.weighted else None
        if statistics is None:
            statistics = self._statistics(trainer, pl_module, None if self.options.weighted or not self.loss_jump_batches
                                          else self.loss_jump_batches)
        self.last_stats = self._project(pl_module, step, plans, statistics)
        if self.loss_jump_batches:
            jump["lowrank/loss_after"] = passes.mean_loss(pl_module, self.loss_jump_batches, step)
        seconds = time.perf_counter() - start
        self._projections += 1
        if self.reset_momentum and not self.in_final_phase(step):
            modules = named_modules(pl_module)
            zero_first_moments(trainer.optimizers, [modules[p.name].weight for p in plans])
        if self.last_stats:
            metrics = {**projection_metrics(plans, self.last_stats, seconds), **jump}
            self.history.append({"step": step, **{name.split("/", 1)[1]: value for name, value in metrics.items()}})
            trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
            if trainer.is_global_zero:  # one row per projection, at Lightning's logging step of this batch
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._losses.check()
        if not (self.final_projection and self.plans):
            return
        with divergence_named(trainer.global_step):
            self.last_stats = self._passes(trainer, pl_module).finish(
                pl_module, self.plans, self.options, self.bn_recalibration_batches, trainer.global_step,
                synchronize=lambda module: broadcast_weights(module, self.plans))

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._losses.check()

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._losses.check()  # before validation (and checkpointing or early stopping) sees diverged weights
        if not (self.validate_projected and self.plans and trainer.state.fn == "fit"):
            return
        modules = named_modules(pl_module)
        tensors = [modules[p.name].weight for p in self.plans]
        if self.bn_recalibration_batches:
            tensors += list(batchnorm_buffers(pl_module).values())
        self._backup = [(tensor, tensor.detach().clone()) for tensor in tensors]
        step = trainer.global_step
        self._project(pl_module, step, self.plans, self._statistics(trainer, pl_module))
        self._passes(trainer, pl_module).recalibrate(pl_module, self.bn_recalibration_batches, step)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with torch.no_grad():
            for tensor, saved in self._backup:
                tensor.copy_(saved)
        self._backup = []

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._recorder is not None:
            self._recorder.detach()
        self.on_validation_epoch_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        start, window = self._restored_phase or (self.final_phase_start, self._window)  # restored, not yet fitted
        window = {step: {name: [*(t.cpu() for t in layer.tensors()),
                                layer.output_scale.cpu() if layer.output_scale is not None else None]
                         for name, layer in recorded.items()} for step, recorded in window.items()}
        return {"last_step": self._last_step, "projections": self._projections, "ranks": self.ranks,
                "final_phase_start": start, "statistics_window": window}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step", 0)
        self._projections = state_dict.get("projections", 0)
        window = {step: {name: LayerStatistics(*layer) for name, layer in recorded.items()}
                  for step, recorded in (state_dict.get("statistics_window") or {}).items()}
        self._restored_phase = (state_dict.get("final_phase_start"), window)
        ranks = state_dict.get("ranks") or {}
        self._restored_ranks = {canonical_name(name): rank for name, rank in ranks.items()} or None
