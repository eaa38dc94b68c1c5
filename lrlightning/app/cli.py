"""Console entry points: ``lrl-train`` and ``lrl-export`` (Hydra apps on ``conf/``, which the package carries as
``lrlightning/app/conf``) and ``lrl-collect``."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> dict | None:
    """Train with the low-rank callback, test, export: ``lrl-train [overrides]``, ``lrl-train -m ...``."""
    from .train import train as run

    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def export(cfg: DictConfig) -> dict | None:
    """Factorize a checkpoint and write the same artefacts: ``lrl-export ckpt=PATH [lowrank=... data=...]``."""
    from .export import export as run

    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


def collect(argv: list[str] | None = None) -> None:
    """Gather a sweep's summaries: ``lrl-collect SWEEP_DIR``."""
    from .collect import main

    sys.exit(main(argv))
