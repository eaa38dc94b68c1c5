"""What several test modules share: the quiet CPU Trainer every test fits with, small LightningModules and data,
the callback that counts projections, the mixed conv nets of every kind, and the composed ``lrl-train`` config.
Test modules import it as ``helpers`` (pytest puts ``tests/`` on the import path); none imports another."""
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrlightning import LowRankProjection
from lrlightning.app.cli import CONF_DIR


def quiet_trainer(root=None, callbacks=(), **kwargs) -> L.Trainer:
    """A Trainer on one CPU device writing into ``root`` (None: the working folder), 2 epochs, with ``callbacks``
    and without logger, progress bar, model summary or checkpoints unless ``kwargs`` say otherwise."""
    defaults = dict(default_root_dir=root, max_epochs=2, accelerator="cpu", devices=1, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


class EndProcessGroup(L.Callback):
    """In each ``ddp_spawn`` process, after every other hook: wait for the others, then shut the process group down
    (spawned processes skip the ``atexit`` handler that would, and gloo may abort a process left holding one)."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def ddp_trainer(root, callbacks, **kwargs) -> L.Trainer:
    """``quiet_trainer`` with two ``ddp_spawn`` processes on the CPU."""
    return quiet_trainer(root, [*callbacks, EndProcessGroup()], strategy="ddp_spawn", devices=2, **kwargs)


class NetModule(L.LightningModule):
    """``net`` as a LightningModule: ``forward`` is ``net``, the training loss the cross-entropy of (x, y) batches,
    the optimizer SGD at ``lr`` with ``momentum`` (default none)."""

    def __init__(self, net: nn.Module, lr: float = 0.05, momentum: float = 0.0):
        super().__init__()
        self.net, self.lr, self.momentum = net, lr, momentum

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class TwoOptimizersByHand:
    """Mixin of a LightningModule with ``net``: manual optimization with two SGD optimizers at lr 0.05, one for
    ``net[:HEAD]`` (the convs) and one for ``net[HEAD:]``, both stepping on every (x, y) batch on the cross-entropy
    of ``self.logits(x)``."""

    HEAD = 6

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.logits(x), y)
        for optimizer in self.optimizers():
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in self.optimizers():
            optimizer.step()
        return loss

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[:self.HEAD].parameters(), lr=0.05),
                torch.optim.SGD(self.net[self.HEAD:].parameters(), lr=0.05))


class TinyCNN(NetModule):
    """Three 3×3 convs on 3×8×8 inputs, 4 classes, SGD with momentum 0.9; the first conv is left dense by default,
    so conv2 and conv3 are projected. Validation logs ``val_acc`` and keeps it in ``val_acc``."""

    def __init__(self, lr: float = 0.05):
        super().__init__(nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 12, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4),
        ), lr, momentum=0.9)
        self.val_acc = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc)
        self.val_acc.append(acc.item())


class ManualTinyCNN(TwoOptimizersByHand, TinyCNN):
    """Manual optimization with two optimizers (convs, head), both stepping on every batch."""

    def logits(self, x):
        return self(x)


class ScaledOnRankOne(TinyCNN):
    """Rank 1 sees its inputs three times larger, so its input statistics differ from rank 0's."""

    def forward(self, x):
        return self.net(x * (3.0 if self.trainer.global_rank == 1 else 1.0))


def loader(n=64, batch_size=8, seed=0):
    """``n`` random 3×8×8 images with labels in 0..3, from ``seed``, in order."""
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


class CountingProjection(LowRankProjection):
    """Records the optimizer step of every projection, periodic and final."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

        projected = self.projector.projected

        def counted(model, step, plans, statistics):
            self.steps.append(step)
            return projected(model, step, plans, statistics)

        self.projector.projected = counted

    def on_train_end(self, trainer, pl_module):
        before = self.last_stats
        super().on_train_end(trainer, pl_module)
        if self.last_stats is not before:
            self.steps.append(trainer.global_step)


def named(*layers):
    """An ``nn.Sequential`` of (name, layer) pairs."""
    model = nn.Sequential()
    for name, layer in layers:
        model.add_module(name, layer)
    return model


def mixed2d():
    """stem, depthwise 5×5, grouped 3×3 (4 groups), pointwise, dense 3×3, a channel-multiplier depthwise 3×3."""
    return named(("stem", nn.Conv2d(3, 16, 3, padding=1)), ("bn", nn.BatchNorm2d(16)),
                 ("depthwise", nn.Conv2d(16, 16, 5, padding=2, groups=16)),
                 ("grouped", nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False)), ("relu", nn.ReLU()),
                 ("pointwise", nn.Conv2d(32, 24, 1)), ("bn2", nn.BatchNorm2d(24)),
                 ("full", nn.Conv2d(24, 24, 3, stride=2, padding=1)),
                 ("multiplier", nn.Conv2d(24, 48, 3, padding=1, groups=24)))


def mixed1d():
    return named(("stem", nn.Conv1d(2, 16, 9, stride=2, padding=4)), ("body", nn.Conv1d(16, 32, 5, padding=2)),
                 ("bn", nn.BatchNorm1d(32)), ("pointwise", nn.Conv1d(32, 48, 1)),
                 ("grouped", nn.Conv1d(48, 32, 3, padding=2, groups=4, dilation=2)))


def mixed3d():
    return named(("stem", nn.Conv3d(3, 8, 3, padding=1)), ("body", nn.Conv3d(8, 16, 3, stride=2, padding=1)),
                 ("bn", nn.BatchNorm3d(16)), ("pointwise", nn.Conv3d(16, 24, 1)),
                 ("grouped", nn.Conv3d(24, 16, (3, 1, 3), padding=(1, 0, 1), groups=2)))


MIXED_MODELS = {"2d": (mixed2d, (3, 12, 12)), "1d": (mixed1d, (2, 40)), "3d": (mixed3d, (3, 6, 8, 8))}  # one sample


def compose_train(overrides=(), hydra=False):
    """The ``lrl-train`` config composed from conf/ with ``overrides`` (and the ``hydra`` node when asked)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)
