"""Fixtures shared by the test files: tiny synthetic data, the overrides of a seconds-long ``lrl-train`` run and
latency budgets without timing (the quiet CPU Trainer is ``helpers.quiet_trainer``)."""
import pytest

from lrlightning.app.data import SyntheticDataModule

TINY_TRAIN = ["model=simple_cnn", "data=synthetic", "+data.num_samples=192", "+data.batch_size=32",
              "+data.val_size=64", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
              "lowrank.every_n_train_steps=1", "+trainer.enable_progress_bar=false",
              "+trainer.enable_model_summary=false", "latency_batch_sizes=[4]"]


@pytest.fixture(autouse=True)
def latency_cache_in_a_temporary_folder(tmp_path_factory, monkeypatch):
    """Every latency table a test makes without naming its cache is written under a temporary folder, never into
    the user's ``~/.cache``."""
    monkeypatch.setenv("LRLIGHTNING_CACHE", str(tmp_path_factory.mktemp("latency-cache")))


@pytest.fixture(scope="session")
def tiny_train() -> tuple[str, ...]:
    """``lrl-train`` overrides for a run of seconds: SimpleCNN, 192 synthetic 32×32 images, 2 steps, S_D = 1."""
    return tuple(TINY_TRAIN)


@pytest.fixture
def synthetic_data():
    """``synthetic_data(num_classes=10, **kwargs)``: 256 synthetic 3×12×12 images (192 train, 64 val, 64 test) in
    batches of 32."""
    def make(num_classes: int = 10, **kwargs) -> SyntheticDataModule:
        defaults = dict(num_samples=256, image_size=12, in_channels=3, batch_size=32, val_size=64)
        return SyntheticDataModule(num_classes=num_classes, **{**defaults, **kwargs})

    return make


class MacLatencyTable:
    """A stand-in for ``lrlightning.speed.latency.LatencyTable`` whose "measured" milliseconds are MACs / 1e6, with no
    spread, so that latency budgets are tested without timing; ``made`` keeps every table built."""

    made: list["MacLatencyTable"] = []

    def __init__(self, device, batch_size, cache_dir=None, remeasure=False, backend="eager",
                 memory_format="channels_last", precision="fp32"):
        import torch

        self.device, self.batch_size, self.cache_dir = torch.device(device), batch_size, cache_dir
        self.memory_format, self.precision = memory_format, precision
        self.remeasure, self.backend, self.state, self.checked = remeasure, backend, "measured", []
        MacLatencyTable.made.append(self)

    @staticmethod
    def exact(value):
        from lrlightning.speed.timing import Spread

        return Spread(value, value, value, 1)

    def check(self, layers):
        self.checked.append(len(layers))

    def facts(self):
        return {"state": self.state, "measured": 0, "unsettled": 0, "seconds": 0.0, "check_seconds": 0.0,
                "path": str(self.cache_dir)}

    def layer_times(self, module, input_shape, candidates):
        from lrlightning import count_macs
        from lrlightning.speed.latency import LayerTimes

        dense = count_macs(module, input_shape) / 1e6
        return LayerTimes(self.exact(dense), {label: self.exact(count_macs(build(), input_shape) / 1e6 / dense)
                                              for label, build in candidates.items()})

    def model_ms(self, model, input_shape, names=()):
        from lrlightning import count_macs

        layers = count_macs(model, input_shape, per_layer=True)
        return sum(layers.values()) / 1e6, {name: layers[name] / 1e6 for name in names}

    def speedup(self, dense, factorized, input_shape):
        from lrlightning import count_macs

        return self.exact(count_macs(dense, input_shape) / count_macs(factorized, input_shape))


@pytest.fixture
def mac_latency(monkeypatch):
    """Latency budgets allocate on ``MacLatencyTable`` instead of timing; returns the class."""
    MacLatencyTable.made = []
    monkeypatch.setattr("lrlightning.budget.LatencyTable", MacLatencyTable)
    return MacLatencyTable
