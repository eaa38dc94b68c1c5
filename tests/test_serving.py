"""The serving form that eager latency is timed in: BatchNorm folded into the convs it follows, conv weights in a
memory format, outputs unchanged; models torch.fx cannot trace are served unfolded."""
import pytest
import torch
from torch import nn

from lrlightning import factorize
from lrlightning.rules import Budget, Latency
from lrlightning.speed.serving import serving_form, serving_input
from lrlightning.zoo import build_backbone


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def trained_statistics(model):
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16))
    return model.eval()


def test_a_factorized_resnet_serves_folded_and_channels_last_with_its_eval_outputs():
    torch.manual_seed(0)
    dense = trained_statistics(build_backbone("resnet20", num_classes=10, in_channels=3, width=8))
    small = factorize(dense, "tucker2", 0.5).eval()
    x = torch.randn(4, 3, 16, 16)
    for model in (dense, small):
        served = serving_form(model)
        assert batchnorms(model) and not batchnorms(served)
        convs = [m for m in served.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
        assert torch.allclose(served(serving_input(x)), model(x), atol=1e-4)
        assert not served.training and model.training is False and batchnorms(model)  # the model is untouched
    plain = serving_form(small, "contiguous", fold=False)
    assert batchnorms(plain) and all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, nn.Conv2d))


def test_conv3d_weights_take_the_3d_format_and_conv1d_weights_stay_as_they_are():
    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.BatchNorm3d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 2, 5, 5, 5))
    served = serving_form(model)
    assert served.get_submodule("0").weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not batchnorms(served)
    x = torch.randn(2, 2, 5, 5, 5)
    assert torch.allclose(served(serving_input(x)), model.eval()(x), atol=1e-5)
    line = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4))
    assert serving_form(line).get_submodule("0").weight.is_contiguous()
    assert serving_input(torch.randn(2, 2, 9)).is_contiguous()


class Branchy(nn.Module):
    """A forward with data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_a_model_torch_fx_cannot_trace_is_served_unfolded():
    model = Branchy().eval()
    with pytest.warns(UserWarning, match="Branchy is served with its BatchNorm unfolded: torch.fx cannot trace it"):
        served = serving_form(model)
    assert batchnorms(served) and served.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(served(serving_input(x)), model(x), atol=1e-6)


@pytest.mark.parametrize("make", [lambda: serving_form(nn.Conv2d(1, 1, 1), "nhwc"),
                                  lambda: Budget(2.0, metric="latency", input_shape=(3, 8, 8),
                                                 latency=Latency(memory_format="nhwc"))])
def test_an_unknown_memory_format_is_refused_by_name(make):
    allowed = r"memory_format` must be one of \('channels_last', 'contiguous'\), got 'nhwc'"
    with pytest.raises(ValueError, match=allowed):
        make()
