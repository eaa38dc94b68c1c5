"""One finish path: ``finish_`` (project + BatchNorm re-estimation) is what the callback's final projection does, so a
checkpoint taken before it is finished elsewhere into the same model; ``finish`` adds the exact factorized copy."""
import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrlightning import LowRankOptions, LowRankProjection, factorize, plan_layers, relative_plans
from lrlightning.finish import finish, finish_
from lrlightning.training.recalibration import reshuffled

from helpers import NetModule, quiet_trainer


def net(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.Dropout2d(dropout),
        nn.Conv2d(12, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


class Wrapped(NetModule):
    def __init__(self):
        super().__init__(net(), lr=0.1, momentum=0.9)


def data(n=64):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def images(count=3, seed=0):
    return [x for x, _ in reshuffled(DataLoader(data(), batch_size=8), count, seed)]


def test_finish_projects_then_recalibrates_reproducibly():
    options = LowRankOptions("svd", 2)
    model = net(dropout=0.3)
    plans = plan_layers(model, options)[0]
    first, second, other = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    stats = finish_(first, plans, options, images(), seed=5)
    finish_(second, plans, options, images(), seed=5)
    finish_(other, plans, options, images(), seed=6)
    assert [s.name for s in stats] == ["2", "6"] and all(0 < s.rel_error < 1 for s in stats)
    assert torch.linalg.matrix_rank(first[2].weight.detach().flatten(1)).item() == 2
    assert torch.equal(first[7].running_var, second[7].running_var), "same seed, same statistics"
    assert not torch.equal(first[7].running_var, other[7].running_var), "dropout masks follow the seed"
    assert not torch.equal(first[3].running_var, model[3].running_var)

    kept = copy.deepcopy(model)
    finish_(kept, plans, options)
    assert torch.equal(kept[3].running_var, model[3].running_var), "no batches: statistics kept"


def test_finish_returns_the_exact_factorized_model():
    options = LowRankOptions("tucker2", (3, 4))
    model = net()
    plans = plan_layers(model, options)[0]
    small = finish(model, plans, options, images(), seed=1).eval()
    x = images(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert isinstance(small[2], nn.Sequential) and type(model[2]) is nn.Conv2d


def test_a_checkpoint_before_the_final_projection_finishes_into_the_callbacks_model(tmp_path):
    class BeforeFinal(L.Callback):
        def on_train_end(self, trainer, pl_module):
            self.state = copy.deepcopy(pl_module.state_dict())
            self.step = trainer.global_step

    before, model = BeforeFinal(), Wrapped()
    callback = LowRankProjection("svd", 3, every_n_train_steps=3, bn_recalibration_batches=4, objective="weight")
    quiet_trainer(tmp_path, [before, callback]).fit(model, DataLoader(data(), batch_size=8, shuffle=True))

    restored = Wrapped()
    restored.load_state_dict(before.state)
    plans = relative_plans(callback.plans, "net")
    assert [p.name for p in plans] == ["2", "6"]
    batches = [x for x, _ in reshuffled(DataLoader(data(), batch_size=8), 4, seed=before.step)]
    small = finish(restored.net, plans, callback.options, batches, seed=before.step).eval()
    for key, value in model.net.state_dict().items():
        torch.testing.assert_close(restored.net.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)
    x = images(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.net.eval()(x), atol=1e-5, rtol=1e-5)
        reference = factorize(model.net, "svd", rank={p.name: p.rank for p in plans}).eval()
        torch.testing.assert_close(small(x), reference(x), atol=1e-5, rtol=1e-5)


def test_relative_plans_refuse_layers_outside_the_prefix():
    options = LowRankOptions("svd", 2)
    plans = plan_layers(Wrapped(), options)[0]
    with pytest.raises(ValueError, match=r"`plans` name layers outside `head`: \['net.2', 'net.6'\]"):
        relative_plans(plans, "head")
