import pytest
import torch
from torch import nn

from lrlightning import factorize, project_
from lrlightning.backbones import BACKBONES, BasicBlock, Bottleneck, CifarResNet, ImageNetResNet, build_backbone


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "millions"),
    [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.73)],
)
def test_resnet_parameter_counts_match_he_et_al(name, millions):
    assert count_parameters(build_backbone(name)) / 1e6 == pytest.approx(millions, abs=0.005)


def test_resnet32_option_a_has_464k_parameters_and_option_b_adds_projections():
    option_a = count_parameters(build_backbone("resnet32"))
    option_b = count_parameters(build_backbone("resnet32", shortcut="B"))
    assert option_a == 464_154
    # two 1x1 projections (16->32, 32->64) with their BatchNorms
    assert option_b - option_a == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_option_a_shortcut_is_parameter_free_and_pads_channels():
    block = BasicBlock(16, 32, stride=2, shortcut="A")
    assert count_parameters(block.shortcut) == 0
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "vgg", "simple_cnn"])
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 32), (1, 8), (3, 9)])
def test_forward_shape_for_1_and_3_channel_inputs(name, in_channels, size):
    model = build_backbone(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, size, size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_resnet_exposes_named_layers():
    model = build_backbone("resnet20", in_channels=1)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 16 and model.conv1.bias is None
    assert model.conv1.kernel_size == (3, 3)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [3, 3, 3]
    assert all(isinstance(block, BasicBlock) for block in model.layer3)
    assert model.layer3[0].conv2.out_channels == 64 and model.fc.in_features == 64


def test_width_scales_channels():
    model = build_backbone("resnet20", width=8)
    assert model.conv1.out_channels == 8 and model.fc.in_features == 32


@pytest.mark.parametrize(("name", "count"), [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_imagenet_resnet_parameter_counts_match_torchvision(name, count):
    assert count_parameters(build_backbone(name, num_classes=1000, in_channels=3)) == count


@pytest.mark.parametrize(("name", "size"), [("resnet18", 224), ("resnet18", 64), ("resnet50", 224), ("resnet50", 64)])
def test_imagenet_resnet_forward_shape(name, size):
    model = build_backbone(name, num_classes=1000, in_channels=3).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 1000)
    assert torch.isfinite(logits).all()


def test_imagenet_resnet_layout_follows_he_et_al_table_1():
    resnet18 = build_backbone("resnet18", num_classes=1000)
    assert resnet18.conv1.kernel_size == (7, 7) and resnet18.conv1.stride == (2, 2)
    assert resnet18.maxpool.kernel_size == 3 and resnet18.maxpool.stride == 2
    stages = [resnet18.layer1, resnet18.layer2, resnet18.layer3, resnet18.layer4]
    assert [len(stage) for stage in stages] == [2, 2, 2, 2]
    assert all(isinstance(block, BasicBlock) for stage in stages for block in stage)
    assert [stage[0].conv1.stride for stage in stages] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert isinstance(resnet18.layer1[0].shortcut, nn.Identity)
    projection = resnet18.layer2[0].shortcut[0]
    assert isinstance(projection, nn.Conv2d) and projection.kernel_size == (1, 1) and projection.stride == (2, 2)
    resnet50 = build_backbone("resnet50", num_classes=1000)
    stages = [resnet50.layer1, resnet50.layer2, resnet50.layer3, resnet50.layer4]
    assert [len(stage) for stage in stages] == [3, 4, 6, 3]
    assert all(isinstance(block, Bottleneck) for stage in stages for block in stage)
    # torchvision v1.5: the stride sits on the 3x3 conv, the 1x1 reduce keeps the resolution
    assert [(stage[0].conv1.stride, stage[0].conv2.stride) for stage in stages] == [
        ((1, 1), (1, 1)), ((1, 1), (2, 2)), ((1, 1), (2, 2)), ((1, 1), (2, 2))]
    assert resnet50.layer1[0].conv1.out_channels == 64 and resnet50.layer1[0].conv3.out_channels == 256
    assert not isinstance(resnet50.layer1[0].shortcut, nn.Identity)
    assert resnet50.fc.in_features == 2048


def test_imagenet_resnet_width_scales_channels():
    model = build_backbone("resnet50", width=8, in_channels=1)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 8 and model.fc.in_features == 8 * 8 * 4


def test_factorized_resnet18_matches_the_projected_dense_model():
    torch.manual_seed(0)
    dense = build_backbone("resnet18", num_classes=10, width=8).eval()
    project_(dense, "tucker2", 0.5)
    small = factorize(dense, "tucker2", 0.5).eval()
    assert sum(p.numel() for p in small.parameters()) < count_parameters(dense)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (small(x) - dense(x)).abs().max().item() < 1e-4


def test_registry_names():
    assert set(BACKBONES) == {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet50",
                              "vgg", "simple_cnn"}


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match=r"`name` must be one of \['resnet20', .*'simple_cnn'\], got 'resnet34'"):
        build_backbone("resnet34")
    with pytest.raises(ValueError, match=r"`depth` must be 6n\+2.*21"):
        CifarResNet(21)
    with pytest.raises(ValueError, match=r"`depth` must be one of \[18, 50\], got 34"):
        ImageNetResNet(34)
    with pytest.raises(ValueError, match=r"`out_channels` must be a multiple of 4, got 10"):
        Bottleneck(8, 10)
    with pytest.raises(ValueError, match=r"`width`.*0"):
        build_backbone("resnet18", width=0)
    with pytest.raises(ValueError, match=r"`shortcut`.*\['A', 'B'\].*'C'"):
        CifarResNet(20, shortcut="C")
    with pytest.raises(ValueError, match=r"`num_classes`.*0"):
        build_backbone("simple_cnn", num_classes=0)
    with pytest.raises(ValueError, match=r"`in_channels`.*2\.5"):
        build_backbone("vgg", in_channels=2.5)


def test_backbone_learns_a_batch():
    torch.manual_seed(0)
    model = build_backbone("resnet20", num_classes=4, in_channels=1)
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 4, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = None
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
