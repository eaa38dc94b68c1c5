"""The checks of an lrl-train job's settings, before anything runs."""
import pytest
from omegaconf import OmegaConf

from lrlightning.app.train import check_job

VALID = {"baseline": None, "init_ckpt": None, "seed": 0, "latency_batch_sizes": [32]}


def test_valid_settings_pass():
    check_job(OmegaConf.create(VALID))
    check_job(OmegaConf.create({**VALID, "baseline": "decompose_finetune", "init_ckpt": "/runs/dense/last.ckpt"}))


@pytest.mark.parametrize(("changes", "message"), [
    ({"baseline": "finetune"}, r"`baseline` must be one of \[None, 'decompose_finetune', 'decompose'\], got 'finetune'"),
    ({"init_ckpt": "required"}, r"`init_ckpt` is required by this experiment"),
    ({"seed": -1}, r"`seed` must be an int >= 0, got -1"),
    ({"seed": "abc"}, r"`seed` must be an int >= 0, got 'abc'"),
    ({"latency_batch_sizes": [0]}, r"`latency_batch_sizes` must be a list of distinct ints >= 1, such as \[32\] or "
                                   r"\[1,32\], got \[0\]"),
    ({"latency_batch_sizes": 32}, r"`latency_batch_sizes` must be a list .* got 32"),
])
def test_bad_settings_are_named_with_what_is_allowed(changes, message):
    with pytest.raises(ValueError, match=message):
        check_job(OmegaConf.create({**VALID, **changes}))
