"""The low-rank settings of lrl-export: the checkpoint's, unless others are chosen, and the callback state it reads."""
from hydra.utils import instantiate

from lrlightning.app.export import export_lowrank, projection_state, replans

SAVED = {"_target_": "lrlightning.LowRankProjection", "scheme": "tiled_svd", "rank": None, "compression": 2.0,
         "tile_shape": [8, 8]}


def test_export_lowrank_keeps_the_saved_settings_unless_chosen():
    assert export_lowrank({}, SAVED) == SAVED
    other_rank = export_lowrank({"rank": 2}, SAVED)
    assert other_rank == {"_target_": SAVED["_target_"], "scheme": "tiled_svd", "tile_shape": [8, 8], "rank": 2}
    assert instantiate(other_rank).options.rank == 2
    preset = {"_target_": "lrlightning.LowRankProjection", "scheme": "svd", "rank": 0.25}
    assert export_lowrank(preset, SAVED) == preset
    assert export_lowrank({"every_n_train_steps": 5}, SAVED) == {**SAVED, "every_n_train_steps": 5}


def test_export_decomposes_on_this_machine_whatever_training_used():
    trained_on_gpu = {**SAVED, "projection_device": "cuda", "svd_driver": "gesvdj"}
    assert export_lowrank({}, trained_on_gpu) == SAVED
    assert instantiate(export_lowrank({}, trained_on_gpu)).options.projection_device is None
    assert export_lowrank({"svd_driver": "exact"}, trained_on_gpu) == {**SAVED, "svd_driver": "exact"}


def test_projection_state_finds_the_callback_state_in_a_checkpoint():
    state = {"last_step": 8, "projections": 4, "ranks": {"backbone.conv": 3}}
    checkpoint = {"callbacks": {"ModelCheckpoint{...}": {"best_model_path": ""}, "LowRankProjection{...}": state}}
    assert projection_state(checkpoint) == state
    assert projection_state({"callbacks": {"LowRankProjection{...}": {**state, "ranks": {}}}}) == {}
    assert projection_state({}) == {}


def test_only_a_preset_or_a_rank_rule_replaces_the_trained_ranks():
    assert replans({"rank": 0.3}) and replans({"compression": 4.0}) and replans({"_target_": "x", "scheme": "svd"})
    assert not replans({}) and not replans({"bn_recalibration_batches": 0, "svd_driver": "gram"})
