"""The low-rank settings of lrl-export: the checkpoint's, unless others are chosen, and the callback state it reads."""
import pytest
from hydra.utils import instantiate

from lrlightning import Compression, LowRankOptions, Selection, Solver, TiledSVD
from lrlightning.app.export import current_targets, export_lowrank, projection_state, replans
from lrlightning.zoo import CifarResNet

SCHEME = {"_target_": "lrlightning.TiledSVD", "tile_shape": [8, 8]}
RULE = {"_target_": "lrlightning.Compression", "factor": 2.0}
SAVED = {"_target_": "lrlightning.LowRankProjection", "scheme": SCHEME, "rank": RULE, "objective": "weight"}


def test_export_lowrank_keeps_the_saved_settings_unless_chosen():
    assert export_lowrank({}, SAVED) == SAVED
    assert instantiate(SAVED, _convert_="all").options == LowRankOptions(TiledSVD(tile_shape=(8, 8)), Compression(2.0))
    other_rank = export_lowrank({"rank": 2}, SAVED)
    assert other_rank == {**SAVED, "rank": 2}
    assert instantiate(other_rank, _convert_="all").options.rank == 2
    other_factor = export_lowrank({"rank": {"factor": 4.0}}, SAVED)  # a chosen rule replaces the saved one whole
    assert other_factor == {**SAVED, "rank": {"factor": 4.0}}
    preset = {"_target_": "lrlightning.LowRankProjection", "scheme": "svd", "rank": 0.25}
    assert export_lowrank(preset, SAVED) == preset
    assert export_lowrank({"every_n_train_steps": 5}, SAVED) == {**SAVED, "every_n_train_steps": 5}


def test_a_nested_choice_keeps_the_rest_of_the_saved_node():
    tiles = export_lowrank({"scheme": {"tile_shape": [4, 4]}}, SAVED)
    assert tiles == {**SAVED, "scheme": {"_target_": "lrlightning.TiledSVD", "tile_shape": [4, 4]}}
    assert instantiate(tiles, _convert_="all").options.scheme == TiledSVD(tile_shape=(4, 4))
    layers = export_lowrank({"layers": {"linear": True}}, {**SAVED, "layers": {"include": ["backbone.*"]}})
    assert instantiate(layers, _convert_="all").options.layers == Selection(include=("backbone.*",), linear=True)


def test_export_decomposes_on_this_machine_whatever_training_used():
    trained_on_gpu = {**SAVED, "solver": {"device": "cuda", "driver": "gesvdj"}}
    assert export_lowrank({}, trained_on_gpu) == SAVED
    assert instantiate(export_lowrank({}, trained_on_gpu), _convert_="all").options.solver == Solver()
    chosen = export_lowrank({"solver": {"driver": "exact"}}, trained_on_gpu)
    assert chosen == {**SAVED, "solver": {"driver": "exact"}}
    assert instantiate(chosen, _convert_="all").options.solver == Solver(driver="exact")


def test_projection_state_finds_the_callback_state_in_a_checkpoint():
    state = {"last_step": 8, "projections": 4, "ranks": {"backbone.conv": 3}}
    checkpoint = {"callbacks": {"ModelCheckpoint{...}": {"best_model_path": ""}, "LowRankProjection{...}": state}}
    assert projection_state(checkpoint) == state
    assert projection_state({"callbacks": {"LowRankProjection{...}": {**state, "ranks": {}}}}) == {}
    assert projection_state({}) == {}


@pytest.mark.parametrize("chosen", [{"rank": 0.3}, {"rank": {"factor": 4.0}}, {"scheme": {"tile_shape": [4, 4]}},
                                    {"_target_": "x", "scheme": "svd"}, {"layers": {"linear": True}}])
def test_a_preset_a_scheme_a_rank_rule_or_a_selection_replaces_the_trained_ranks(chosen):
    assert replans(chosen)


def test_other_settings_keep_the_trained_ranks():
    assert not replans({}) and not replans({"bn_recalibration_batches": 0, "solver": {"driver": "gram"}})
    assert not replans({"objective": "weight"})


def test_lrl_export_with_a_nested_override_replans(tmp_path, tiny_train):
    from hydra import compose, initialize_config_dir

    from lrlightning.app.cli import CONF_DIR
    from lrlightning.app.export import export
    from lrlightning.app.train import train

    def config(name, overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(name, overrides=overrides)

    trained = train(config("train", [*tiny_train, "lowrank=tiled_svd", "lowrank.rank=2",
                                     "lowrank.scheme.tile_shape=[8,8]", "lowrank.objective=weight"]), tmp_path / "t")
    ckpt = f"ckpt={tmp_path / 't' / 'checkpoints' / 'last.ckpt'}"
    for name in ("same", "tiles", "rank"):
        (tmp_path / name).mkdir()  # Hydra's run dir
    common = ["latency_batch_sizes=[4]", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
    same = export(config("export", [ckpt, *common]), tmp_path / "same")
    assert (same["method"], same["scheme_options"], same["ranks"]) == (
        "lowrank_projection", {"tile_shape": [8, 8]}, trained["ranks"])
    tiles = export(config("export", [ckpt, *common, "+lowrank.scheme.tile_shape=[16,16]"]), tmp_path / "tiles")
    assert (tiles["method"], tiles["scheme"], tiles["scheme_options"], tiles["rule"]) == (
        "decompose", "tiled_svd", {"tile_shape": [16, 16]}, {"rank": 2})
    assert tiles["ranks"].keys() == trained["ranks"].keys() and tiles["compression_ratio"] != trained["compression_ratio"]
    rank = export(config("export", [ckpt, *common, "lowrank.rank={_target_:lrlightning.Compression,factor:4.0}"]),
                  tmp_path / "rank")
    assert (rank["method"], rank["scheme_options"], rank["rule"]) == (
        "decompose", {"tile_shape": [8, 8]}, {"compression": 4.0})
    assert rank["compression_ratio"] >= 4.0 > trained["compression_ratio"]


def test_a_checkpoint_config_naming_the_former_backbones_module_builds_its_backbone_from_the_zoo():
    backbone = {"_target_": "lrlightning.backbones.CifarResNet", "depth": 20, "shortcut": "B", "num_classes": 7,
                "in_channels": 1}
    saved = {"_target_": "lrlightning.app.module.LitClassifier", "num_classes": 7, "in_channels": 1,
             "backbone": backbone}
    current = current_targets(saved)
    assert current == {**saved, "backbone": {**backbone, "_target_": "lrlightning.zoo.CifarResNet"}}
    model = instantiate(current)
    assert isinstance(model.backbone, CifarResNet) and model.backbone.fc.out_features == 7
    assert current_targets([{"_target_": "lrlightning.backbones.build_backbone", "name": "resnet20"}]) == [
        {"_target_": "lrlightning.zoo.build_backbone", "name": "resnet20"}]
    assert current_targets(SAVED) == SAVED and current_targets({"_target_": "lrlightning.zoo.SimpleCNN"}) == {
        "_target_": "lrlightning.zoo.SimpleCNN"}


def test_a_checkpoint_config_naming_a_module_before_the_subpackages_still_instantiates():
    former = "lrlightning." + "distillation.Distillation"  # the module path a checkpoint of an earlier version holds
    current = current_targets({"_target_": former, "weight": 0.5, "temperature": 2.0})
    assert current["_target_"] == "lrlightning.training.distillation.Distillation"
    assert instantiate(current).weight == 0.5
