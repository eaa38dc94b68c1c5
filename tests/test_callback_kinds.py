"""The callback on every conv kind: pointwise, grouped and depthwise Conv2d, Conv1d and Conv3d models train to
exactly low-rank weights under both objectives, with BatchNorm re-estimation, resume to the uninterrupted run,
hold identical weights across DDP processes and factorize exactly."""
import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrlightning import Activation, LowRankProjection
from lrlightning.plan import layer_scheme

from helpers import ddp_trainer, mixed1d, mixed2d, mixed3d, quiet_trainer

NETS = {"2d": (mixed2d, (3, 12, 12), 48), "1d": (mixed1d, (2, 40), 32), "3d": (mixed3d, (3, 6, 8, 8), 16)}


class Classifier(L.LightningModule):
    """``body`` (one of the mixed nets of ``helpers``), global average pooling, a Linear head to 4 classes."""

    def __init__(self, dims: str):
        super().__init__()
        build, _, features = NETS[dims]
        self.body = build()
        self.head = nn.Linear(features, 4)

    def forward(self, x):
        return self.head(self.body(x).flatten(2).mean(-1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader(dims, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = NETS[dims][1]
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=8)


def group_ranks(layer, scheme):
    """The matrix rank of each group's view under ``scheme`` (its ``inner`` scheme's matrix for a grouped layer)."""
    weight = layer.weight.detach().double()
    groups = getattr(scheme, "groups", 1)
    inner = getattr(scheme, "inner", scheme)
    return [int(torch.linalg.matrix_rank(inner.to_matrix(part.unsqueeze(0))[0], rtol=1e-6))
            for part in weight.chunk(groups)]


@pytest.mark.parametrize("objective", ["weight", "activation"])
@pytest.mark.parametrize("dims", sorted(NETS))
def test_every_kind_ends_exactly_low_rank_and_factorizes_exactly(tmp_path, dims, objective):
    torch.manual_seed(0)
    model = Classifier(dims)
    callback = LowRankProjection("svd", 0.25, every_n_train_steps=3,
                                 objective=Activation(batches=2) if objective == "activation" else "weight")
    quiet_trainer(tmp_path, [callback]).fit(model, loader(dims))
    kinds = {p.name.split(".")[-1] for p in callback.plans}
    assert {"pointwise", "grouped"} <= kinds and "stem" not in kinds
    for plan in callback.plans:
        scheme = layer_scheme(plan, callback.options)
        assert all(r <= plan.rank for r in group_ranks(model.get_submodule(plan.name), scheme)), plan.name
    assert all((s.output_rel_error is not None) == (objective == "activation") for s in callback.last_stats)
    small = callback.factorize(model).eval()
    x = next(iter(loader(dims, seed=1)))[0]
    with torch.no_grad():
        dense = model.eval()(x)
        assert float((small(x) - dense).abs().max() / dense.abs().max()) <= 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_resume_on_grouped_and_depthwise_convs_matches_the_uninterrupted_run(tmp_path):
    def run(root, model, epochs=2):
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        callback = LowRankProjection("tucker2", 0.5, every_n_train_steps=4, objective=Activation(batches=2))
        return quiet_trainer(root, [callback, checkpoint], max_epochs=epochs, enable_checkpointing=True), callback

    torch.manual_seed(0)
    full = Classifier("2d")
    fit, full_callback = run(tmp_path / "full", full)
    fit.fit(full, loader("2d"))
    torch.manual_seed(0)
    resumed = Classifier("2d")
    first, _ = run(tmp_path / "first", resumed, epochs=1)
    first.fit(resumed, loader("2d"))
    torch.manual_seed(0)
    again = Classifier("2d")
    second, callback = run(tmp_path / "second", again)
    second.fit(again, loader("2d"), ckpt_path=next((tmp_path / "first").glob("*.ckpt")))
    assert callback.ranks == full_callback.ranks
    for (name, a), b in zip(full.state_dict().items(), again.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


class SpreadCheck(L.Callback):
    """At the end of fit, the largest difference of any planned weight across the DDP processes (rank 0 writes)."""

    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        projection = next(c for c in trainer.callbacks if isinstance(c, LowRankProjection))
        vector = torch.cat([pl_module.get_submodule(p.name).weight.detach().flatten() for p in projection.plans])
        gathered = [torch.empty_like(vector) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(gathered, vector)
        spread = (torch.stack(gathered).amax(0) - torch.stack(gathered).amin(0)).abs().max().item()
        if trainer.is_global_zero:
            with open(self.path, "w") as handle:
                handle.write(f"{spread} {len(projection.plans)}")


@pytest.mark.slow
def test_ddp_processes_hold_identical_grouped_and_depthwise_weights(tmp_path):
    torch.manual_seed(0)
    model = Classifier("2d")
    callback = LowRankProjection("svd", 0.5, every_n_train_steps=2, final_projection=False,
                                 objective=Activation(batches=2))
    fit = ddp_trainer(tmp_path, [callback, SpreadCheck(str(tmp_path / "spread.txt"))], max_epochs=1,
                      limit_train_batches=4)
    fit.fit(model, loader("2d"))
    spread, planned = (tmp_path / "spread.txt").read_text().split()
    assert float(spread) == 0.0 and int(planned) == 5
