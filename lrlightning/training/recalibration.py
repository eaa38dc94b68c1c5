"""What BatchNorm re-estimation needs from a Lightning fit: training batches drawn independently of the training
order, and forward passes that leave no trace (nothing logged, torchmetrics states kept, no recompilation of
``torch.compile``d modules)."""
from __future__ import annotations

import contextlib
import copy
from itertools import islice
from typing import Any, Iterator

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torchmetrics import Metric
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler


def defines_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class implements ``forward`` (a LightningModule need not: it may call ``self.net``)."""
    return type(module).forward not in (LightningModule.forward, nn.Module.forward)


@contextlib.contextmanager
def silenced_logging(module: LightningModule) -> Iterator[None]:
    """``module.log`` and ``module.log_dict`` do nothing inside the block (a ``training_step`` run for BatchNorm
    statistics must not log, and may run in hooks where Lightning forbids logging)."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict


@contextlib.contextmanager
def preserved_metrics(module: nn.Module) -> Iterator[None]:
    """Every torchmetrics ``Metric`` of ``module`` holds the same state after the block as before it (a
    ``training_step`` run for BatchNorm statistics must not count its batches in the epoch's metrics)."""
    saved = [(metric, copy.deepcopy(metric.metric_state), metric._update_count, metric._computed)
             for metric in module.modules() if isinstance(metric, Metric)]
    try:
        yield
    finally:
        for metric, state, count, computed in saved:
            for name, value in state.items():
                setattr(metric, name, value)
            metric._update_count, metric._computed = count, computed


def run_training_step(module: LightningModule, batch: Any, index: int) -> Any:
    """``module.training_step(batch, index)``, or ``training_step(batch)`` where it takes no batch index (as
    Lightning calls it)."""
    if is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2):
        return module.training_step(batch, index)
    return module.training_step(batch)


def eager() -> contextlib.AbstractContextManager:
    """``torch.compile``d code runs eagerly inside the block, so no-grad passes trigger no recompilation
    (torch >= 2.6; a no-op before)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def reshuffled(loader: DataLoader, count: int, seed: int) -> Iterator[Any]:
    """Up to ``count`` batches of ``loader``'s map-style dataset (same batch size and collate, or the same batch
    sampler size for a dataset indexed by whole batches), in an order drawn by a generator seeded with ``seed`` and
    loaded in this process, so the loader's own order, workers and worker seeding play no part. Other loaders
    (iterable datasets, custom samplers) are read as they are, from their start. Nothing is drawn before the first
    batch is asked for, so a seed set then decides the random transforms of every batch."""
    dataset, generator = loader.dataset, torch.Generator().manual_seed(seed)
    if isinstance(dataset, IterableDataset):
        yield from islice(loader, count)
        return
    if loader.batch_size is not None:
        loader = DataLoader(dataset, batch_size=loader.batch_size, shuffle=True, generator=generator,
                            collate_fn=loader.collate_fn, drop_last=loader.drop_last)
    elif isinstance(loader.sampler, BatchSampler):
        sampler = BatchSampler(RandomSampler(dataset, generator=generator), loader.sampler.batch_size,
                               loader.sampler.drop_last)
        loader = DataLoader(dataset, batch_size=None, sampler=sampler, collate_fn=loader.collate_fn)
    yield from islice(loader, count)


def training_batches(trainer: Trainer, count: int, seed: int) -> Iterator[Any]:
    """``reshuffled`` batches of the fit's training DataLoader, on the module's device and precision, drawn with
    seed ``seed · world_size + global_rank``: each process of a distributed fit draws its own batches (what it
    sums or averages with the others is new data), and a single process draws with ``seed`` itself. Yields
    nothing before the loader exists (sanity validation); raises ``TypeError`` for several training loaders."""
    loader = trainer.train_dataloader
    if loader is None:
        return
    if not isinstance(loader, DataLoader):
        raise TypeError(f"BatchNorm re-estimation needs a single training DataLoader, got {type(loader).__name__}")
    for batch in reshuffled(loader, count, seed * trainer.world_size + trainer.global_rank):
        yield trainer.strategy.batch_to_device(trainer.precision_plugin.convert_input(batch))
