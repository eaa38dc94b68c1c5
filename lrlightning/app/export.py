"""The job behind ``lrl-export``: finish the model of a checkpoint as the callback finishes training (project,
re-estimate BatchNorm with the checkpoint's optimizer step as seed, factorize) and write the same artefacts as
``lrl-train``, with the checkpoint's low-rank settings and data unless others are chosen. Exporting the
``last.ckpt`` of a ``lrl-train`` run reproduces that run's factorized model."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf

from ..speed.allocator import retain_freed_memory
from .deploy import check_deploy
from .job import CONFIG_KEY, build_model, data_passes, evaluate_and_export, finish_backbone
from .module import LitClassifier
from .ranks import backbone_plan, check_batch_sizes, projection_of
from .report import FACTORIZED, METHOD, SUMMARY



def projection_state(checkpoint: dict) -> dict:
    """The state a ``LowRankProjection`` callback saved in the checkpoint (ranks, projections), or {}."""
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("ranks") and "projections" in state:
            return state
    return {}


def container(node: DictConfig | None) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node else {}


MOVED_MODULES = {f"lrlightning.{former}": f"lrlightning.{current}" for former, current in (  # for checkpoints' configs
    ("backbones", "zoo"), ("callback", "training.callback"), ("distillation", "training.distillation"),
    ("passes", "training.passes"), ("recalibration", "training.recalibration"), ("summary", "training.summary"),
    ("latency", "speed.latency"), ("timing", "speed.timing"), ("allocator", "speed.allocator"),
    ("serving", "speed.serving"), ("int8", "deploy.int8"), ("onnx_export", "deploy.onnx"),
    ("distributed", "training.distributed"), ("divergence", "training.divergence"), ("momentum", "training.momentum"),
    ("cpu", "speed.cpu"), ("speedup_check", "speed.speedup_check"))}


def current_targets(node):
    """``node`` (a config read from a checkpoint, as plain dicts and lists) with every ``_target_`` in a module of
    ``MOVED_MODULES`` naming the module it lives in now (``lrlightning.backbones.CifarResNet`` ->
    ``lrlightning.zoo.CifarResNet``)."""
    if isinstance(node, list):
        return [current_targets(item) for item in node]
    if not isinstance(node, dict):
        return node
    module, _, name = str(node.get("_target_", "")).rpartition(".")
    moved = {"_target_": f"{MOVED_MODULES[module]}.{name}"} if module in MOVED_MODULES else {}
    return {key: current_targets(value) for key, value in node.items()} | moved


def replans(chosen: dict) -> bool:
    """Whether the chosen low-rank keys change the plan (another preset, scheme, rank rule or layer selection), so
    that the checkpoint's ranks no longer apply; other keys (``bn_recalibration_batches``, ``solver``, ...) keep
    them."""
    return bool(chosen.keys() & {"_target_", "scheme", "rank", "layers"})


TRAINING_PLACEMENT = ("solver",)  # where and how training decomposed, not what


def export_lowrank(chosen: dict, saved: dict) -> dict:
    """The low-rank node of an export: a chosen preset, or the checkpoint's with the chosen keys on top (a chosen
    rank rule replaces the saved one). ``TRAINING_PLACEMENT`` keys are not taken from the checkpoint: they named the
    training machine's devices (a CUDA driver, say), and the export decomposes on this one."""
    if "_target_" in chosen:
        return chosen
    saved = {k: v for k, v in saved.items() if k not in TRAINING_PLACEMENT}
    return merged(saved, chosen)


def merged(saved: dict, chosen: dict) -> dict:
    """``chosen`` over ``saved``, nested nodes key by key (``lowrank.scheme.tile_shape=[8,8]`` keeps the saved
    scheme's ``_target_``); a chosen ``rank`` replaces the saved rule whole."""
    result = dict(saved)
    for key, value in chosen.items():
        nested = isinstance(value, dict) and isinstance(saved.get(key), dict) and key != "rank"
        result[key] = merged(saved[key], value) if nested else value
    return result


def export(cfg: DictConfig, run_dir: Path) -> dict | None:
    """``lrl-export`` (conf/export.yaml); returns the summary."""
    if cfg.get("retain_freed_memory", True):
        retain_freed_memory()
    (run_dir / SUMMARY).unlink(missing_ok=True)
    check_deploy(cfg.get("deploy"))
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
    lowrank_cfg = export_lowrank(chosen, current_targets(container(saved.get("lowrank"))))
    if "_target_" not in lowrank_cfg:
        raise ValueError(f"{path} records no low-rank settings (trained dense or not by lrl-train): choose a preset, "
                         "e.g. lowrank=tucker2 lowrank.rank=0.5")
    check_batch_sizes(cfg.latency_batch_sizes)
    seed_everything(cfg.seed)
    datamodule = instantiate(data_cfg)
    if saved.get("model"):
        model = build_model(OmegaConf.create(current_targets(container(saved.model))), datamodule)
        model.load_state_dict(checkpoint["state_dict"])
    else:
        model = LitClassifier.load_from_checkpoint(path, map_location="cpu")
    projection = projection_of(lowrank_cfg, datamodule, cfg.latency_batch_sizes)
    state = {} if replans(chosen) else projection_state(checkpoint)
    step = checkpoint.get("global_step") or 0
    plan = backbone_plan(model, projection.options, state.get("ranks") or None, data_passes(datamodule), step)
    small = finish_backbone(model, datamodule, plan, projection, step)
    trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), logger=False, enable_checkpointing=False)
    extra = {"every_n_train_steps": projection.every_n_train_steps if state else None,
             "num_projections": state.get("projections", 0), "epochs": checkpoint.get("epoch"),
             "global_step": checkpoint.get("global_step"), "ckpt": str(path.resolve()),
             "config": OmegaConf.to_container(cfg, resolve=True), "ckpt_config": checkpoint.get(CONFIG_KEY)}
    method = METHOD if state else "decompose"
    return evaluate_and_export(trainer, datamodule, model, plan, small, run_dir, method, cfg, extra)
