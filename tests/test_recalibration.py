"""BatchNorm re-estimation inside anyone's LightningModule: modules without ``forward``, dict and custom batches,
manual optimization, iterable datasets and ``torch.compile``d backbones; refused at train start when it cannot run."""
import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lrlightning import LowRankProjection, factorize, relative_ranks
from lrlightning.batchnorm import recalibrate_batchnorm_
from lrlightning.training.recalibration import reshuffled

from helpers import TwoOptimizersByHand, quiet_trainer


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
    )


class NoForward(L.LightningModule):
    """Calls ``self.net`` in its steps and defines no ``forward``; logs its loss."""

    def __init__(self):
        super().__init__()
        self.net = small_net()
        self.validated_ranks = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.validated_ranks.append(torch.linalg.matrix_rank(self.net[2].weight.detach().flatten(1)).item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class DictBatches(NoForward):
    """Takes ``{"image", "label"}`` batches and does define ``forward``."""

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss


class ManualTwoOptimizers(TwoOptimizersByHand, NoForward):
    """Manual optimization: the convs and the head step with separate optimizers on every batch."""

    HEAD = 5

    def logits(self, x):
        return self.net(x)


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        x, y = self.data[index]
        return {"image": x, "label": y}


class Stream(IterableDataset):
    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


def tensors(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))


def fit(model, data, callback, **kwargs):
    trainer = quiet_trainer(None, [callback], max_epochs=1, **kwargs)
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return trainer


def expected_statistics(net, batches):
    """Running mean/var of the BatchNorm after re-estimation on ``batches`` of images, computed here."""
    copy_ = copy.deepcopy(net)
    recalibrate_batchnorm_(copy_, batches)
    return copy_[3].running_mean, copy_[3].running_var


def replayed_images(dataset, steps, key=None, count=3):
    """The images of the first ``count`` batches of the callback's reshuffle seeded with ``steps``."""
    loader = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(steps))
    batches = [batch for _, batch in zip(range(count), loader)]
    return [batch[key] if key else batch[0] for batch in batches]


@pytest.mark.parametrize("style", ["no_forward", "dict_batches"])
def test_recalibration_runs_the_modules_own_step(tmp_path, style):
    model = NoForward() if style == "no_forward" else DictBatches()
    data = tensors() if style == "no_forward" else DictDataset(tensors())
    callback = LowRankProjection("svd", 2, every_n_train_steps=2, bn_recalibration_batches=3)
    trainer = fit(model, data, callback, default_root_dir=tmp_path)
    assert trainer.global_step == 6 and callback.num_projections == 3
    assert model.validated_ranks == [2] * 8, "sanity check and validation ran on projected weights"
    assert torch.linalg.matrix_rank(model.net[2].weight.detach().flatten(1)).item() == 2
    images = replayed_images(data, trainer.global_step, key=None if style == "no_forward" else "image")
    mean, var = expected_statistics(model.net, images)
    assert torch.allclose(model.net[3].running_mean, mean, atol=1e-6)
    assert torch.allclose(model.net[3].running_var, var, atol=1e-6)
    small = factorize(model.net, "svd", rank=relative_ranks(callback.ranks, "net")).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(images[0]), model.net.eval()(images[0]), atol=1e-5, rtol=1e-5)


def test_recalibration_step_handles_custom_batches(tmp_path):
    class Pair:
        def __init__(self, image, label):
            self.image, self.label = image, label

    class CustomBatches(NoForward):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch.image), batch.label)

    data = tensors()

    def collate(items):
        return Pair(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))

    seen = []

    def step(module, batch):
        seen.append(batch.image.shape)
        module.net(batch.image)

    model = CustomBatches()
    callback = LowRankProjection("svd", 2, every_n_train_steps=2, bn_recalibration_batches=2, recalibration_step=step,
                                 objective="weight")  # no statistics passes: only re-estimation runs `step`
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(model, DataLoader(data, batch_size=8, collate_fn=collate))
    assert seen == [(8, 3, 8, 8)] * 3, "one check at train start, then two batches after the final projection"


def test_manual_optimization_without_forward_is_refused_at_train_start(tmp_path):
    class Stop(L.Callback):
        def on_train_batch_start(self, *args):
            raise AssertionError("training started")

    callback = LowRankProjection("svd", 2, every_n_train_steps=2)
    trainer = quiet_trainer(tmp_path, [callback, Stop()], max_epochs=1)
    with pytest.raises(RuntimeError, match=r"BatchNorm re-estimation cannot run on ManualTwoOptimizers.*manual "
                                           r"optimization.*`recalibration_step=`.*`bn_recalibration_batches=0`"):
        trainer.fit(ManualTwoOptimizers(), DataLoader(tensors(), batch_size=8))


def test_manual_optimization_with_recalibration_step_trains_and_recalibrates(tmp_path):
    model = ManualTwoOptimizers()
    callback = LowRankProjection("svd", 2, every_n_train_steps=3, bn_recalibration_batches=3,
                                 recalibration_step=recalibrate_with_net)
    trainer = fit(model, tensors(), callback, default_root_dir=tmp_path)
    assert trainer.global_step == 12
    mean, var = expected_statistics(model.net, replayed_images(tensors(), trainer.global_step))
    assert torch.allclose(model.net[3].running_var, var, atol=1e-6)


