"""The projection objective in lrl-train jobs: the method and the decompose baselines take `lowrank.objective`, and
summary.json records it with the method's projection log (output error, loss just before and after)."""
import torch
from hydra import compose, initialize_config_dir

from lrlightning.app.cli import CONF_DIR
from lrlightning.app.train import train


def run_job(run_dir, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return train(cfg, run_dir)


def test_the_method_and_decompose_take_the_activation_objective(tmp_path, tiny_train):
    method = run_job(tmp_path / "method", [*tiny_train, "+lowrank.objective.batches=2",
                                           "+lowrank.loss_jump_batches=1"])
    assert method["objective"] == "activation" and method["max_abs_logit_diff"] < 1e-4
    assert [entry["step"] for entry in method["projection_log"]] == [1, 2]
    for entry in method["projection_log"]:
        assert 0 < entry["output_rel_error"] < 1 and entry["loss_before"] > 0 and entry["loss_after"] > 0

    checkpoint = tmp_path / "method" / "checkpoints" / "last.ckpt"
    weights = {}
    for objective in ("weight", "activation"):
        run_dir = tmp_path / objective
        summary = run_job(run_dir, [*tiny_train, f"init_ckpt={checkpoint}", "method=decompose",
                                    f"lowrank.objective={objective}"])
        assert summary["objective"] == objective and summary["method"] == "decompose"
        weights[objective] = torch.load(run_dir / "factorized.pt", weights_only=True)["state_dict"]
    assert weights["weight"].keys() == weights["activation"].keys()
    assert any(not torch.allclose(weights["weight"][k], weights["activation"][k]) for k in weights["weight"])
