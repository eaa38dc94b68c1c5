"""Every config of conf/ composes (Hydra compose API) and instantiates; the paper experiments select what the
paper describes; the SLURM preset fits the installed submitit plugin and Lightning's SLURM rules."""
import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import instantiate
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import OmegaConf

from lrlightning import Activation, Budget, Compression, LowRankProjection, Solver, TiledSVD, plan_layers
from lrlightning.app.cli import CONF_DIR
from lrlightning.app.ranks import with_budget_defaults
from lrlightning.app.train import check_job

from helpers import compose_train

CONF = Path(CONF_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TARGET_PREFIXES = ("lrlightning.", "lightning.pytorch.")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def instantiate_job(cfg, tmp_path):
    """Instantiate every node of a composed train config as the job does (GPU presets on the CPU here)."""
    data = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    callback = instantiate(cfg.lowrank, _convert_="all") if cfg.lowrank is not None else None
    logger = instantiate(cfg.logger, save_dir=str(tmp_path))
    cpu = {} if torch.cuda.is_available() else {"accelerator": "cpu"}
    trainer = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=logger, **cpu)
    return data, model, callback, trainer


def test_default_job(tmp_path):
    cfg = compose_train()
    check_job(cfg)
    assert cfg.model == {"_target_": "lrlightning.app.module.LitClassifier", "backbone": "resnet20"}
    assert cfg.lowrank == {"_target_": "lrlightning.LowRankProjection", "scheme": "tucker2", "rank": 0.5,
                           "objective": {"_target_": "lrlightning.Activation"}, "every_n_train_steps": 100}
    assert (cfg.seed, cfg.init_ckpt, cfg.ckpt_path, cfg.baseline) == (0, None, None, None)
    data, model, callback, trainer = instantiate_job(cfg, tmp_path)
    assert type(data).__name__ == "FashionMNISTDataModule" and (data.num_classes, data.in_channels) == (10, 1)
    assert isinstance(model, LightningModule) and type(model.backbone).__name__ == "CifarResNet"
    assert isinstance(callback, LowRankProjection) and callback.every_n_train_steps == 100
    assert (callback.options.scheme.name, callback.options.rank, callback.options.objective) == (
        "tucker2", 0.5, Activation())
    assert (trainer.max_epochs, trainer.limit_train_batches) == (3, 150)
    assert type(trainer.accelerator).__name__ == "CPUAccelerator"


