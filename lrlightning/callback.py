"""``LowRankProjection``: the Lightning callback that projects selected weights every S_D optimizer steps."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from .activations import LayerStatistics
from .batchnorm import batchnorm_buffers, batchnorm_layers, kept_batchnorm_statistics, recalibrate_batchnorm_, seeded
from .finish import finish_
from .names import canonical_name, named_modules
from .options import LowRankOptions, RankSpec, is_int
from .budget import Allocation
from .plan import LayerPlan, SkippedLayer, allocate_plan, frozen_ranks, scheme_for
from .projection import LayerStats, NonFiniteWeightError, empty_statistics, gather_statistics, project_planned_
from .recalibration import (
    defines_forward,
    eager,
    preserved_metrics,
    run_training_step,
    silenced_logging,
    training_batches,
)
from .summary import plan_table
from .transfer import host_lists

SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
DIVERGENCE_HINT = ("HINT: lower the learning rate, set the Trainer's `gradient_clip_val`, use a larger `rank` or "
                   "`every_n_train_steps`, or anneal the rank with `rank_warmup`.")

FORWARD_HINT = ("HINT: pass `recalibration_step=` (a function (module, batch) running the forward pass on a "
                "training batch)")
RECALIBRATION_HINT = (f"{FORWARD_HINT}, or set `bn_recalibration_batches=0` to keep the running statistics "
                      "accumulated on the unprojected weights.")

FIRST_MOMENT_KEYS = ("momentum_buffer", "exp_avg")


FINITE_CHECK_STEPS = 32  # the host reads the divergence record this often (optimizer steps) and before each projection


class NonFiniteTrainingError(FloatingPointError):
    """Training diverged: the loss or a selected weight became NaN/Inf."""


@contextlib.contextmanager
def divergence_named(step: int) -> Iterator[None]:
    """Turn a ``NonFiniteWeightError`` into a ``NonFiniteTrainingError`` naming the optimizer step and hints."""
    try:
        yield
    except NonFiniteWeightError as error:
        raise NonFiniteTrainingError(
            f"weight of layer {error.layer!r} became NaN/Inf before the projection after optimizer step {step}. "
            + DIVERGENCE_HINT) from error


def broadcast_weights(pl_module: LightningModule, plans: list[LayerPlan]) -> None:
    """Under torch.distributed, every rank takes rank 0's projected weights (SVDs may differ in the last bits)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        modules = named_modules(pl_module)
        for plan in plans:
            torch.distributed.broadcast(modules[plan.name].weight.data, src=0)


