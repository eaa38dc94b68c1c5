"""The steps the jobs share: the model and its initial weights, a Trainer writing into the run dir (checkpoints
holding the job's config, resumed when rerun), the finish of the backbone (as the callback finishes it) and the
tested factorized export."""
from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch import nn

from ..training.callback import LowRankProjection
from ..training.distillation import Distillation
from ..export import factorize_planned
from ..training.passes import Passes
from ..plan import Plan
from ..training.recalibration import reshuffled
from .deploy import deploy
from .evaluation import run_test, val_accuracy
from .report import summarize, training_facts, write_outputs

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CONFIG_KEY = "lrlightning_config"


class StoreConfig(Callback):
    """Puts the job's resolved config into every checkpoint (key ``lrlightning_config``) for ``lrl-export``."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def build_model(model_cfg: DictConfig, datamodule) -> LightningModule:
    """The configured LightningModule, with classes and channels taken from the datamodule."""
    return instantiate(model_cfg, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels)


def backbone_spec(model: LightningModule) -> dict | None:
    """What ``load_factorized`` needs to rebuild the dense skeleton without Hydra (registry backbones only)."""
    hp = model.hparams
    if not isinstance(hp.get("backbone"), str):
        return None
    return {"name": hp.backbone, "num_classes": hp.num_classes, "in_channels": hp.in_channels,
            **(hp.get("backbone_kwargs") or {})}


def load_weights(model: LightningModule, path: str) -> None:
    """Load the ``state_dict`` of a Lightning checkpoint into ``model`` (weights only, strict)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"`init_ckpt` must be an existing checkpoint file, got {path!r}")
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"`init_ckpt` {path!r} holds no 'state_dict' (expected a Lightning checkpoint)")
    model.load_state_dict(checkpoint["state_dict"])
    log.info("initial weights from %s", file)


def resume_path(ckpt_path: str | None, root: Path) -> str | None:
    """``ckpt_path``, else the newest of ``root``'s last.ckpt and hpc_ckpt_*.ckpt (a requeued or rerun job)."""
    if ckpt_path:
        return str(ckpt_path)
    found = [p for p in [root / CHECKPOINTS / "last.ckpt", *root.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    log.info("resuming from %s", newest)
    return str(newest)


def make_trainer(cfg: DictConfig, root: Path, callbacks: list[Callback], config: dict) -> Trainer:
    """The configured Trainer writing into ``root``: ``checkpoints/last.ckpt`` (with the job's config), written at
    every epoch's end, and logs. Lightning writes ``last.ckpt`` only beside a kept checkpoint, so the newest epoch's
    is kept too (``save_top_k=1``, no monitor)."""
    checkpoint = ModelCheckpoint(dirpath=root / CHECKPOINTS, save_top_k=1, save_last=True)
    logger = instantiate(cfg.logger, save_dir=str(root)) if cfg.get("logger") else False
    return instantiate(cfg.trainer, default_root_dir=str(root), logger=logger,
                       callbacks=[checkpoint, StoreConfig(config), *callbacks])


def fit(trainer: Trainer, model: LightningModule, datamodule, ckpt_path: str | None) -> float:
    """``trainer.fit``; returns seconds spent; raises if training was interrupted (no result is written then)."""
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted; no result written")
    return time.perf_counter() - start


def run_facts(trainer: Trainer, seconds: float, init_ckpt: str | None, config: dict) -> dict[str, Any]:
    """The ``summary.json`` fields of a training run: its progress, initial weights, checkpoint and config."""
    return {**training_facts(trainer, seconds), "init_ckpt": init_ckpt, "checkpoint": f"{CHECKPOINTS}/last.ckpt",
            "config": config}


def data_facts(datamodule) -> dict[str, Any]:
    """The ``summary.json`` fields of the data: ``class_names`` (label i is ``class_names[i]``) where the
    datamodule names its classes (image folders), else None."""
    names = getattr(datamodule, "class_names", None)
    return {"class_names": list(names) if names is not None else None}


def input_shape(datamodule) -> tuple[int, int, int]:
    """(C, H, W) of the datamodule's images."""
    return datamodule.in_channels, datamodule.image_size, datamodule.image_size


def data_passes(datamodule) -> Passes:
    """``Passes`` of a backbone on the datamodule's training batches (``reshuffled`` by seed), ``backbone(x)``."""
    datamodule.setup("fit")

    def forward(backbone: nn.Module, batch: Any, index: int) -> None:
        backbone(batch[0])

    return Passes(lambda count, seed: reshuffled(datamodule.train_dataloader(), count, seed), forward)


def finish_backbone(model: LightningModule, datamodule, plan: Plan, projection: LowRankProjection,
                    seed: int) -> nn.Module:
    """The end of training of ``projection`` (``Passes.finish``) on ``model.backbone`` at ``plan`` (named relative to
    it), with batches drawn from the datamodule with ``seed`` (the optimizer step), then its factorized copy."""
    projection.projector.finish(model.backbone, data_passes(datamodule), seed, list(plan.layers))
    return factorize_planned(model.backbone, plan)


def deployer(cfg: DictConfig, run_dir: Path, dense: nn.Module, small: nn.Module, datamodule, plan: Plan | None):
    """The job's ``deploy`` step (``lrlightning.app.deploy``) of ``dense`` and ``small`` (only ``dense`` when no
    layer is factorized), to run once the outputs are written."""
    return partial(deploy, cfg.get("deploy"), run_dir, dense, small if plan is not None and plan.layers else None,
                   datamodule,
                   input_shape(datamodule), max(cfg.latency_batch_sizes), cfg.seed)


def evaluate_and_export(trainer: Trainer, datamodule, model: LightningModule, plan: Plan | None, small: nn.Module,
                        run_dir: Path, method: str, cfg: DictConfig, extra: dict[str, Any]) -> dict | None:
    """Test the finished backbone and ``small``, its factorized copy at ``plan`` (the backbone itself when no layer
    is factorized, or no plan: a dense run), and on global rank zero write the outputs and deploy them
    (``cfg.deploy``)."""
    if plan is not None and plan.layers:
        metrics = run_test(trainer, datamodule, projected=model.backbone, factorized=small)
    else:
        metrics = run_test(trainer, datamodule, projected=model.backbone)
        metrics.update(acc_factorized=metrics["acc_projected"], max_abs_logit_diff=0.0)
    metrics["val_acc_factorized"] = val_accuracy(trainer, datamodule, small)
    if not trainer.is_global_zero:
        return None
    summary = summarize(method, plan, model.backbone, small, input_shape(datamodule), cfg.latency_batch_sizes,
                        metrics, extra)
    return write_outputs(run_dir, small, backbone_spec(model), summary,
                         deployer(cfg, run_dir, model.backbone, small, datamodule, plan))


def distillation(cfg: DictConfig) -> Distillation | None:
    """The job's ``distill`` settings (None when ``distill.weight`` is 0): the dense model (``init_ckpt``) teaches
    the method and decompose-then-fine-tune alike."""
    settings = cfg.get("distill") or {}
    if not settings.get("weight", 0):
        return None
    distill = Distillation(settings.get("weight"), settings.get("temperature", Distillation.temperature))
    if not cfg.init_ckpt and cfg.baseline is None:
        raise ValueError(f"`distill.weight`={distill.weight} needs a dense teacher: set `init_ckpt` (a trained "
                         "dense checkpoint the run starts from)")
    return distill
