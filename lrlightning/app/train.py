"""The jobs behind ``lrl-train`` and ``lrl-export``: train with the low-rank projection callback (or the
decompose-then-fine-tune baseline), test the projected dense and the factorized model, and write the factorized
model and ``summary.json`` into the run dir. ``summary.json`` is written last and atomically: a run dir without it
holds no result."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from ..callback import LowRankProjection
from ..counting import count_macs, count_params
from ..export import factorize, save_factorized
from ..speed import cpu_latency_ms
from .module import LitClassifier
from ..options import LowRankOptions, is_int
from ..plan import frozen_ranks, plan_layers
from ..projection import project_
from ..summary import format_table

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
FACTORIZED = "factorized.pt"
CHECKPOINTS = "checkpoints"
CONFIG_KEY = "lrlightning_config"
PREFIX = "backbone."
BASELINES = (None, "decompose_finetune")
RANK_RULES = {"rank", "energy", "compression"}
REQUIRED = "required"  # value of `init_ckpt` in experiments that start from a dense checkpoint


class StoreConfig(Callback):
    """Puts the job's resolved config into every checkpoint (key ``lrlightning_config``) for ``lrl-export``."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


class Evaluation(LightningModule):
    """Test-only module: accuracy of each named backbone (``test/acc_<name>``) and the max |logit difference|
    between the first two (``test/max_abs_logit_diff``)."""

    def __init__(self, num_classes: int, **backbones: nn.Module):
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)
        self.accuracy = nn.ModuleDict({name: MulticlassAccuracy(num_classes, average="micro") for name in backbones})
        self.max_diff = MaxMetric()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = [backbone(x) for backbone in self.backbones.values()]
        for name, out in zip(self.backbones, logits):
            self.accuracy[name](out, y)
            self.log(f"test/acc_{name}", self.accuracy[name])
        if len(logits) > 1:
            self.max_diff((logits[0] - logits[1]).abs().max())
            self.log("test/max_abs_logit_diff", self.max_diff)


def run_test(trainer: Trainer, datamodule, **backbones: nn.Module) -> dict[str, float]:
    """Test the named backbones on the datamodule's test set; ``{"acc_<name>": ..., "max_abs_logit_diff": ...}``."""
    results = trainer.test(Evaluation(datamodule.num_classes, **backbones), datamodule=datamodule, verbose=False)
    return {key.removeprefix("test/"): float(value) for key, value in results[0].items()}


def check_job(cfg: DictConfig) -> None:
    if cfg.baseline not in BASELINES:
        raise ValueError(f"`baseline` must be one of {list(BASELINES)}, got {cfg.baseline!r}")
    if cfg.init_ckpt == REQUIRED:
        raise ValueError("`init_ckpt` is required by this experiment: a dense checkpoint to start from, e.g. "
                         "init_ckpt=/abs/path/to/run/checkpoints/last.ckpt (see the experiment's header)")
    for key, minimum in (("seed", 0), ("latency_batch_size", 1)):
        if not (is_int(cfg[key]) and cfg[key] >= minimum):
            raise ValueError(f"`{key}` must be an int >= {minimum}, got {cfg[key]!r}")


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
    """The configured Trainer writing into ``root``: ``checkpoints/last.ckpt`` (with the job's config) and logs."""
    checkpoint = ModelCheckpoint(dirpath=root / CHECKPOINTS, save_top_k=0, save_last=True)
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


def backbone_ranks(ranks: dict[str, Any]) -> dict[str, Any]:
    """Layer ranks keyed relative to the LightningModule -> keyed relative to its ``backbone``."""
    outside = [name for name in ranks if not name.startswith(PREFIX)]
    if outside:
        raise ValueError(f"low-rank layers outside `backbone` cannot be exported: {outside}")
    return {name[len(PREFIX):]: rank for name, rank in ranks.items()}


def factorize_args(options: LowRankOptions, ranks: dict[str, Any]) -> dict[str, Any]:
    """``factorize``/``project_`` arguments that reproduce a plan on the backbone exactly."""
    return dict(scheme=options.scheme, rank=ranks, tile_shape=options.tile_shape, include=list(ranks),
                linear=options.linear, hooi_iters=options.hooi_iters, svd_driver=options.svd_driver)


