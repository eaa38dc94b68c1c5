"""Forward passes on training batches drawn by seed, shared by the callback and the app: the input statistics of
an ``Activation`` objective, BatchNorm re-estimation, the mean training loss, and the finish of training (project,
re-estimate, averaged over processes)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from ..activations import LayerStatistics
from ..batchnorm import batchnorm_layers, kept_batchnorm_statistics, recalibrate_batchnorm_, seeded
from ..finish import finish_
from ..options import LowRankOptions
from ..plan import LayerPlan
from ..projection import LayerStats, empty_statistics, gather_statistics
from .recalibration import defines_forward, eager, preserved_metrics, run_training_step, silenced_logging, \
    training_batches
from ..transfer import host_lists

Forward = Callable[[nn.Module, Any, int], Any]  # (module, batch, index) -> anything; one forward pass


class Passes:
    """Forward passes of a model on batches ``draw(count, seed)`` yields, each run as ``forward(model, batch,
    index)`` inside ``context()``; ``reduce(tensor, reduce_op)`` combines a tensor over processes (None: one
    process)."""

    def __init__(self, draw: Callable[[int, int], Iterable[Any]], forward: Forward,
                 context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 reduce: Callable[..., torch.Tensor] | None = None):
        self.draw, self.forward, self.context, self.reduce = draw, forward, context, reduce

    def run_item(self, model: nn.Module, item: tuple[int, Any]) -> None:
        self.forward(model, item[1], item[0])

    def batches(self, count: int, seed: int) -> Iterable[tuple[int, Any]]:
        return enumerate(self.draw(count, seed))

    def statistics(self, model: nn.Module, plans: list[LayerPlan], options: LowRankOptions, count: int,
                   seed: int) -> dict[str, LayerStatistics]:
        """Input statistics of the planned layers over ``count`` batches drawn with ``seed``, summed over
        processes (``reduced``)."""
        with self.context():
            statistics = gather_statistics(model, plans, options, self.batches(count, seed), self.run_item, seed)
        return self.reduced(model, plans, options, statistics)

    def reduced(self, model: nn.Module, plans: list[LayerPlan], options: LowRankOptions,
                statistics: dict[str, LayerStatistics]) -> dict[str, LayerStatistics]:
        """``statistics`` summed over processes, in place (every process reduces every planned layer, in plan
        order, seen or not); a layer no process ran is left out."""
        if self.reduce is None:
            return statistics
        device = next(model.parameters()).device
        layers = [statistics.get(plan.name) or empty_statistics(plan, options, device) for plan in plans]
        for layer in layers:
            for tensor in layer.tensors():
                tensor.copy_(self.reduce(tensor, reduce_op="sum"))
        (rows,) = host_lists([torch.stack([layer.rows.reshape(()) for layer in layers])])
        return {plan.name: layer for plan, layer, seen in zip(plans, layers, rows) if seen > 0}

    def recalibrate(self, model: nn.Module, count: int, seed: int) -> None:
        """Re-estimate BatchNorm running statistics over ``count`` batches (0 or no BatchNorm: nothing to do),
        averaged over processes."""
        if not (count and batchnorm_layers(model)):
            return
        with self.context():
            recalibrate_batchnorm_(model, self.batches(count, seed), self.run_item, seed=seed)
        self.average_batchnorm(model)

    def average_batchnorm(self, model: nn.Module) -> None:
        if self.reduce is None:
            return
        with torch.no_grad():
            for layer in batchnorm_layers(model):
                for buffer in (layer.running_mean, layer.running_var):
                    buffer.copy_(self.reduce(buffer, reduce_op="mean"))

    def finish(self, model: nn.Module, plans: list[LayerPlan], options: LowRankOptions, recalibration_batches: int,
               seed: int, synchronize: Callable[[nn.Module], None] | None = None) -> list[LayerStats]:
        """The end of training (``lrlightning.finish.finish_``): project the planned weights (an ``Activation``
        objective from ``options.objective.batches`` batches), ``synchronize(model)``, re-estimate BatchNorm over
        ``recalibration_batches`` batches; every draw seeded with ``seed``."""
        statistics = None
        if options.weighted:
            statistics = self.statistics(model, plans, options, options.objective.batches, seed)
        count = recalibration_batches if batchnorm_layers(model) else 0
        with self.context():
            stats = finish_(model, plans, options, self.batches(count, seed) if count else (), self.run_item,
                            seed=seed, synchronize=synchronize, statistics=statistics)
        if count:
            self.average_batchnorm(model)
        return stats

    def mean_loss(self, model: LightningModule, count: int, seed: int) -> float:
        """Mean ``training_step`` loss over ``count`` batches (no grad, train mode, BatchNorm statistics kept),
        averaged over processes."""
        losses = []
        with torch.no_grad(), self.context(), kept_batchnorm_statistics(model), seeded(model.device, seed):
            for index, batch in self.batches(count, seed):
                output = run_training_step(model, batch, index)
                loss = output.get("loss") if isinstance(output, dict) else output
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(f"`loss_jump_batches` needs `training_step` to return the loss (a tensor or a "
                                    f"dict with 'loss'), got {type(output).__name__}")
                losses.append(loss.detach().float())
        if not losses:
            raise ValueError(f"`loss_jump_batches`={count} found no training batch to measure the loss on")
        mean = torch.stack(losses).mean()
        return float(self.reduce(mean, reduce_op="mean") if self.reduce is not None else mean)

    def check(self, model: nn.Module, purpose: str, hint: str, seed: int) -> None:
        """Run one pass in eval mode (running statistics untouched); raise a ``RuntimeError`` naming ``purpose``
        and the options to set (``hint``) when it fails."""
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), self.context():
                for index, batch in self.batches(1, seed):
                    self.forward(model, batch, index)
        except Exception as error:
            raise RuntimeError(f"{purpose} cannot run on {type(model).__name__}'s training batches "
                               f"({type(error).__name__}: {error}). {hint}") from error
        finally:
            model.train(was_training)


def module_forward(module: LightningModule, batch: Any, index: int, step: Forward | None = None,
                   inputs: Any = None) -> None:
    """One forward pass of ``module`` on a training batch: ``step(module, batch)`` when given; else
    ``module(inputs)`` when the module defines ``forward`` and ``inputs`` (what its forward takes from the batch) is
    a tensor or was chosen by an override; else the module's own ``training_step`` (automatic optimization)."""
    if step is not None:
        step(module, batch)
        return
    if defines_forward(module) and inputs is not None:
        module(inputs)
        return
    if not module.automatic_optimization:
        kind = "a tensor input" if defines_forward(module) else "`forward`"
        raise TypeError(f"{type(module).__name__} uses manual optimization and has no {kind} for its batches of "
                        f"type {type(batch).__name__}, so BatchNorm re-estimation cannot run it")
    run_training_step(module, batch, index)


