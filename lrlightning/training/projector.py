"""``Projector``: low-rank training of one model, with or without Lightning: its plan, schedule, statistics window,
periodic projections, divergence guard and finish. A training loop calls ``after_step`` after each batch."""
from __future__ import annotations

import copy
import time
import warnings
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from ..batchnorm import batchnorm_buffers
from ..budget import Allocation
from .distributed import broadcast_weights
from .divergence import FINITE_CHECK_STEPS, LossRecord, divergence_named
from ..export import factorize_planned
from .momentum import zero_first_moments
from ..names import canonical_name, named_modules
from ..options import LowRankOptions
from ..plan import LayerPlan, Plan, SkippedLayer, allocate_plan, annealed_plans, frozen_ranks, plans_within
from ..projection import LayerStats, project_planned_
from ..rules import Budget, is_int
from .schedule import ProjectionSchedule
from .statistics_window import StatisticsWindow
from .summary import projection_metrics

if TYPE_CHECKING:
    from .passes import Passes

OnRankZero = Callable[[Callable[[], Any]], Any]  # runs a function on global rank zero and shares its result


class Projector:
    """Projects the planned layers of a model on ``schedule`` (``ProjectionSchedule``) under ``options``
    (``LowRankOptions``). ``reset_momentum`` zeroes the first moments of projected weights after each periodic
    projection before the final phase; ``loss_jump_batches`` > 0 measures the training loss on that many batches
    before and after each; ``recalibration_batches`` re-estimates BatchNorm statistics where the projected weights
    are evaluated; ``check_finite`` stops on a NaN/Inf loss or weight. Batches come from a ``Passes``."""

    def __init__(self, options: LowRankOptions, schedule: ProjectionSchedule | None = None, *,
                 reset_momentum: bool = False, loss_jump_batches: int = 0, recalibration_batches: int = 20,
                 check_finite: bool = True):
        for argument, value in (("loss_jump_batches", loss_jump_batches),
                                ("bn_recalibration_batches", recalibration_batches)):
            if not (is_int(value) and value >= 0):
                raise ValueError(f"`{argument}` must be an int >= 0, got {value!r}")
        for argument, value in (("reset_momentum", reset_momentum), ("check_finite", check_finite)):
            if not isinstance(value, bool):
                raise ValueError(f"`{argument}` must be a bool, got {value!r}")
        self.options, self.schedule = options, schedule or ProjectionSchedule()
        self.reset_momentum, self.loss_jump_batches = reset_momentum, loss_jump_batches
        self.recalibration_batches, self.check_finite = recalibration_batches, check_finite
        self.plan = Plan(options)  # the layers and ranks of the model resolved last (``resolve``)
        self.last_stats: list[LayerStats] = []
        self.history: list[dict[str, float]] = []
        self.last_step = 0  # the last optimizer step seen
        self.projections = 0  # periodic projections so far
        self.final_phase_start: int | None = None  # the final phase projects after every step after this one
        self.window = StatisticsWindow()
        self.losses = LossRecord()
        self.restored_ranks: dict[str, Any] | None = None
        self.restored_phase: tuple[int | None, dict] | None = None
        self.backup: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.warn: Callable[[str], Any] = warnings.warn  # how warnings are shown (once per process group)
        self.warned = False

    def __getstate__(self) -> dict[str, Any]:  # hooks and generators stay with the process
        return {**self.__dict__, "window": StatisticsWindow(self.window.entries), "backup": []}

    @property
    def ranks(self) -> dict[str, Any]:
        """``{layer name: rank}`` of the plan."""
        return frozen_ranks(self.plans)

    @property
    def budget_reallocations(self) -> int:
        """How many periodic projections allocate a ``Budget`` again first (``Budget.reallocations``; else 0)."""
        return self.options.rank.reallocations if isinstance(self.options.rank, Budget) else 0

    def in_final_phase(self, step: int) -> bool:
        return self.final_phase_start is not None and step > self.final_phase_start

    def should_project(self, step: int) -> bool:
        """Whether to project after optimizer step ``step`` (override for another schedule)."""
        return self.schedule.due(step, self.final_phase_start)

    @property
    def plans(self) -> list[LayerPlan]:
        """The plan's layers (``LayerPlan``), in model order."""
        return list(self.plan.layers)

    @property
    def skipped(self) -> list[SkippedLayer]:
        """The selected layers the plan leaves dense, with the reason."""
        return list(self.plan.skipped)

    @property
    def allocation(self) -> Allocation | None:
        """What a ``Budget`` allocated (else None)."""
        return self.plan.allocation

    def resolve(self, model: nn.Module, passes: Passes | None = None, seed: int = 0, reallocate: bool = False,
                on_rank_zero: OnRankZero | None = None) -> None:
        """Choose the layers and ranks of ``model``: restored ranks win unless ``reallocate``. A ``Budget`` under an
        ``Activation`` objective allocates from output errors on ``passes`` (batches drawn with ``seed``), and runs
        through ``on_rank_zero`` where processes must agree."""
        options = self.options
        if self.restored_ranks and not reallocate:
            options = options.replace_rank(self.restored_ranks)
        statistics = None
        if passes is not None and options.weighted and isinstance(options.rank, Budget):
            single = copy.copy(passes)
            single.reduce = None  # allocated on global rank zero alone, from its own batches
            statistics = partial(single.statistics, model, options=options, count=options.objective.batches,
                                 seed=seed)
        make = partial(allocate_plan, model, options, statistics=statistics)
        run = on_rank_zero if on_rank_zero is not None and isinstance(options.rank, Budget) else None
        layers, skipped, allocation = run(make) if run is not None else make()
        self.plan = Plan(self.options, layers, skipped, allocation)

    def start(self, total_steps: Callable[[], float] = lambda: float("inf")) -> None:
        """At the start of training: the final phase's start and the recorded statistics, restored from a
        checkpoint, else new (``total_steps()``: optimizer steps of the whole fit, asked only for a final phase)."""
        self.losses = LossRecord()
        restored, self.restored_phase = self.restored_phase, None
        self.window = StatisticsWindow(restored[1] if restored else None)
        self.final_phase_start = restored[0] if restored else None
        if self.final_phase_start is None and self.schedule.final_phase:
            self.final_phase_start = self.schedule.final_phase_start(total_steps())

    def record_training(self, model: nn.Module, batches_per_step: int = 1) -> None:
        """Record input statistics on the training step's own passes (``StatisticsWindow``), where the objective
        observes training."""
        self.window.start(model, self.plans, self.options, batches_per_step)

    def before_batch(self, step: int) -> None:
        """Before a training batch, ``step`` optimizer steps taken so far."""
        self.window.open(step + 1, self.should_project)

    def after_step(self, model: nn.Module, step: int, passes: Passes | None = None, loss: Any = None,
                   optimizers: Iterable[torch.optim.Optimizer] = (),
                   on_rank_zero: OnRankZero | None = None) -> dict[str, float] | None:
        """After a training batch, ``step`` optimizer steps taken and its ``loss``: keep the recorded statistics,
        check the loss, and project when due. Returns the projection's metrics (``lowrank/``), else None."""
        stepped = step > self.last_step
        self.window.close(step, stepped, lambda recorded: self.reduced(model, passes, recorded))
        if self.check_finite and isinstance(loss, torch.Tensor):
            self.losses.add(loss, step)
        if not stepped:
            return None
        due = any(self.should_project(taken) for taken in range(self.last_step + 1, step + 1))
        if due or step // FINITE_CHECK_STEPS > self.last_step // FINITE_CHECK_STEPS:
            self.losses.check()
        self.last_step = step
        return self.project(model, step, passes, optimizers, on_rank_zero) if due else None

    def project(self, model: nn.Module, step: int, passes: Passes | None = None,
                optimizers: Iterable[torch.optim.Optimizer] = (),
                on_rank_zero: OnRankZero | None = None) -> dict[str, float] | None:
        """The periodic projection after optimizer step ``step``: reallocate a ``Budget`` first while
        ``budget_reallocations`` last, anneal the ranks, project, reset momentum. Returns its metrics."""
        if self.projections < self.budget_reallocations:
            with divergence_named(step):
                self.resolve(model, passes, step, reallocate=True, on_rank_zero=on_rank_zero)
        plans = annealed_plans(self.plans, self.options, self.projections, self.schedule.rank_warmup)
        start, jump = time.perf_counter(), {}
        if self.loss_jump_batches:
            jump["lowrank/loss_before"] = self.needed(passes, "`loss_jump_batches`").mean_loss(
                model, self.loss_jump_batches, step)
        statistics = self.window.statistics(step, self.plans, self.options.objective, self.warn_once) \
            if self.options.weighted else None
        if statistics is None:
            count = None if self.options.weighted or not self.loss_jump_batches else self.loss_jump_batches
            statistics = self.statistics(model, passes, step, count)
        self.last_stats = self.projected(model, step, plans, statistics)
        if self.loss_jump_batches:
            jump["lowrank/loss_after"] = passes.mean_loss(model, self.loss_jump_batches, step)
        seconds = time.perf_counter() - start
        self.projections += 1
        if self.reset_momentum and not self.in_final_phase(step):
            modules = named_modules(model)
            zero_first_moments(optimizers, [modules[p.name].weight for p in plans])
        if not self.last_stats:
            return None
        metrics = {**projection_metrics(plans, self.last_stats, seconds), **jump}
        self.history.append({"step": step, **{name.split("/", 1)[1]: value for name, value in metrics.items()}})
        return metrics

    def projected(self, model: nn.Module, step: int, plans: list[LayerPlan],
                  statistics: dict | None) -> list[LayerStats]:
        """Project ``plans``' weights of ``model`` in place and share rank 0's under torch.distributed."""
        with divergence_named(step):
            stats = project_planned_(model, plans, self.options, statistics)
        broadcast_weights(model, plans)
        return stats

    def statistics(self, model: nn.Module, passes: Passes | None, seed: int, count: int | None = None):
        """Input statistics of the planned layers on ``count`` batches (default the objective's), else None."""
        if count is None and not self.options.weighted:
            return None
        count = self.options.objective.batches if count is None else count
        return self.needed(passes, f"`objective`={self.options.objective}").statistics(model, self.plans,
                                                                                        self.options, count, seed)

    @staticmethod
    def needed(passes: Passes | None, purpose: str) -> Passes:
        """``passes``, or a ValueError saying that ``purpose`` draws training batches."""
        if passes is None:
            raise ValueError(f"{purpose} runs forward passes on training batches: give `passes` "
                             "(lrlightning.training.passes.Passes over your training data)")
        return passes

    def warn_once(self, message: str) -> None:
        if not self.warned:
            self.warn(message)
        self.warned = True

    def reduced(self, model: nn.Module, passes: Passes | None, recorded: dict) -> dict:
        return recorded if passes is None else passes.reduced(model, self.plans, self.options, recorded)

    def evaluate_projected(self, model: nn.Module, passes: Passes, step: int) -> None:
        """Project the weights for an evaluation (BatchNorm re-estimated); ``restore`` brings back the trained ones."""
        modules = named_modules(model)
        tensors = [modules[p.name].weight for p in self.plans]
        if self.recalibration_batches:
            tensors += list(batchnorm_buffers(model).values())
        self.backup = [(tensor, tensor.detach().clone()) for tensor in tensors]
        self.projected(model, step, self.plans, self.statistics(model, passes, step))
        passes.recalibrate(model, self.recalibration_batches, step)

    def restore(self) -> None:
        """The weights and BatchNorm statistics from before ``evaluate_projected``."""
        with torch.no_grad():
            for tensor, saved in self.backup:
                tensor.copy_(saved)
        self.backup = []

    def stop(self) -> None:
        """Detach the recording hooks and bring back weights an interrupted evaluation projected."""
        self.window.detach()
        self.restore()

    def finish(self, model: nn.Module, passes: Passes, seed: int, plans: list[LayerPlan] | None = None,
               synchronize: bool = False) -> list[LayerStats]:
        """The end of training (``Passes.finish``) of ``plans`` (default the plan; named within ``model``): project,
        share rank 0's weights when ``synchronize``, re-estimate BatchNorm; draws seeded with ``seed``."""
        plans = self.plans if plans is None else plans
        share = (lambda module: broadcast_weights(module, plans)) if synchronize else None
        with divergence_named(seed):
            self.last_stats = passes.finish(model, plans, self.options, self.recalibration_batches, seed, share)
        return self.last_stats

    def factorize(self, model: nn.Module, trained: nn.Module | None = None) -> nn.Module:
        """A factorized copy of ``model`` at the plan: the trained module, a submodule of ``trained`` (plans named
        relative to it), or any module whose layers carry the plans' names; ``model`` is untouched."""
        plans = self.plans
        if not plans and self.restored_ranks:  # state loaded from a checkpoint, not fitted in this process
            plans = allocate_plan(model, self.options.replace_rank(self.restored_ranks), warn=False)[0]
        return factorize_planned(model, plans_within(plans, model, trained), self.options)

    def state_dict(self) -> dict[str, Any]:
        start, window = self.restored_phase or (self.final_phase_start, self.window.entries)  # not yet started
        return {"last_step": self.last_step, "projections": self.projections, "ranks": self.ranks,
                "final_phase_start": start, "statistics_window": StatisticsWindow(window).state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step", 0)
        self.projections = state_dict.get("projections", 0)
        window = StatisticsWindow.entries_of(state_dict.get("statistics_window"))
        self.restored_phase = (state_dict.get("final_phase_start"), window)
        ranks = state_dict.get("ranks") or {}
        self.restored_ranks = {canonical_name(name): rank for name, rank in ranks.items()} or None