def rank_rule(options: LowRankOptions | None) -> Any:
    if options is None:
        return None
    if options.rank is not None:
        return list(options.rank) if isinstance(options.rank, tuple) else options.rank
    return f"energy={options.energy}" if options.energy is not None else f"compression={options.compression}"


def training_facts(trainer: Trainer, seconds: float) -> dict[str, Any]:
    loss = trainer.callback_metrics.get("train/loss")
    loss = None if loss is None else float(loss)
    return {"epochs": trainer.current_epoch, "global_step": trainer.global_step, "train_seconds": round(seconds, 1),
            "train_loss": loss, "diverged": loss is not None and not math.isfinite(loss)}


def summarize(method: str, options: LowRankOptions | None, ranks: dict, dense: nn.Module, small: nn.Module,
              input_shape: tuple[int, ...], latency_batch_size: int, metrics: dict, extra: dict) -> dict[str, Any]:
    """The fields of ``summary.json`` (``extra`` last)."""
    plans = plan_layers(dense, LowRankOptions(**factorize_args(options, ranks)), warn=False)[0] if ranks else []
    weights_dense = sum(p.params_dense for p in plans)
    weights_factorized = sum(p.params_factorized for p in plans)
    params_dense, params_factorized = count_params(dense), count_params(small)
    macs_dense, macs_factorized = count_macs(dense, input_shape), count_macs(small, input_shape)
    return {
        "method": method,
        "scheme": options.scheme if options else None,
        "rank": rank_rule(options),
        "layers_compressed": len(plans),
        "params_dense": params_dense,
        "params_factorized": params_factorized,
        "macs_dense": macs_dense,
        "macs_factorized": macs_factorized,
        "compression_ratio": weights_dense / weights_factorized if plans else 1.0,
        "model_compression_ratio": params_dense / params_factorized,
        "mac_reduction": macs_dense / macs_factorized,
        "test_acc_projected": metrics.get("acc_projected"),
        "test_acc_factorized": metrics.get("acc_factorized"),
        "max_abs_logit_diff": metrics.get("max_abs_logit_diff"),
        **{f"test_{k}": v for k, v in metrics.items() if k in ("acc_dense", "acc_decomposed")},
        "latency_ms_dense": cpu_latency_ms(dense, input_shape, latency_batch_size),
        "latency_ms_factorized": cpu_latency_ms(small, input_shape, latency_batch_size),
        "latency_batch_size": latency_batch_size,
        "latency_threads": torch.get_num_threads(),
        "ranks": {name: list(r) if isinstance(r, tuple) else r for name, r in ranks.items()},
        **extra,
    }


def summary_table(s: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f} %"

    dense_acc = s["test_acc_projected"] if s["test_acc_projected"] is not None else s.get("test_acc_dense")
    rows = [
        ["parameters", f"{s['params_dense']:,}", f"{s['params_factorized']:,}", f"{s['model_compression_ratio']:.2f}x"],
        ["MACs per image", f"{s['macs_dense']:,}", f"{s['macs_factorized']:,}", f"{s['mac_reduction']:.2f}x"],
        [f"CPU latency, batch {s['latency_batch_size']}", f"{s['latency_ms_dense']:.1f} ms",
         f"{s['latency_ms_factorized']:.1f} ms", f"{s['latency_ms_dense'] / s['latency_ms_factorized']:.2f}x"],
        ["test accuracy", pct(dense_acc), pct(s["test_acc_factorized"]), ""],
    ]
    head = f"{s['method']}: no low-rank layers"
    if s["scheme"] is not None:
        head = (f"{s['method']}: {s['scheme']} rank {s['rank']} on {s['layers_compressed']} layers, "
                f"{s['compression_ratio']:.2f}x smaller over those layers")
    if s["scheme"] is not None and s["max_abs_logit_diff"] is not None:
        head += f"; max |logit diff| dense vs factorized {s['max_abs_logit_diff']:.1e}"
    if s.get("test_acc_decomposed") is not None:
        head += f"; {pct(s['test_acc_decomposed'])} right after decomposition"
    dense_label = "dense (projected)" if s["test_acc_projected"] is not None else "dense"
    return head + "\n" + format_table(["", dense_label, "factorized", "ratio"], rows)


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def write_outputs(run_dir: Path, small: nn.Module, spec: dict | None, summary: dict) -> dict:
    """Factorized model (weights + structure spec), then ``summary.json``; logs the summary table."""
    summary["factorized"] = FACTORIZED
    save_factorized(small, run_dir / FACTORIZED, backbone=spec, metadata=summary)
    write_json(run_dir / SUMMARY, summary)
    log.info("summary (%s)\n%s", run_dir / SUMMARY, summary_table(summary))
    return summary


