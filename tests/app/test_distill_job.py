"""Distillation in an lrl-train job: the dense init_ckpt teaches the method and decompose-then-fine-tune alike."""
import copy

import torch
from hydra import compose, initialize_config_dir

from lrlightning.app.cli import CONF_DIR
from lrlightning.app.module import LitClassifier
from lrlightning.app.train import train


def run_job(run_dir, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return train(cfg, run_dir)


def test_both_methods_are_taught_by_the_dense_checkpoint(tmp_path, tiny_train, monkeypatch):
    run_job(tmp_path / "dense", [*(o for o in tiny_train if not o.startswith("lowrank.")), "lowrank=none"])
    checkpoint = tmp_path / "dense" / "checkpoints" / "last.ckpt"
    teachers = {}
    distill_from = LitClassifier.distill_from

    def spy(self, teacher, weight, temperature):
        teachers[method] = (copy.deepcopy(teacher.state_dict()), weight, temperature)
        distill_from(self, teacher, weight, temperature)

    monkeypatch.setattr(LitClassifier, "distill_from", spy)
    for method in ("lowrank_projection", "decompose_finetune", "decompose"):
        summary = run_job(tmp_path / method, [*tiny_train, f"init_ckpt={checkpoint}", f"method={method}",
                                              "distill.weight=0.3", "distill.temperature=2"])
        assert summary["config"]["distill"] == {"weight": 0.3, "temperature": 2}
    assert set(teachers) == {"lowrank_projection", "decompose_finetune"}  # decomposition alone trains nothing
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    dense = {key.removeprefix("backbone."): value for key, value in saved.items() if key.startswith("backbone.")}
    for state, weight, temperature in teachers.values():
        assert (weight, temperature) == (0.3, 2)
        assert state.keys() == dense.keys()
        assert all(torch.equal(state[key], dense[key]) for key in state), "the teacher is the dense model"
