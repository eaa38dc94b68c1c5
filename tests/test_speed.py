import copy

import pytest
import torch

from lrlightning import factorize, project_
from lrlightning.backbones import build_backbone
from lrlightning.layers import LowRankConv2d
from lrlightning.speed import cpu_latency_ms, fold_batchnorm, keep_faster_layers, latency_ms, layer_inputs


@pytest.fixture(scope="module")
def projected_pair():
    torch.manual_seed(0)
    dense = build_backbone("resnet20", num_classes=10, in_channels=3, width=8)
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    project_(dense, "tucker2", 0.5)
    return dense.eval(), factorize(dense, "tucker2", 0.5).eval()


def test_fold_batchnorm_keeps_outputs_and_removes_batchnorm(projected_pair):
    dense, small = projected_pair
    x = torch.randn(4, 3, 16, 16)
    for model in (dense, small):
        folded = fold_batchnorm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            assert (folded(x) - model(x)).abs().max().item() < 1e-4
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in dense.modules()), "input untouched"


@pytest.mark.parametrize("margin, kept_sizes", [(1.0, {16}), (1.2, {16, 8}), (2.0, {16, 8, 4})])
def test_keep_faster_layers_follows_the_measurement(projected_pair, monkeypatch, margin, kept_sizes):
    """Timings that decide: dense layers take 1 ms; factorized ones 0.8, 1.1 or 1.3 ms on 16, 8 or 4 px inputs."""
    factorized_ms = {16: 0.8, 8: 1.1, 4: 1.3}

    def timing(module, example, repeats=20, warmup=3):
        return factorized_ms[example.shape[-1]] if isinstance(module, LowRankConv2d) else 1.0

    monkeypatch.setattr("lrlightning.speed.latency_ms", timing)
    dense, small = projected_pair
    x = torch.randn(2, 3, 16, 16)
    guarded, report = keep_faster_layers(dense, small, x, margin=margin)
    names = [n for n, m in small.named_modules() if isinstance(m, LowRankConv2d)]
    sizes = {name: tensor.shape[-1] for name, tensor in layer_inputs(dense, names, x).items()}
    assert set(sizes.values()) == {16, 8, 4}
    expected = [name for name in names if sizes[name] in kept_sizes]
    assert [row["layer"] for row in report] == names
    assert [row["layer"] for row in report if row["factorized"]] == expected
    assert [row["factorized_ms"] for row in report] == [factorized_ms[sizes[name]] for name in names]
    assert [n for n, m in guarded.named_modules() if isinstance(m, LowRankConv2d)] == expected
    with torch.no_grad():
        assert (guarded(x) - dense(x)).abs().max().item() < 1e-4


def test_latency_is_positive_and_mode_restored(projected_pair):
    dense, _ = projected_pair
    dense.train()
    assert cpu_latency_ms(dense, (3, 16, 16), batch_size=2, repeats=2, warmup=0) > 0
    assert dense.training, "cpu_latency_ms works on a copy"
    assert latency_ms(dense, torch.randn(1, 3, 16, 16), repeats=2) > 0
    dense.eval()


@pytest.mark.parametrize("argument, value", [("batch_size", 0), ("repeats", 0), ("warmup", -1), ("batch_size", 1.5)])
def test_latency_validation(projected_pair, argument, value):
    with pytest.raises(ValueError, match=f"`{argument}` must be an int"):
        cpu_latency_ms(projected_pair[0], (3, 16, 16), **{argument: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_latency_on_gpu_waits_for_the_kernels(projected_pair):
    dense, small = (copy.deepcopy(m).cuda() for m in projected_pair)
    model = fold_batchnorm(small)
    x = torch.randn(64, 3, 16, 16, device="cuda")
    assert latency_ms(model, x, repeats=3) > 0
    guarded, report = keep_faster_layers(dense, small, x, repeats=3)
    with torch.no_grad():
        torch.testing.assert_close(guarded(x), dense(x), atol=1e-4, rtol=1e-4)
    assert all(row["dense_ms"] > 0 and row["factorized_ms"] > 0 for row in report)