class LowRankProjection(Callback):
    r"""Overwrite selected conv (and optionally Linear) weights by their low-rank projection, in place, after
    every ``every_n_train_steps``-th optimizer step (the paper's S_D), so training ends on exactly low-rank
    weights that ``factorize`` turns into small layers with identical outputs.

    Args:
        scheme: ``"svd"``, ``"tiled_svd"``, ``"tucker2"`` or ``"spatial_svd"``.
        rank: the rank rule (int, float fraction in (0, 1], tucker2 pair, or ``{layer name: rank}``); or give
            ``energy``, ``compression`` or ``budget`` instead (see ``LowRankOptions``). Ranks are resolved when fit
            starts (a budget may allocate again, see ``budget_reallocations``) and kept in the callback's state
            (``ranks``) so that export and resume use the same ones.
        every_n_train_steps: S_D, in optimizer steps (gradient accumulation does not change the schedule).
        start_step: projections happen after optimizer steps ``k = start_step + j * every_n_train_steps > 0``.
        stop_step: no periodic projection after this optimizer step (None: never stop).
        final_projection: project once more when training ends, so the final weights are exactly low-rank.
        validate_projected: during fit, validation sees the projected weights (the exportable model), then
            training resumes from the unprojected ones. Outside fit, weights are used as they are.
        rank_warmup: the first ``rank_warmup`` projections use ranks annealed from full rank down to the target
            (cubic schedule, as in gradual pruning); 0 projects at the target rank from the start.
        reset_momentum: after each periodic projection, zero the optimizer's first-moment buffers of the projected
            weights (SGD ``momentum_buffer``, Adam ``exp_avg``), so the steps that follow do not carry the
            pre-projection velocity back off the low-rank set; second moments are kept (default False).
        bn_recalibration_batches: after each projection whose weights are evaluated (validation during fit and
            the final projection), re-estimate BatchNorm running statistics over this many training batches
            (default 20; 0 keeps the statistics accumulated on the unprojected weights), drawn by
            ``recalibration.reshuffled`` with the optimizer step as seed (under DDP, step · world size + rank: each
            process draws its own batches and their statistics are averaged). Each batch runs with no grad, nothing
            logged and torchmetrics states kept:
            ``recalibration_step(module, batch)`` when given; else ``module(recalibration_input(batch))`` when the
            module defines ``forward`` and the input is a tensor (the first item of a tuple/list batch); else the
            module's own ``training_step(batch, index)`` (automatic optimization). One batch is tried when training
            starts, so a module it cannot run on is refused then, not at the end of training.
        recalibration_step: ``(module, batch) -> Any``, a forward pass of the module on a training batch (as
            placed on the device by Lightning), for modules whose batches or forward the defaults do not fit.
        budget_reallocations: with a ``budget``, allocate the ranks again from the current weights before each of
            the first ``budget_reallocations`` periodic projections (the spectrum moves while training), then keep
            them (default 0: allocated once, from the weights when fit starts, e.g. a pretrained model). Each
            allocation is made on global rank zero and broadcast, so every process projects at the same ranks.
        check_finite: stop with ``NonFiniteTrainingError`` (step, layer, hints) when the loss or a selected
            weight becomes NaN/Inf. The loss is checked on its device at every step and read by the host every
            ``FINITE_CHECK_STEPS`` (32) optimizer steps, before each projection and validation, at the end of each
            epoch and of fit, so other steps never wait for the device: up to 31 steps may run after the loss
            diverged; the error names the first step whose loss was NaN/Inf.
        objective: ``"activation"`` (default) or ``"weight"``: each projection keeps the layers' outputs on the
            training data (``"weight"``: their weights; see ``LowRankOptions``), from input statistics gathered just
            before it over ``activation_batches`` training batches (default 2; drawn, run and seeded like the
            BatchNorm re-estimation batches, BatchNorm statistics kept); under DDP the statistics are summed over
            processes (then rank 0's projected weights are shared, as for every objective).
        loss_jump_batches: when > 0, each periodic projection also logs the training loss on this many training
            batches just before and just after it (``training_step`` with no grad; automatic optimization only)
            and, under either objective, the output-space error (default 0).
        energy, compression, budget, budget_metric, input_shape, rank_multiple, budget_objective, latency_batch_size,
            latency_device, latency_cache, latency_remeasure, tile_shape, include, exclude, linear, skip_first_conv,
            hooi_iters, svd_driver, projection_device, activation_ridge, bn_weighting: the rank rules, layer selection
            and scheme options shared with ``factorize`` (see ``LowRankOptions``). The ranks a ``budget`` allocates
            are kept in ``ranks`` and in checkpoints; a latency budget's measured speedup is in ``allocation.check``.

    Layer names (``plans``, ``ranks``) are those of the uncompiled module: a ``torch.compile``d submodule's layers
    are named without ``_orig_mod``. With manual optimization, every optimizer step counts (two optimizers stepping
    per batch make two steps); the projection runs at the end of a batch in which a scheduled step was taken.

    Logged to the Trainer's loggers at each periodic projection, at its optimizer step (``lowrank/``): ``rel_error``
    and ``energy`` (means over layers), ``compression`` (dense / factorized params over the projected layers),
    ``seconds`` spent projecting (on global rank zero; statistics and loss passes included), and with input
    statistics ``output_rel_error`` (mean over layers of ``LayerStats.output_rel_error``), with
    ``loss_jump_batches`` ``loss_before`` and ``loss_after``; the same values, with the step, are appended to
    ``history`` (this fit's projections; not checkpointed).
    """

    def __init__(self, scheme: str = "svd", rank: RankSpec = None, every_n_train_steps: int = 200, *,
                 start_step: int = 0, stop_step: int | None = None, final_projection: bool = True,
                 validate_projected: bool = True, rank_warmup: int = 0, reset_momentum: bool = False,
                 bn_recalibration_batches: int = 20,
                 recalibration_step: Callable[[LightningModule, Any], Any] | None = None,
                 check_finite: bool = True, energy: float | None = None, compression: float | None = None,
                 tile_shape: tuple[int, int] | None = None, include: str | list[str] | None = None,
                 exclude: str | list[str] | None = None, linear: bool = False, skip_first_conv: bool = True,
                 hooi_iters: int = 0, svd_driver: str = "auto", projection_device: str | None = None,
                 budget: float | None = None,
                 budget_metric: str = "params", input_shape: tuple[int, int, int] | None = None,
                 rank_multiple: int = 8, budget_objective: str = "max", latency_batch_size: int = 32,
                 latency_device: str | None = None,
                 latency_cache: str | None = None, latency_remeasure: bool = False, budget_reallocations: int = 0,
                 objective: str = "activation",
                 activation_batches: int = 2, activation_ridge: float = 1e-2, bn_weighting: bool = False,
                 loss_jump_batches: int = 0):
        super().__init__()
        if not (is_int(every_n_train_steps) and every_n_train_steps >= 1):
            raise ValueError(f"`every_n_train_steps` must be an int >= 1, got {every_n_train_steps!r}")
        if not (is_int(start_step) and start_step >= 0):
            raise ValueError(f"`start_step` must be an int >= 0, got {start_step!r}")
        if stop_step is not None and not (is_int(stop_step) and stop_step >= start_step):
            raise ValueError(f"`stop_step` must be None or an int >= `start_step` ({start_step}), got {stop_step!r}")
        if not (is_int(rank_warmup) and rank_warmup >= 0):
            raise ValueError(f"`rank_warmup` must be an int >= 0, got {rank_warmup!r}")
        if not isinstance(reset_momentum, bool):
            raise ValueError(f"`reset_momentum` must be a bool, got {reset_momentum!r}")
        if not (is_int(bn_recalibration_batches) and bn_recalibration_batches >= 0):
            raise ValueError(f"`bn_recalibration_batches` must be an int >= 0, got {bn_recalibration_batches!r}")
        if recalibration_step is not None and not callable(recalibration_step):
            raise ValueError(f"`recalibration_step` must be None or a callable (module, batch), "
                             f"got {recalibration_step!r}")
        self.options = LowRankOptions(scheme=scheme, rank=rank, energy=energy, compression=compression,
                                      tile_shape=tile_shape, include=include, exclude=exclude, linear=linear,
                                      skip_first_conv=skip_first_conv, hooi_iters=hooi_iters, svd_driver=svd_driver,
                                      projection_device=projection_device,
                                      budget=budget, budget_metric=budget_metric, input_shape=input_shape,
                                      rank_multiple=rank_multiple, budget_objective=budget_objective,
                                      latency_batch_size=latency_batch_size,
                                      latency_device=latency_device, latency_cache=latency_cache,
                                      latency_remeasure=latency_remeasure,
                                      objective=objective, activation_ridge=activation_ridge,
                                      bn_weighting=bn_weighting)
        for argument, value, least in (("activation_batches", activation_batches, 1 if self.options.weighted else 0),
                                       ("loss_jump_batches", loss_jump_batches, 0)):
            if not (is_int(value) and value >= least):
                raise ValueError(f"`{argument}` must be an int >= {least}"
                                 + (" under objective='activation'" if least else "") + f", got {value!r}")
        self.activation_batches = activation_batches
        self.loss_jump_batches = loss_jump_batches
        if not (is_int(budget_reallocations) and budget_reallocations >= 0):
            raise ValueError(f"`budget_reallocations` must be an int >= 0, got {budget_reallocations!r}")
        if budget_reallocations and budget is None:
            raise ValueError(f"`budget_reallocations`={budget_reallocations} re-allocates a `budget`; give `budget` "
                             "or set it to 0")
        self.budget_reallocations = budget_reallocations
        self.every_n_train_steps = every_n_train_steps
        self.start_step = start_step
        self.stop_step = stop_step
        self.final_projection = final_projection
        self.validate_projected = validate_projected
        self.rank_warmup = rank_warmup
        self.reset_momentum = reset_momentum
        self.bn_recalibration_batches = bn_recalibration_batches
        self.recalibration_step = recalibration_step
        self.check_finite = check_finite
        self.plans: list[LayerPlan] = []
        self.skipped: list[SkippedLayer] = []
        self.allocation: Allocation | None = None
        self.last_stats: list[LayerStats] = []
        self.history: list[dict[str, float]] = []
        self._last_step = 0
        self._projections = 0
        self._restored_ranks: dict | None = None
        self._backup: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._nonfinite_loss: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scheme=self.options.scheme, rank=self.options.rank,
                                        include=self.options.include, exclude=self.options.exclude)

    @property
    def ranks(self) -> dict[str, Any]:
        """``{layer name: rank}`` resolved at fit start; pass as ``factorize(..., rank=callback.ranks)``."""
        return frozen_ranks(self.plans)

    @property
    def num_projections(self) -> int:
        return self._projections

    def should_project(self, step: int) -> bool:
        """Whether to project after optimizer step ``step`` (override for another schedule)."""
        if step <= 0 or step < self.start_step or (self.stop_step is not None and step > self.stop_step):
            return False
        return (step - self.start_step) % self.every_n_train_steps == 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        name = type(trainer.strategy).__name__
        if stage == "fit" and name in SHARDED_STRATEGIES:
            raise NotImplementedError(f"LowRankProjection does not support the sharded strategy {name}: each rank "
                                      "holds only a shard of every weight. Use DDP, or project after training.")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._nonfinite_loss = None
        self.make_plan(pl_module, trainer)
        if trainer.is_global_zero:
            rank_zero_info(plan_table(self.plans, self.skipped, self.options.scheme, self.allocation))

    def make_plan(self, pl_module: LightningModule, trainer: Trainer | None = None, reallocate: bool = False) -> None:
        """Resolve the selected layers and their ranks (restored ranks win unless ``reallocate``, so resume keeps
        them). Under torch.distributed a budget is allocated on global rank zero and broadcast."""
        options = self.options
        if self._restored_ranks and not reallocate:
            options = options.replace_rank(self._restored_ranks)
        if trainer is not None and trainer.world_size > 1 and options.budget is not None:
            planned, failure = None, None
            if trainer.is_global_zero:
                try:
                    planned = allocate_plan(pl_module, options)
                except Exception as error:  # every rank raises it, instead of waiting for rank 0 forever
                    failure = (type(error), str(error))
            planned, failure = trainer.strategy.broadcast((planned, failure), src=0)
            if failure is not None:
                kind, message = failure
                raise (kind if issubclass(kind, ValueError) else RuntimeError)(message)
        else:
            planned = allocate_plan(pl_module, options)
        self.plans, self.skipped, self.allocation = planned

    def plans_for(self, projection_index: int) -> list[LayerPlan]:
        """Plans of the ``projection_index``-th projection (0-based): annealed ranks during ``rank_warmup``."""
        if projection_index >= self.rank_warmup:
            return self.plans
        remaining = (1.0 - (projection_index + 1) / (self.rank_warmup + 1)) ** 3
        annealed = []
        for plan in self.plans:
            scheme = scheme_for(plan.shape, self.options)
            full, target = scheme.full_rank(plan.shape), plan.rank
            if isinstance(target, tuple):
                rank = tuple(t + math.floor((f - t) * remaining) for t, f in zip(target, full))
            else:
                rank = target + math.floor((full - target) * remaining)
            annealed.append(replace(plan, rank=rank, params_factorized=scheme.factorized_params(plan.shape, rank)))
        return annealed

    def project(self, pl_module: LightningModule, step: int, plans: list[LayerPlan] | None = None,
                statistics: dict[str, LayerStatistics] | None = None) -> list[LayerStats]:
        plans = plans or self.plans
        with divergence_named(step):
            stats = project_planned_(pl_module, plans, self.options, statistics)
        broadcast_weights(pl_module, plans)
        return stats

    def gather_statistics(self, trainer: Trainer, pl_module: LightningModule, count: int | None = None,
                          always: bool = False) -> dict[str, LayerStatistics] | None:
        """Input statistics of the planned layers over ``count`` (default ``activation_batches``) training batches
        drawn with the optimizer step as seed, summed over DDP processes; None unless the objective needs them or
        ``always``."""
        if not (self.options.weighted or always):
            return None
        count = self.activation_batches if count is None else count
        step = trainer.global_step
        if trainer.train_dataloader is None and trainer.state.fn == "fit":
            trainer.fit_loop.setup_data()  # the sanity check runs before the loop loads it (as Lightning does)
        with self.forward_context(trainer, pl_module):
            batches = enumerate(training_batches(trainer, count, seed=step))
            statistics = gather_statistics(pl_module, self.plans, self.options, batches, self.forward_item, step)
        if trainer.world_size > 1:  # every rank reduces every planned layer, in plan order, seen or not
            layers = [statistics.get(plan.name) or empty_statistics(plan, self.options, pl_module.device)
                      for plan in self.plans]
            for layer in layers:
                for tensor in layer.tensors():
                    tensor.copy_(trainer.strategy.reduce(tensor, reduce_op="sum"))
            (rows,) = host_lists([torch.stack([layer.rows.reshape(()) for layer in layers])])
            statistics = {plan.name: layer for plan, layer, count in zip(self.plans, layers, rows) if count > 0}
        return statistics

    def training_loss(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Mean ``training_step`` loss over ``loss_jump_batches`` training batches drawn with the optimizer step
        as seed (no grad, train mode, BatchNorm statistics kept), averaged over DDP processes."""
        step = trainer.global_step
        losses = []
        with torch.no_grad(), self.forward_context(trainer, pl_module), kept_batchnorm_statistics(pl_module), \
                seeded(pl_module.device, step):
            for index, batch in enumerate(training_batches(trainer, self.loss_jump_batches, seed=step)):
                output = run_training_step(pl_module, batch, index)
                loss = output.get("loss") if isinstance(output, dict) else output
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(f"`loss_jump_batches` needs `training_step` to return the loss (a tensor or a "
                                    f"dict with 'loss'), got {type(output).__name__}")
                losses.append(loss.detach().float())
        if not losses:
            raise ValueError(f"`loss_jump_batches`={self.loss_jump_batches} found no training batch to measure the "
                             "loss on")
        mean = torch.stack(losses).mean()
        return float(trainer.strategy.reduce(mean, reduce_op="mean") if trainer.world_size > 1 else mean)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.check_finite:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self.record_loss(loss, step)
        if step <= self._last_step:
            return
        due = any(self.should_project(taken) for taken in range(self._last_step + 1, step + 1))
        if due or step // FINITE_CHECK_STEPS > self._last_step // FINITE_CHECK_STEPS:
            self.check_loss()
        self._last_step = step
        if not due:
            return
        if self._projections < self.budget_reallocations:
            with divergence_named(step):
                self.make_plan(pl_module, trainer, reallocate=True)
        plans = self.plans_for(self._projections)
        start = time.perf_counter()
        jump = {}
        if self.loss_jump_batches:
            jump["lowrank/loss_before"] = self.training_loss(trainer, pl_module)
        statistics = self.gather_statistics(trainer, pl_module, always=bool(self.loss_jump_batches),
                                            count=None if self.options.weighted else self.loss_jump_batches)
        self.last_stats = self.project(pl_module, step, plans, statistics)
        if self.loss_jump_batches:
            jump["lowrank/loss_after"] = self.training_loss(trainer, pl_module)
        seconds = time.perf_counter() - start
        self._projections += 1
        if self.reset_momentum:
            self.zero_first_moments(trainer, pl_module, plans)
        if self.last_stats:
            metrics = {**self.projection_metrics(plans, seconds), **jump}
            self.history.append({"step": step, **{name.split("/", 1)[1]: value for name, value in metrics.items()}})
            self.log_projection(trainer, metrics)

    def record_loss(self, loss: torch.Tensor, step: int) -> None:
        """Keep the first optimizer step whose training loss holds NaN/Inf (int64), and that loss (float32), in
        tensors on the loss's device: recorded without the host waiting for the device (``check_loss`` reads it)."""
        value = loss.detach().float().sum()
        if self._nonfinite_loss is None or self._nonfinite_loss[0].device != value.device:
            self._nonfinite_loss = (torch.full((), -1, dtype=torch.int64, device=value.device),
                                    torch.zeros((), device=value.device))
        first, recorded = self._nonfinite_loss
        fresh = ~torch.isfinite(value) & (first < 0)
        self._nonfinite_loss = (torch.where(fresh, step, first), torch.where(fresh, value, recorded))

    def check_loss(self) -> None:
        """Raise ``NonFiniteTrainingError`` naming the first optimizer step whose loss ``record_loss`` found NaN/Inf
        (the host waits for the device once, to read that step); nothing to read without ``check_finite``."""
        if self._nonfinite_loss is None:
            return
        step = int(self._nonfinite_loss[0].item())
        if step >= 0:
            raise NonFiniteTrainingError(f"training loss became {self._nonfinite_loss[1].item()} at optimizer step "
                                         f"{step}. " + DIVERGENCE_HINT)

    def zero_first_moments(self, trainer: Trainer, pl_module: LightningModule, plans: list[LayerPlan]) -> None:
        """Zero ``momentum_buffer``/``exp_avg`` of the projected weights in every optimizer of ``trainer``."""
        modules = named_modules(pl_module)
        weights = {modules[p.name].weight for p in plans}
        for optimizer in trainer.optimizers:
            for weight in weights & optimizer.state.keys():
                for key in FIRST_MOMENT_KEYS:
                    buffer = optimizer.state[weight].get(key)
                    if isinstance(buffer, torch.Tensor):
                        buffer.zero_()

    def log_projection(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """One row per projection in the Trainer's loggers (global rank zero), at Lightning's logging step of this
        batch; the values also go to ``trainer.callback_metrics``, so checkpointing and early stopping see them."""
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)

    def projection_metrics(self, plans: list[LayerPlan], seconds: float) -> dict[str, float]:
        stats = self.last_stats
        dense = sum(p.params_dense for p in plans)
        factorized = sum(p.params_factorized for p in plans)
        metrics = {
            "lowrank/rel_error": sum(s.rel_error for s in stats) / len(stats),
            "lowrank/energy": sum(s.energy for s in stats) / len(stats),
            "lowrank/compression": dense / factorized,
            "lowrank/seconds": seconds,
        }
        outputs = [s.output_rel_error for s in stats if s.output_rel_error is not None]
        if outputs:
            metrics["lowrank/output_rel_error"] = sum(outputs) / len(outputs)
        return metrics

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.loss_jump_batches and not pl_module.automatic_optimization:
            raise ValueError(f"`loss_jump_batches`={self.loss_jump_batches} measures the loss `training_step` "
                             f"returns, which needs automatic optimization; {type(pl_module).__name__} uses manual "
                             "optimization: set `loss_jump_batches=0`")
        if self.recalibrates(pl_module) and (self.final_projection or self.validate_projected):
            self.check_recalibration(trainer, pl_module, "BatchNorm re-estimation", RECALIBRATION_HINT)
        if self.options.weighted and self.plans:
            self.check_recalibration(trainer, pl_module, "objective='activation'", FORWARD_HINT + ".")
            statistics = self.gather_statistics(trainer, pl_module, count=1)
            missing = [p.name for p in self.plans if p.name not in statistics]
            if missing:
                raise ValueError(f"`objective`='activation' needs the inputs of every projected layer, but the "
                                 f"forward pass on a training batch does not run {missing}. {FORWARD_HINT}.")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_loss()
        if not (self.final_projection and self.plans):
            return
        statistics = self.gather_statistics(trainer, pl_module)
        with divergence_named(trainer.global_step), self.forward_context(trainer, pl_module):
            batches = self.recalibration_batches(trainer, pl_module)
            self.last_stats = finish_(pl_module, self.plans, self.options, batches, self.forward_item,
                                      seed=trainer.global_step,
                                      synchronize=lambda module: broadcast_weights(module, self.plans),
                                      statistics=statistics)
        self.average_batchnorm(trainer, pl_module)

    def recalibrates(self, pl_module: LightningModule) -> bool:
        return bool(self.bn_recalibration_batches and batchnorm_layers(pl_module))

    def recalibration_input(self, batch: Any) -> Any:
        """What the module's forward takes from a training batch (default: the first item of a tuple/list)."""
        return batch[0] if isinstance(batch, (tuple, list)) and batch else batch

    def recalibration_forward(self, pl_module: LightningModule, batch: Any, index: int) -> None:
        """One forward pass of ``pl_module`` on a training batch (see ``bn_recalibration_batches``)."""
        if self.recalibration_step is not None:
            self.recalibration_step(pl_module, batch)
            return
        overridden = type(self).recalibration_input is not LowRankProjection.recalibration_input
        if defines_forward(pl_module):
            inputs = self.recalibration_input(batch)
            if overridden or isinstance(inputs, torch.Tensor):
                pl_module(inputs)
                return
        if not pl_module.automatic_optimization:
            kind = "a tensor input" if defines_forward(pl_module) else "`forward`"
            raise TypeError(f"{type(pl_module).__name__} uses manual optimization and has no {kind} for its "
                            f"batches of type {type(batch).__name__}, so BatchNorm re-estimation cannot run it")
        run_training_step(pl_module, batch, index)

    @contextlib.contextmanager
    def forward_context(self, trainer: Trainer, pl_module: LightningModule) -> Iterator[None]:
        """Where re-estimation passes run: the precision plugin's context, nothing logged, metric states kept,
        compiled code eager."""
        with silenced_logging(pl_module), preserved_metrics(pl_module), eager(), \
                trainer.precision_plugin.forward_context():
            yield

    def check_recalibration(self, trainer: Trainer, pl_module: LightningModule, purpose: str, hint: str) -> None:
        """Run one re-estimation pass in eval mode (running statistics untouched); raise a ``RuntimeError``
        naming ``purpose`` and the options to set (``hint``) when it fails."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), self.forward_context(trainer, pl_module):
                for index, batch in enumerate(training_batches(trainer, 1, seed=trainer.global_step)):
                    self.recalibration_forward(pl_module, batch, index)
        except Exception as error:
            raise RuntimeError(f"{purpose} cannot run on {type(pl_module).__name__}'s training "
                               f"batches ({type(error).__name__}: {error}). {hint}") from error
        finally:
            pl_module.train(was_training)

    def recalibration_batches(self, trainer: Trainer, pl_module: LightningModule) -> Iterable[tuple[int, Any]]:
        """``(index, batch)`` pairs for re-estimation, drawn with a seed of the current optimizer step (none when
        the module has no BatchNorm to re-estimate or re-estimation is off)."""
        if not self.recalibrates(pl_module):
            return ()
        return enumerate(training_batches(trainer, self.bn_recalibration_batches, seed=trainer.global_step))

    def forward_item(self, pl_module: LightningModule, item: tuple[int, Any]) -> None:
        self.recalibration_forward(pl_module, item[1], item[0])

    def recalibrate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Re-estimate BatchNorm statistics for the projected weights; averaged over ranks under DDP."""
        if not self.recalibrates(pl_module):
            return
        with self.forward_context(trainer, pl_module):
            recalibrate_batchnorm_(pl_module, self.recalibration_batches(trainer, pl_module), self.forward_item,
                                   seed=trainer.global_step)
        self.average_batchnorm(trainer, pl_module)

    def average_batchnorm(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Average re-estimated running statistics over DDP ranks (no-op on one process or without re-estimation)."""
        if trainer.world_size == 1 or not self.recalibrates(pl_module):
            return
        with torch.no_grad():
            for layer in batchnorm_layers(pl_module):
                for buffer in (layer.running_mean, layer.running_var):
                    buffer.copy_(trainer.strategy.reduce(buffer, reduce_op="mean"))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_loss()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.check_loss()  # before validation (and checkpointing or early stopping) sees diverged weights
        if not (self.validate_projected and self.plans and trainer.state.fn == "fit"):
            return
        modules = named_modules(pl_module)
        tensors = [modules[p.name].weight for p in self.plans]
        if self.bn_recalibration_batches:
            tensors += list(batchnorm_buffers(pl_module).values())
        self._backup = [(tensor, tensor.detach().clone()) for tensor in tensors]
        self.project(pl_module, trainer.global_step, statistics=self.gather_statistics(trainer, pl_module))
        self.recalibrate(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with torch.no_grad():
            for tensor, saved in self._backup:
                tensor.copy_(saved)
        self._backup = []

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "projections": self._projections, "ranks": self.ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step", 0)
        self._projections = state_dict.get("projections", 0)
        ranks = state_dict.get("ranks") or {}
        self._restored_ranks = {canonical_name(name): rank for name, rank in ranks.items()} or None