def first_item(batch: Any) -> Any:
    """What a module's forward takes from a training batch by default: the first item of a tuple/list, else the
    batch."""
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


def batch_forward(step: Forward | None = None, input_of: Callable[[Any], Any] = first_item,
                  chosen: bool = False) -> Forward:
    """``module_forward`` with the input ``input_of(batch)`` when the module defines ``forward`` and that input is
    a tensor, or was ``chosen`` by the caller (an override of the default ``first_item``)."""
    def forward(module: LightningModule, batch: Any, index: int) -> None:
        inputs = None
        if step is None and defines_forward(module):
            inputs = input_of(batch)
            inputs = inputs if chosen or isinstance(inputs, torch.Tensor) else None
        module_forward(module, batch, index, step, inputs)

    return forward


@contextlib.contextmanager
def trainer_context(trainer: Trainer, module: LightningModule) -> Iterator[None]:
    """Where passes during a fit run: the precision plugin's context, nothing logged, metric states kept,
    compiled code eager."""
    with silenced_logging(module), preserved_metrics(module), eager(), trainer.precision_plugin.forward_context():
        yield


def trainer_passes(trainer: Trainer, module: LightningModule, forward: Forward) -> Passes:
    """``Passes`` over the fit's training DataLoader (``training_batches``: each process draws its own batches),
    reduced over the strategy's processes."""
    def draw(count: int, seed: int) -> Iterator[Any]:
        if trainer.train_dataloader is None and trainer.state.fn == "fit":
            trainer.fit_loop.setup_data()  # the sanity check runs before the loop loads it (as Lightning does)
        return training_batches(trainer, count, seed)

    reduce = trainer.strategy.reduce if trainer.world_size > 1 else None
    return Passes(draw, forward, lambda: trainer_context(trainer, module), reduce)