def recalibrate_with_net(module, batch):
    module.net(batch[0])


def test_iterable_dataset_is_read_from_its_start(tmp_path):
    model = NoForward()
    callback = LowRankProjection("svd", 2, every_n_train_steps=2, bn_recalibration_batches=2)
    fit(model, Stream(list(tensors())), callback, default_root_dir=tmp_path)
    images = [torch.stack([x for x, _ in list(tensors())[i:i + 8]]) for i in (0, 8)]
    mean, var = expected_statistics(model.net, images)
    assert torch.allclose(model.net[3].running_mean, mean, atol=1e-6)


def test_recalibration_of_a_compiled_backbone_does_not_recompile(tmp_path):
    compilations = []

    def backend(graph, example_inputs):
        compilations.append(len(example_inputs))
        return graph.forward

    class Compiled(NoForward):
        def __init__(self):
            super().__init__()
            self.net = torch.compile(self.net, backend=backend)

    class CountAtLastBatch(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            self.count = len(compilations)

    model, counter = Compiled(), CountAtLastBatch()
    callback = LowRankProjection("svd", 2, every_n_train_steps=2, bn_recalibration_batches=3)
    trainer = quiet_trainer(tmp_path, [counter, callback], max_epochs=1)
    trainer.fit(model, DataLoader(tensors(), batch_size=8))
    assert counter.count >= 1
    assert len(compilations) == counter.count, "re-estimation after the last batch compiled nothing"
    assert [p.name for p in callback.plans] == ["net.2"]
    images = replayed_images(tensors(), trainer.global_step)
    mean, _ = expected_statistics(model.net._orig_mod, images)
    assert torch.allclose(model.net._orig_mod[3].running_mean, mean, atol=1e-6)


def test_reshuffled_batches_depend_on_the_seed_only():
    """A loader of whole batches (batch sampler) with a random collate: the batches follow ``seed`` and the
    generator state when iteration starts, not when ``reshuffled`` was called."""
    data = tensors(40)

    def noisy(batch):
        x, y = batch
        return x + torch.rand(()), y

    def loader():
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data), 8, drop_last=False)
        return DataLoader(data, batch_size=None, sampler=sampler, collate_fn=noisy, num_workers=0)

    runs = []
    for draws in (0, 7):
        batches = reshuffled(loader(), 3, seed=4)
        torch.rand(draws)
        torch.manual_seed(11)
        runs.append(list(batches))
    assert len(runs[0]) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(*runs))
    order = list(torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(4)), 8, drop_last=False))
    assert [batch[1].tolist() for batch in runs[0]] == [data.tensors[1][i].tolist() for i in order[:3]]


def test_a_training_step_without_batch_index_and_its_metrics_are_respected(tmp_path):
    from torchmetrics.classification import MulticlassAccuracy

    class StepWithMetric(NoForward):
        def __init__(self):
            super().__init__()
            self.train_acc = MulticlassAccuracy(4)

        def training_step(self, batch):
            x, y = batch
            logits = self.net(x)
            self.train_acc(logits, y)
            return nn.functional.cross_entropy(logits, y)

        def on_train_epoch_end(self):
            self.updates = self.train_acc._update_count

    model = StepWithMetric()
    callback = LowRankProjection("svd", 2, every_n_train_steps=2, bn_recalibration_batches=3)
    trainer = fit(model, tensors(), callback, default_root_dir=tmp_path)
    assert trainer.global_step == 6 and len(model.validated_ranks) == 8
    assert model.updates == 6, "re-estimation passes leave the epoch's metric untouched"
    mean, _ = expected_statistics(model.net, replayed_images(tensors(), trainer.global_step))
    assert torch.allclose(model.net[3].running_mean, mean, atol=1e-6)


def test_reshuffled_keeps_drop_last():
    loader = DataLoader(tensors(20), batch_size=8, drop_last=True)
    assert [len(batch[1]) for batch in reshuffled(loader, 5, seed=0)] == [8, 8]


def test_each_process_of_a_distributed_fit_draws_its_own_batches():
    from types import SimpleNamespace

    from lrlightning.training.recalibration import training_batches

    def trainer(world_size, global_rank):
        return SimpleNamespace(train_dataloader=DataLoader(tensors(64), batch_size=8), world_size=world_size,
                               global_rank=global_rank, strategy=SimpleNamespace(batch_to_device=lambda b: b),
                               precision_plugin=SimpleNamespace(convert_input=lambda b: b))

    def labels(batches):
        return [batch[1].tolist() for batch in batches]

    single = labels(training_batches(trainer(1, 0), 2, seed=5))
    assert single == labels(reshuffled(DataLoader(tensors(64), batch_size=8), 2, seed=5))
    ranks = [labels(training_batches(trainer(2, rank), 2, seed=5)) for rank in (0, 1)]
    assert ranks[0] == labels(reshuffled(DataLoader(tensors(64), batch_size=8), 2, seed=10))
    assert ranks[1] == labels(reshuffled(DataLoader(tensors(64), batch_size=8), 2, seed=11))
    assert ranks[0] != ranks[1]
