"""The paper's baseline, decompose then fine-tune (``baseline=decompose_finetune``), and decomposition alone
(``baseline=decompose``): finish a dense model into its factorized structure, then train that structure."""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from omegaconf import DictConfig

from ..training.distillation import frozen_teacher
from .evaluation import run_test, val_accuracy
from .job import (backbone_spec, data_facts, data_passes, deployer, distillation, finish_backbone, fit, input_shape,
                  make_trainer, resume_path, run_facts)
from ..training.callback import LowRankProjection
from .ranks import backbone_plan
from .report import summarize, write_outputs

BASELINES = ("decompose_finetune", "decompose")


def decompose(cfg: DictConfig, run_dir: Path, datamodule, model: LightningModule, config: dict,
              projection: LowRankProjection | None) -> dict | None:
    """Finish the dense model (``init_ckpt``, else trained first with the same Trainer settings under ``dense/``)
    as ``projection`` (the job's ``lowrank`` callback) finishes training: project, re-estimate BatchNorm, factorize; then, for ``decompose_finetune``,
    fine-tune the factorized structure. Tests it; returns the summary on global rank zero."""
    if projection is None:
        raise ValueError(f"`baseline`={cfg.baseline!r} needs a low-rank preset (lowrank=tucker2, svd, ...), "
                         "got lowrank=none")
    if not cfg.init_ckpt:
        dense_trainer = make_trainer(cfg, run_dir / "dense", [], {**config, "baseline": None, "lowrank": None})
        fit(dense_trainer, model, datamodule, resume_path(None, run_dir / "dense"))
    plan = backbone_plan(model, projection.options, passes=data_passes(datamodule), seed=cfg.seed)
    trainer = make_trainer(cfg, run_dir, [], config)
    metrics = run_test(trainer, datamodule, dense=model.backbone)
    distill = distillation(cfg)
    teacher = frozen_teacher(model.backbone) if distill is not None else None  # finishing projects the backbone
    small = finish_backbone(model, datamodule, plan, projection, cfg.seed)
    metrics.update(run_test(trainer, datamodule, decomposed=small))
    tuned, seconds = cfg.baseline == "decompose_finetune", 0.0
    if tuned:
        finetune = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels,
                               _partial_=True)(backbone=small)
        if teacher is not None:
            finetune.distill_from(teacher, distill.weight, distill.temperature)
        seconds = fit(trainer, finetune, datamodule, resume_path(cfg.ckpt_path, run_dir))
        metrics.update(run_test(trainer, datamodule, factorized=small))
    else:
        metrics["acc_factorized"] = metrics["acc_decomposed"]
    metrics["val_acc_factorized"] = val_accuracy(trainer, datamodule, small)
    if not trainer.is_global_zero:
        return None
    facts = run_facts(trainer, seconds, cfg.init_ckpt, config)
    extra = {"every_n_train_steps": None, "num_projections": 0, **facts,
             "checkpoint": facts["checkpoint"] if tuned else None, **data_facts(datamodule)}
    summary = summarize(cfg.baseline, plan, model.backbone, small, input_shape(datamodule), cfg.latency_batch_sizes,
                        metrics, extra)
    return write_outputs(run_dir, small, backbone_spec(model), summary,
                         deployer(cfg, run_dir, model.backbone, small, datamodule, plan))
