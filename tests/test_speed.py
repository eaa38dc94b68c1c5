"""Whole-model speed: the inputs each layer receives, and the refusals of the measured speedup (timed by the
app's report tests)."""
import pytest
import torch

from lrlightning import factorize, project_
from lrlightning.layers import LowRankConv2d
from lrlightning.speed.measure import layer_inputs, measured_speedup
from lrlightning.zoo import build_backbone


@pytest.fixture(scope="module")
def projected_pair():
    torch.manual_seed(0)
    dense = build_backbone("resnet20", num_classes=10, in_channels=3, width=8)
    project_(dense, "tucker2", 0.5)
    return dense.eval(), factorize(dense, "tucker2", 0.5).eval()


def test_layer_inputs_are_the_tensors_each_layer_receives_and_the_mode_is_restored(projected_pair):
    dense, small = projected_pair
    dense.train()
    names = [name for name, module in small.named_modules() if isinstance(module, LowRankConv2d)]
    x = torch.randn(2, 3, 16, 16)
    inputs = layer_inputs(dense, names, x)
    assert list(inputs) == names and dense.training
    assert {tensor.shape[-1] for tensor in inputs.values()} == {16, 8, 4}  # the three stages of ResNet-20
    first = dense.get_submodule(names[0])
    with torch.no_grad():
        dense.eval()
        expected = {}
        hook = first.register_forward_hook(lambda module, args, output: expected.setdefault("x", args[0]))
        dense(x)
        hook.remove()
    torch.testing.assert_close(inputs[names[0]], expected["x"])


def test_the_measured_speedup_refuses_a_bad_batch_size_before_timing(projected_pair):
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1, got 0"):
        measured_speedup(*projected_pair, (3, 16, 16), batch_size=0)
