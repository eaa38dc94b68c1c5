"""The paper's baseline, decompose then fine-tune: factorize a dense model, train the factorized structure."""
from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from omegaconf import DictConfig

from ..export import factorize
from .evaluation import run_test
from .job import backbone_spec, fit, input_shape, make_trainer, resume_path, run_facts
from .ranks import export_ranks, factorize_args
from .report import summarize, write_outputs


def decompose_finetune(cfg: DictConfig, run_dir: Path, datamodule, model: LightningModule, config: dict) -> dict | None:
    """Factorize the dense model (``init_ckpt``, else trained first with the same Trainer settings under
    ``dense/``), then fine-tune the factorized structure and test it; returns the summary on global rank zero."""
    if cfg.get("lowrank") is None:
        raise ValueError("`baseline`='decompose_finetune' needs a low-rank preset (lowrank=tucker2, svd, ...), "
                         "got lowrank=none")
    options = instantiate(cfg.lowrank, _convert_="all").options
    if not cfg.init_ckpt:
        dense_trainer = make_trainer(cfg, run_dir / "dense", [], {**config, "baseline": None, "lowrank": None})
        fit(dense_trainer, model, datamodule, resume_path(None, run_dir / "dense"))
    ranks = export_ranks(model, options)
    dense = model.backbone
    small = factorize(dense, **factorize_args(options, ranks))
    trainer = make_trainer(cfg, run_dir, [], config)
    metrics = run_test(trainer, datamodule, dense=dense, decomposed=small)
    metrics.pop("max_abs_logit_diff", None)
    finetune = instantiate(cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels,
                           _partial_=True)(backbone=small)
    seconds = fit(trainer, finetune, datamodule, resume_path(cfg.ckpt_path, run_dir))
    metrics.update(run_test(trainer, datamodule, factorized=small))
    if not trainer.is_global_zero:
        return None
    extra = {"every_n_train_steps": None, "num_projections": 0, **run_facts(trainer, seconds, cfg.init_ckpt, config)}
    summary = summarize("decompose_finetune", options, ranks, dense, small, input_shape(datamodule),
                        cfg.latency_batch_size, metrics, extra)
    return write_outputs(run_dir, small, backbone_spec(model), summary)