def evaluate_and_export(trainer: Trainer, datamodule, model: LightningModule, options: LowRankOptions | None,
                    ranks: dict, run_dir: Path, method: str, latency_batch_size: int, extra: dict) -> dict | None:
    """Project the backbone onto ``ranks`` (a no-op after the callback's final projection), factorize it, test
    both, and on global rank zero write the outputs. Without ``ranks`` the dense model is its own export."""
    small = model.backbone
    if ranks:
        project_(model.backbone, **factorize_args(options, ranks))
        small = factorize(model.backbone, **factorize_args(options, ranks))
        metrics = run_test(trainer, datamodule, projected=model.backbone, factorized=small)
    else:
        metrics = run_test(trainer, datamodule, projected=model.backbone)
        metrics.update(acc_factorized=metrics["acc_projected"], max_abs_logit_diff=0.0)
    if not trainer.is_global_zero:
        return None
    shape = (datamodule.in_channels, datamodule.image_size, datamodule.image_size)
    summary = summarize(method, options, ranks, model.backbone, small, shape, latency_batch_size, metrics, extra)
    return write_outputs(run_dir, small, backbone_spec(model), summary)


def train(cfg: DictConfig, run_dir: Path) -> dict | None:
    """``lrl-train`` (conf/train.yaml); returns the summary on global rank zero."""
    check_job(cfg)
    (run_dir / SUMMARY).unlink(missing_ok=True)
    callbacks = [instantiate(cfg.lowrank, _convert_="all")] if cfg.get("lowrank") is not None else []
    seed_everything(cfg.seed, workers=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    datamodule = instantiate(cfg.data)
    model = build_model(cfg.model, datamodule)
    if cfg.init_ckpt:
        load_weights(model, cfg.init_ckpt)
    if cfg.baseline == "decompose_finetune":
        return decompose_finetune(cfg, run_dir, datamodule, model, config)
    trainer = make_trainer(cfg, run_dir, callbacks, config)
    seconds = fit(trainer, model, datamodule, resume_path(cfg.ckpt_path, run_dir))
    projection = next((cb for cb in trainer.callbacks if isinstance(cb, LowRankProjection)), None)
    options = projection.options if projection else None
    ranks = backbone_ranks(projection.ranks) if projection else {}
    extra = {"every_n_train_steps": projection.every_n_train_steps if projection else None,
             "num_projections": projection.num_projections if projection else 0,
             **training_facts(trainer, seconds), "init_ckpt": cfg.init_ckpt,
             "checkpoint": f"{CHECKPOINTS}/last.ckpt", "config": config}
    method = "deeptwist" if projection else "dense"
    return evaluate_and_export(trainer, datamodule, model, options, ranks, run_dir, method, cfg.latency_batch_size, extra)


def decompose_finetune(cfg: DictConfig, run_dir: Path, datamodule, model: LightningModule, config: dict) -> dict | None:
    """The paper's baseline: factorize the dense model (``init_ckpt``, else trained first with the same Trainer
    settings under ``dense/``), then fine-tune the factorized structure and test it."""
    if cfg.get("lowrank") is None:
        raise ValueError("`baseline`='decompose_finetune' needs a low-rank preset (lowrank=tucker2, svd, ...), "
                         "got lowrank=none")
    options = instantiate(cfg.lowrank, _convert_="all").options
    if not cfg.init_ckpt:
        dense_trainer = make_trainer(cfg, run_dir / "dense", [], {**config, "baseline": None, "lowrank": None})
        fit(dense_trainer, model, datamodule, resume_path(None, run_dir / "dense"))
    ranks = backbone_ranks(frozen_ranks(plan_layers(model, options)[0]))
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
    shape = (datamodule.in_channels, datamodule.image_size, datamodule.image_size)
    extra = {"every_n_train_steps": None, "num_projections": 0, **training_facts(trainer, seconds),
             "init_ckpt": cfg.init_ckpt, "checkpoint": f"{CHECKPOINTS}/last.ckpt", "config": config}
    summary = summarize("decompose_finetune", options, ranks, dense, small, shape, cfg.latency_batch_size, metrics,
                        extra)
    return write_outputs(run_dir, small, backbone_spec(model), summary)


def projection_state(checkpoint: dict) -> dict:
    """The state a ``LowRankProjection`` callback saved in the checkpoint (ranks, projections), or {}."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("ranks") and "projections" in state:
            return state
    return {}


def container(node: DictConfig | None) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node else {}


def export_lowrank(chosen: dict, saved: dict) -> dict:
    """The low-rank node of an export: a chosen preset, or the checkpoint's with the chosen keys on top (a chosen
    rank rule replaces the saved one)."""
    if "_target_" in chosen:
        return chosen
    if chosen.keys() & RANK_RULES:
        saved = {k: v for k, v in saved.items() if k not in RANK_RULES}
    return {**saved, **chosen}


def export(cfg: DictConfig, run_dir: Path) -> dict | None:
    """``lrl-export`` (conf/export.yaml); returns the summary."""
    (run_dir / SUMMARY).unlink(missing_ok=True)
    path = Path(str(cfg.ckpt)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`ckpt` must be an existing checkpoint file, got {str(cfg.ckpt)!r}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = OmegaConf.create(checkpoint.get(CONFIG_KEY) or {})
    if saved.get("baseline"):
        raise ValueError(f"{path} holds a model fine-tuned in factorized form (baseline={saved.baseline!r}); its "
                         f"export is {FACTORIZED} in that run's dir")
    data_cfg = cfg.get("data") or saved.get("data")
    if data_cfg is None:
        raise ValueError(f"{path} records no data config (not written by lrl-train): choose one, e.g. data=fashion_mnist")
    chosen = {k: v for k, v in container(cfg.get("lowrank")).items() if v is not None}
    lowrank_cfg = export_lowrank(chosen, container(saved.get("lowrank")))
    if "_target_" not in lowrank_cfg:
        raise ValueError(f"{path} records no low-rank settings (trained dense or not by lrl-train): choose a preset, "
                         "e.g. lowrank=tucker2 lowrank.rank=0.5")
    seed_everything(cfg.seed)
    datamodule = instantiate(data_cfg)
    if saved.get("model"):
        model = build_model(saved.model, datamodule)
        model.load_state_dict(checkpoint["state_dict"])
    else:
        model = LitClassifier.load_from_checkpoint(path, map_location="cpu")
    projection = instantiate(lowrank_cfg, _convert_="all")
    options = projection.options
    state = projection_state(checkpoint) if not chosen else {}
    method = "deeptwist" if state else "decompose"
    ranks = backbone_ranks(state.get("ranks") or frozen_ranks(plan_layers(model, options)[0]))
    trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), logger=False, enable_checkpointing=False)
    extra = {"every_n_train_steps": projection.every_n_train_steps if state else None,
             "num_projections": state.get("projections", 0), "epochs": checkpoint.get("epoch"),
             "global_step": checkpoint.get("global_step"), "ckpt": str(path.resolve()),
             "config": OmegaConf.to_container(cfg, resolve=True), "ckpt_config": checkpoint.get(CONFIG_KEY)}
    return evaluate_and_export(trainer, datamodule, model, options, ranks, run_dir, method, cfg.latency_batch_size, extra)