@pytest.mark.parametrize("group", ["model", "data", "lowrank", "trainer", "logger"])
def test_every_group_option_composes_and_instantiates(group, tmp_path):
    for name in ("cats", "dogs"):  # class folders for data=image_folder, whose root is required
        (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
    for option in options(group):
        cfg = compose_train([f"{group}={option}", "model=simple_cnn" if group != "model" else "data=synthetic",
                             *([f"data.root={tmp_path / 'images'}"] if option == "image_folder" else [])])
        data, model, callback, trainer = instantiate_job(cfg, tmp_path)
        assert isinstance(data, LightningDataModule) and isinstance(model, LightningModule)
        assert isinstance(trainer, Trainer) and isinstance(trainer.logger, Logger)
        if group == "model":
            assert model.hparams.get("backbone") == (None if option == "custom_backbone" else option)
        if group == "lowrank":
            assert (callback is None) == (option == "none")
            if callback is not None:
                assert callback.options.scheme.name == option


SHORT_EXPERIMENTS = {"fmnist_mobilenet_dense": ("mobilenet_v2", 800, None),
                     "fmnist_mobilenet_study": ("mobilenet_v2", 300, 50),
                     "cifar10_dense": ("resnet20", 1.0, None),
                     "cifar10_short": ("resnet20", 1.0, 100),
                     "cifar10_regime": ("resnet20", 1.0, 200),
                     "cifar10_tiled_svd": ("resnet32", 1.0, 50)}  # (backbone, train batches, S_D)
DATAMODULES = {"fmnist": "FashionMNISTDataModule", "cifar10_": "CIFAR10JPEGDataModule", "": "CIFAR10DataModule"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(name, tmp_path):
    cfg = compose_train([f"experiment={name}", "init_ckpt=/dense/last.ckpt"], hydra=True)
    check_job(cfg)
    data, model, callback, trainer = instantiate_job(cfg, tmp_path)
    dense = name.endswith("dense") or name.startswith("paper_dense")
    assert (callback is None) == dense
    assert type(data).__name__ == next(kind for prefix, kind in DATAMODULES.items() if name.startswith(prefix))
    backbone, batches, period = SHORT_EXPERIMENTS.get(
        name, ("resnet20" if name.startswith("fmnist") else "resnet32", 1.0, 200))
    assert model.hparams.backbone == backbone
    assert trainer.limit_train_batches == batches
    if not dense:
        assert callback.every_n_train_steps == period
        assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params
    assert cfg.baseline == ("decompose_finetune" if "decompose_finetune" in name else None)


METHODS = {"lowrank_projection": (None, 200, False, 0), "lowrank_projection_sd50": (None, 50, False, 0),
           "lowrank_projection_reset": (None, 200, True, 0), "decompose_finetune": ("decompose_finetune", 200, False, 0),
           "decompose": ("decompose", 200, False, 0), "lowrank_projection_final": (None, 200, False, 0.1),
           "lowrank_projection_finetune": (None, 50, False, 0.1)}
STUDY_METHODS = [m for m in METHODS if m not in ("lowrank_projection_final", "lowrank_projection_finetune")]


def test_study_sweeps_points_methods_lrs_and_seeds_from_one_checkpoint():
    cfg = compose_train(["experiment=fmnist_study", "init_ckpt=/dense/last.ckpt"], hydra=True)
    points = sweep_points(cfg)
    assert len(points) == 2 * 5 * 2 * 3 and len(set(points)) == len(points)
    assert {o for p in points for o in p if o.startswith("method=")} == {f"method={m}" for m in STUDY_METHODS}
    assert options("method") == sorted(METHODS)
    for method, (baseline, period, reset, final_phase) in METHODS.items():
        cfg = compose_train(["experiment=fmnist_study", "init_ckpt=/dense/last.ckpt", f"method={method}",
                             "point=svd_4x", "model.lr=0.01", "seed=2"])
        check_job(cfg)
        callback = instantiate(cfg.lowrank, _convert_="all")
        assert (cfg.baseline, callback.every_n_train_steps, callback.reset_momentum, callback.final_phase) == (
            baseline, period, reset, final_phase)
        assert (callback.options.scheme.name, callback.options.rank, cfg.model.lr, cfg.seed) == (
            "svd", Compression(4.0), 0.01, 2)
        assert callback.options.objective == "weight"  # the study's objective, over the preset's Activation
        assert callback.start_step == (1 if method == "lowrank_projection_finetune" else 0)
        assert cfg.init_ckpt == "/dense/last.ckpt" and cfg.trainer.max_epochs == 3


def test_the_final_phase_study_sweeps_both_methods_with_and_without_distillation():
    cfg = compose_train(["experiment=fmnist_final_phase", "init_ckpt=/dense/last.ckpt"], hydra=True)
    points = sweep_points(cfg)
    assert len(points) == 2 * 2 * 2 * 3 and len(set(points)) == len(points)
    assert {o for p in points for o in p if o.startswith(("method=", "distill."))} == {
        "method=lowrank_projection_final", "method=decompose_finetune", "distill.weight=0.0", "distill.weight=0.5"}
    cfg = compose_train(["experiment=fmnist_final_phase", "init_ckpt=/dense/last.ckpt", "point=tucker2_0.3",
                         "method=lowrank_projection_final", "distill.weight=0.5", "seed=1"])
    check_job(cfg)
    callback = instantiate(cfg.lowrank, _convert_="all")
    assert callback.final_phase == 0.1 and callback.options.objective == Activation()
    assert (cfg.distill.weight, cfg.distill.temperature, cfg.model.lr) == (0.5, 4.0, 0.03)


BUDGET_POINTS = {"tucker2_budget": ("tucker2", 6.35, "params"), "tucker2_faster": ("tucker2", 1.3, "latency"),
                 "svd_macs_2x": ("svd", 2.0, "macs")}  # point: (scheme, Budget.factor, Budget.metric)


@pytest.mark.parametrize("point", options("point"))
def test_every_point_selects_its_scheme_and_rank_rule(point):
    class Images:
        in_channels, image_size = 1, 28

    node = OmegaConf.to_container(compose_train([f"point={point}"]), resolve=True)["lowrank"]  # as the job reads it
    callback = instantiate(with_budget_defaults(node, Images(), [128]), _convert_="all")
    scheme, rule = BUDGET_POINTS[point][0] if point in BUDGET_POINTS else point.rsplit("_", 1)[0], point.rsplit("_", 1)[1]
    assert callback.options.scheme.name == scheme
    rank = callback.options.rank
    if point in BUDGET_POINTS:
        assert isinstance(rank, Budget) and (rank.factor, rank.metric) == BUDGET_POINTS[point][1:]
        if rank.metric != "params":  # completed from the data (and, for latency, the job)
            assert rank.input_shape == (1, 28, 28)
        if rule == "faster":
            assert (rank.latency.batch_sizes, rank.latency.device) == ((128,), "cpu")
    elif rule.endswith("x"):
        assert rank == Compression(float(rule[:-1]))
    else:
        assert rank == float(rule)
    if scheme == "tiled_svd":
        assert callback.options.scheme == TiledSVD(tile_shape=(16, 16))


def test_a_budget_is_set_on_the_command_line_without_a_plus():
    node = compose_train(["point=tucker2_budget", "lowrank.rank.factor=4", "lowrank.rank.metric=latency"]).lowrank
    assert node.rank == {"_target_": "lrlightning.Budget", "factor": 4, "metric": "latency"}
    node = compose_train(["lowrank=svd", "lowrank.rank={_target_:lrlightning.Budget,factor:3,metric:macs}"]).lowrank
    assert (node.scheme, node.rank) == ("svd", {"_target_": "lrlightning.Budget", "factor": 3, "metric": "macs"})


def test_nested_nodes_are_overridden_key_by_key_on_the_command_line():
    class Images:
        in_channels, image_size = 1, 28

    def callback(overrides):
        node = OmegaConf.to_container(compose_train(overrides), resolve=True)["lowrank"]
        return instantiate(with_budget_defaults(node, Images(), [32]), _convert_="all")

    assert callback(["point=svd_4x", "lowrank.rank.factor=8"]).options.rank == Compression(8.0)
    tiles = callback(["lowrank=tiled_svd", "lowrank.scheme.tile_shape=[8,8]"]).options
    assert (tiles.scheme, tiles.rank) == (TiledSVD(tile_shape=(8, 8)), 8)
    assert callback(["point=tiled_svd_4x", "lowrank.scheme.tile_shape=[4,8]"]).options.scheme == TiledSVD(
        tile_shape=(4, 8))
    assert callback(["lowrank.objective=weight"]).options.objective == "weight"
    batches = callback(["+lowrank.objective.batches=4", "+lowrank.objective.ridge=0.1"]).options.objective
    assert batches == Activation(batches=4, ridge=0.1)


def test_a_latency_table_is_re_measured_on_request_from_the_command_line():
    class Images:
        in_channels, image_size = 1, 28

    cfg = compose_train(["point=tucker2_faster", "lowrank.rank.latency.remeasure=true"])
    node = OmegaConf.to_container(cfg, resolve=True)["lowrank"]
    callback = instantiate(with_budget_defaults(node, Images(), [128]), _convert_="all")
    assert callback.options.rank.latency.remeasure is True
    default = compose_train(["point=tucker2_faster"]).lowrank
    assert default.rank.latency.remeasure is False


def test_any_callback_option_is_added_on_the_command_line(tmp_path):
    cfg = compose_train(["+lowrank.solver.device=cpu", "+lowrank.solver.driver=exact", "+lowrank.layers.linear=true",
                         "+lowrank.rank_warmup=2"])
    _, _, callback, _ = instantiate_job(cfg, tmp_path)
    assert callback.options.solver == Solver(driver="exact", device="cpu")
    assert callback.options.layers.linear is True and callback.rank_warmup == 2


def test_experiments_that_start_from_a_dense_model_require_init_ckpt():
    cfg = compose_train(["experiment=paper_tucker_resnet32"])
    with pytest.raises(ValueError, match="`init_ckpt` is required"):
        check_job(cfg)


def sweep_points(cfg) -> list[tuple[str, ...]]:
    """The override lists of a config sweep (``hydra.sweeper.params``), as the basic sweeper expands them."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    return list(itertools.product(*([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
                                    if o.is_sweep_override() else [f"{o.get_key_element()}={o.get_value_element_as_str()}"]
                                    for o in parsed)))


def compression_over_plans(model, callback) -> tuple[float, list]:
    plans, _ = plan_layers(model, callback.options, warn=False)
    return sum(p.params_dense for p in plans) / sum(p.params_factorized for p in plans), plans


@pytest.mark.parametrize("name", ["paper_tucker_resnet32", "decompose_finetune"])
def test_paper_tucker_sweep_reaches_the_five_ratios_of_fig3(name):
    points = sweep_points(compose_train([f"experiment={name}", "init_ckpt=x"], hydra=True))
    ranks = list(dict.fromkeys(o for point in points for o in point if o.startswith("lowrank.rank=")))
    assert ranks == [f"lowrank.rank={p}" for p in ("0.7", "0.6", "0.5", "0.4", "0.3")]
    assert len(points) == (10 if name == "decompose_finetune" else 5)
    ratios = []
    for rank in ranks:
        cfg = compose_train([f"experiment={name}", "init_ckpt=x", rank])
        model = instantiate(cfg.model, num_classes=10, in_channels=3)
        ratio, plans = compression_over_plans(model, instantiate(cfg.lowrank, _convert_="all"))
        assert len(plans) == 30
        ratios.append(ratio)
    paper = [1.57, 2.06, 2.80, 4.28, 6.71]
    assert all(math.isclose(r, p, rel_tol=0.02) for r, p in zip(ratios, paper)), ratios


def test_paper_tiled_sweep_gives_table1_ranks_on_the_nine_64x64_convs():
    base = compose_train(["experiment=paper_tiled_svd_resnet32", "init_ckpt=x"], hydra=True)
    points = sweep_points(base)
    assert len(points) == 8
    table1 = {(64, 2.0): 16, (64, 4.0): 8, (32, 2.0): 8, (32, 4.0): 4, (16, 2.0): 4, (16, 4.0): 2, (8, 2.0): 2,
              (8, 4.0): 1}
    for point in points:
        cfg = compose_train(["experiment=paper_tiled_svd_resnet32", "init_ckpt=x", *point])
        model = instantiate(cfg.model, num_classes=10, in_channels=3)
        ratio, plans = compression_over_plans(model, instantiate(cfg.lowrank, _convert_="all"))
        assert all(p.shape == (64, 64, 3, 3) for p in plans) and len(plans) == 9
        tile, target = cfg.lowrank.scheme.tile_shape[0], cfg.lowrank.rank.factor
        assert {p.rank for p in plans} == {table1[(tile, target)]}
        assert ratio == pytest.approx(target)


def test_slurm_preset_follows_the_trainer_and_the_released_plugin():
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"], hydra=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (8, 8, 2)
    assert launcher["additional_parameters"] == {"signal": "USR1@120"}
    assert set(launcher) <= {f.name for f in dataclasses.fields(SlurmQueueConf)}
    assert launcher["_target_"].endswith("SlurmLauncher")
    single = compose_train(["hydra/launcher=slurm"], hydra=True)
    assert OmegaConf.to_container(single.hydra.launcher, resolve=True)["nodes"] == 1


def test_local_launcher_preset():
    cfg = compose_train(["hydra/launcher=local"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher") and cfg.hydra.launcher.timeout_min == 720


def test_export_config_takes_settings_from_the_checkpoint_unless_chosen():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("export", overrides=["ckpt=x.ckpt"])
        chosen = compose("export", overrides=["ckpt=x.ckpt", "lowrank=svd", "lowrank.rank=0.25", "data=mnist"])
    assert cfg.lowrank == {"rank": None} and "data" not in cfg
    assert chosen.lowrank.rank == 0.25 and instantiate(chosen.lowrank).options.scheme.name == "svd"
    assert instantiate(chosen.data).name == "MNIST"


def test_targets_stay_under_the_package_prefixes():
    for path in CONF.rglob("*.yaml"):
        text = path.read_text()
        assert "pytorch_lightning" not in text, path
        for line in text.splitlines():
            if line.strip().startswith("_target_:"):
                assert line.split(":", 1)[1].strip().startswith(TARGET_PREFIXES), (path, line)


def test_bad_group_option_and_bad_values_fail_with_clear_messages():
    with pytest.raises(MissingConfigException, match=r"(?s)lowrank/foo.*tucker2"):
        compose_train(["lowrank=foo"])
    with pytest.raises(ConfigCompositionException, match=r"\+trainer.gradient_clip_val"):
        compose_train(["trainer.gradient_clip_val=1"])
    cfg = compose_train(["lowrank.rank=abc"])
    with pytest.raises(InstantiationException, match="`rank` must be"):
        instantiate(cfg.lowrank)
    with pytest.raises(ValueError, match="`seed` must be an int >= 0, got 'abc'"):
        check_job(compose_train(["seed=abc"]))
