"""The job behind ``lrl-train``: train with the low-rank projection callback (or run a baseline), test the projected
dense and the factorized model, and write the factorized model and ``summary.json`` (with date, commit and machine)
into the run dir. ``summary.json`` is written last and atomically: a run dir without it holds no result."""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf

from ..speed.allocator import retain_freed_memory
from ..training.distillation import frozen_teacher
from ..rules import is_int
from .baseline import BASELINES, decompose
from .deploy import check_deploy
from .job import build_model, data_facts, distillation, evaluate_and_export, finish_backbone, fit, load_weights, \
    make_trainer, resume_path, run_facts
from .ranks import BACKBONE, check_batch_sizes, projection_of
from .report import METHOD, SUMMARY, allocation_facts

REQUIRED = "required"  # value of `init_ckpt` in experiments that start from a dense checkpoint


def check_job(cfg: DictConfig) -> None:
    """Raise a ValueError naming the first job setting (baseline, init_ckpt, seed, ...) that is not allowed."""
    if cfg.baseline not in (None, *BASELINES):
        raise ValueError(f"`baseline` must be one of {[None, *BASELINES]}, got {cfg.baseline!r}")
    if cfg.init_ckpt == REQUIRED:
        raise ValueError("`init_ckpt` is required by this experiment: a dense checkpoint to start from, e.g. "
                         "init_ckpt=/abs/path/to/run/checkpoints/last.ckpt (see the experiment's header)")
    if not (is_int(cfg.seed) and cfg.seed >= 0):
        raise ValueError(f"`seed` must be an int >= 0, got {cfg.seed!r}")
    check_batch_sizes(cfg.latency_batch_sizes)
    check_deploy(cfg.get("deploy"))
    distillation(cfg)


def train(cfg: DictConfig, run_dir: Path) -> dict | None:
    """``lrl-train`` (conf/train.yaml); returns the summary on global rank zero."""
    check_job(cfg)
    if cfg.get("retain_freed_memory", True):
        retain_freed_memory()
    (run_dir / SUMMARY).unlink(missing_ok=True)
    seed_everything(cfg.seed, workers=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    datamodule = instantiate(cfg.data)
    projection = None
    if cfg.get("lowrank") is not None:
        projection = projection_of(config["lowrank"], datamodule, cfg.latency_batch_sizes)
    callbacks = [projection] if projection is not None else []
    model = build_model(cfg.model, datamodule)
    if cfg.init_ckpt:
        load_weights(model, cfg.init_ckpt)
    distill = distillation(cfg)
    if distill is not None and projection is not None and not cfg.baseline:
        model.distill_from(frozen_teacher(model.backbone), distill.weight, distill.temperature)
    if cfg.baseline:
        return decompose(cfg, run_dir, datamodule, model, config, projection)
    trainer = make_trainer(cfg, run_dir, callbacks, config)
    seconds = fit(trainer, model, datamodule, resume_path(cfg.ckpt_path, run_dir))
    facts = run_facts(trainer, seconds, cfg.init_ckpt, config)
    if projection is None:
        extra = {"every_n_train_steps": None, "num_projections": 0, **facts, **data_facts(datamodule)}
        return evaluate_and_export(trainer, datamodule, model, None, model.backbone, run_dir, "dense", cfg, extra)
    plan = projection.projector.plan.relative(BACKBONE)
    if projection.final_projection:
        small = projection.factorize(model.backbone)
    else:
        small = finish_backbone(model, datamodule, plan, projection, trainer.global_step)
    extra = {"every_n_train_steps": projection.every_n_train_steps, "num_projections": projection.num_projections,
             "projection_log": projection.history, **allocation_facts(projection.allocation), **facts,
             **data_facts(datamodule)}
    return evaluate_and_export(trainer, datamodule, model, plan, small, run_dir, METHOD, cfg, extra)
