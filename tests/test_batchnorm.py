import torch
from torch import nn

from lrlightning.batchnorm import batchnorm_buffers, recalibrate_batchnorm_


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())


def test_statistics_are_the_plain_average_over_batches():
    net = model().eval()
    batches = [torch.randn(8, 2, 6, 6) * (i + 1) for i in range(3)]
    assert recalibrate_batchnorm_(net, batches) == 3
    with torch.no_grad():
        features = [net[0](x) for x in batches]
    means = torch.stack([f.mean((0, 2, 3)) for f in features]).mean(0)
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(1, unbiased=True) for f in features]).mean(0)
    assert torch.allclose(net[1].running_mean, means, atol=1e-5)
    assert torch.allclose(net[1].running_var, variances, rtol=1e-4)
    assert net[1].momentum == 0.1 and not net.training


def test_no_batches_leaves_statistics_and_weights_alone():
    net = model()
    net[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_batchnorm_(net, []) == 0
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_buffers_are_named_like_the_state_dict():
    names = set(batchnorm_buffers(model()))
    assert names == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert names <= set(model().state_dict())


def test_every_submodule_keeps_its_mode():
    net = model().train()
    net[1].eval()  # a frozen BatchNorm inside a training model
    recalibrate_batchnorm_(net, [torch.randn(4, 2, 6, 6)])
    assert net.training and not net[1].training and net[0].training
