import pytest
import torch
from torch import nn

from lrlightning import factorize, project_
from lrlightning.zoo import (
    BACKBONES, IMAGENET_BACKBONES, BasicBlock, Bottleneck, CifarResNet, ImageNetResNet, InvertedResidual, MobileNetV2,
    ResNeXt, ResNeXtBlock, build_backbone,
)


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
                              "vgg", "simple_cnn", "mobilenet_v2", "resnext", "conv1d", "conv3d"}
    assert IMAGENET_BACKBONES == ("resnet18", "resnet50", "mobilenet_v2")


def batchnorm_state(name: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.{key}", (channels,)) for key in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{name}.num_batches_tracked", ())]


def bottleneck_state(in_channels: int, inner: int, out_channels: int, groups: int, projection: bool
                     ) -> list[tuple[str, tuple[int, ...]]]:
    """The (key, shape) pairs, in order, of a bottleneck block's state_dict: 1×1 conv1 to `inner`, 3×3 conv2 in
    `groups` groups, 1×1 conv3 to `out_channels`, each followed by its BN, then the 1×1 conv + BN shortcut where it
    projects (none for the identity)."""
    state = [("conv1.weight", (inner, in_channels, 1, 1)), *batchnorm_state("bn1", inner),
             ("conv2.weight", (inner, inner // groups, 3, 3)), *batchnorm_state("bn2", inner),
             ("conv3.weight", (out_channels, inner, 1, 1)), *batchnorm_state("bn3", out_channels)]
    if projection:
        state += [("shortcut.0.weight", (out_channels, in_channels, 1, 1)),
                  *batchnorm_state("shortcut.1", out_channels)]
    return state


@pytest.mark.parametrize(("block", "expected"), [
    (lambda: Bottleneck(64, 256, stride=2), bottleneck_state(64, 64, 256, 1, projection=True)),
    (lambda: Bottleneck(256, 256), bottleneck_state(256, 64, 256, 1, projection=False)),
    (lambda: ResNeXtBlock(64, 64, 128, stride=2, groups=8), bottleneck_state(64, 64, 128, 8, projection=True)),
    (lambda: ResNeXtBlock(128, 64, 128, groups=4), bottleneck_state(128, 64, 128, 4, projection=False)),
])
def test_bottleneck_and_resnext_blocks_keep_their_state_dict_keys_and_shapes(block, expected):
    """Checkpoints of ResNet-50 and ResNeXt load: the blocks' parameters and buffers keep their names and shapes."""
    assert [(key, tuple(value.shape)) for key, value in block().state_dict().items()] == expected


@pytest.mark.parametrize(("build", "match"), [
    (lambda: build_backbone("resnet34"),
     r"`name` must be one of \['resnet20', .*'simple_cnn', .*'conv3d'\], got 'resnet34'"),
    (lambda: CifarResNet(21), r"`depth` must be 6n\+2.*21"),
    (lambda: ImageNetResNet(34), r"`depth` must be one of \[18, 50\], got 34"),
    (lambda: Bottleneck(8, 10), r"`out_channels` must be a multiple of 4, got 10"),
    (lambda: build_backbone("resnet18", width=0), r"`width`.*0"),
    (lambda: CifarResNet(20, shortcut="C"), r"`shortcut`.*\['A', 'B'\].*'C'"),
    (lambda: build_backbone("simple_cnn", num_classes=0), r"`num_classes`.*0"),
    (lambda: build_backbone("vgg", in_channels=2.5), r"`in_channels`.*2\.5"),
    (lambda: build_backbone("resnext", cardinality=6),
     r"`width` must be a multiple of `cardinality` \(6\).*got width=64"),
    (lambda: build_backbone("resnext", cardinality=0), r"`cardinality`.*0"),
    (lambda: build_backbone("resnext", blocks=0), r"`blocks`.*0"),
    (lambda: ResNeXtBlock(8, 12, 16, groups=8), r"`bottleneck_width` must be a multiple of `groups` \(8\), got 12"),
    (lambda: build_backbone("mobilenet_v2", width=0), r"`width` must be a number > 0.*got 0"),
    (lambda: build_backbone("mobilenet_v2", small_input="yes"), r"`small_input` must be a bool, got 'yes'"),
    (lambda: InvertedResidual(8, 8, 1, expansion=0), r"`expansion`.*0"),
    (lambda: build_backbone("conv1d", width=0), r"`width` must be a positive int, got 0"),
    (lambda: build_backbone("conv3d", width=0), r"`width` must be a positive int, got 0"),
    (lambda: build_backbone("conv1d", in_channels=-1), r"`in_channels`.*-1"),
    (lambda: build_backbone("conv3d", in_channels=-1), r"`in_channels`.*-1"),
])
def test_bad_arguments_raise_value_errors_naming_them(build, match):
    with pytest.raises(ValueError, match=match):
        build()


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


def convs(model: nn.Module, kind: type[nn.Module] = nn.Conv2d) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def logits_and_pooled_size(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The logits of `x` (checked finite) and the spatial size of the features entering the global pool."""
    sizes = []
    handle = model.pool.register_forward_hook(lambda _m, inputs, _out: sizes.append(tuple(inputs[0].shape[2:])))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    assert torch.isfinite(logits).all()
    return logits, sizes[0]


def test_mobilenet_v2_parameter_count_matches_sandler_et_al():
    count = count_parameters(build_backbone("mobilenet_v2", num_classes=1000, in_channels=3))
    assert count / 1e6 == pytest.approx(3.50, rel=0.01)
    assert count == 3_504_872  # torchvision's mobilenet_v2 (its dropout has no parameters)


@pytest.mark.parametrize(("in_channels", "size", "small_input", "feature_size"),
                         [(3, 224, False, 7), (1, 28, True, 4)])
def test_mobilenet_v2_forward_shape(in_channels, size, small_input, feature_size):
    model = build_backbone("mobilenet_v2", num_classes=7, in_channels=in_channels, small_input=small_input).eval()
    x = torch.randn(1 if size == 224 else 2, in_channels, size, size)
    logits, pooled = logits_and_pooled_size(model, x)
    assert logits.shape == (x.shape[0], 7) and pooled == (feature_size, feature_size)


def test_mobilenet_v2_layout_follows_sandler_et_al_table_2():
    model = build_backbone("mobilenet_v2", num_classes=1000)
    assert isinstance(model, MobileNetV2) and len(model.blocks) == 17
    assert all(isinstance(block, InvertedResidual) for block in model.blocks)
    assert model.stem[0].out_channels == 32 and model.stem[0].stride == (2, 2)
    assert model.head[0].out_channels == 1280 and model.fc.in_features == 1280
    assert isinstance(model.blocks[0].expand, nn.Identity)
    assert [block.depthwise[0].stride[0] for block in model.blocks] == [
        1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert [block.project[0].out_channels for block in model.blocks] == [
        16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160, 320]
    assert sum(block.use_residual for block in model.blocks) == 10
    assert all(isinstance(m, nn.ReLU6) for block in model.blocks for m in block.depthwise[2:])
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for block in model.blocks for m in block.project)
    small = build_backbone("mobilenet_v2", small_input=True)
    assert small.stem[0].stride == (1, 1) and small.blocks[1].depthwise[0].stride == (1, 1)
    assert small.blocks[3].depthwise[0].stride == (2, 2)


def test_mobilenet_v2_has_depthwise_and_pointwise_convs():
    model = build_backbone("mobilenet_v2")
    depthwise = [m for m in convs(model) if m.groups > 1]
    assert len(depthwise) == 17
    assert all(m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3) for m in depthwise)
    pointwise = [m for m in convs(model) if m.kernel_size == (1, 1)]
    assert len(pointwise) == 16 + 17 + 1  # expansions (not the t=1 block), projections, last conv
    assert all(m.groups == 1 for m in pointwise)


def test_mobilenet_v2_width_multiplier_rounds_channels_to_multiples_of_8():
    model = build_backbone("mobilenet_v2", width=0.5)
    assert model.stem[0].out_channels == 16 and model.blocks[0].project[0].out_channels == 8
    assert model.blocks[-1].project[0].out_channels == 160 and model.head[0].out_channels == 1280
    assert all(m.out_channels % 8 == 0 for m in convs(model))
    wide = build_backbone("mobilenet_v2", width=1.4)
    assert wide.stem[0].out_channels == 48 and wide.head[0].out_channels == 1792


def test_resnext_forward_shape_and_grouped_convs():
    model = build_backbone("resnext", num_classes=7, in_channels=3).eval()
    assert isinstance(model, ResNeXt)
    logits, pooled = logits_and_pooled_size(model, torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7) and pooled == (8, 8)
    grouped = [m for m in convs(model) if m.groups > 1]
    assert [(m.in_channels, m.groups, m.stride) for m in grouped] == [(64, 8, (1, 1)), (128, 8, (2, 2)),
                                                                        (256, 8, (2, 2))]
    assert all(m.kernel_size == (3, 3) for m in grouped)
    assert [stage[0].conv3.out_channels for stage in (model.layer1, model.layer2, model.layer3)] == [128, 256, 512]
    assert all(not isinstance(stage[0].shortcut, nn.Identity) for stage in (model.layer1, model.layer2, model.layer3))


def test_resnext_cardinality_blocks_and_width():
    model = build_backbone("resnext", in_channels=1, cardinality=4, blocks=2, width=32)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [2, 2, 2]
    assert all(isinstance(block, ResNeXtBlock) for block in model.layer2)
    grouped = [m for m in convs(model) if m.groups > 1]
    assert len(grouped) == 6 and all(m.groups == 4 for m in grouped)
    assert isinstance(model.layer2[1].shortcut, nn.Identity) and model.fc.in_features == 256
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_conv1d_reads_sequences_and_images_as_pixel_sequences():
    model = build_backbone("conv1d", num_classes=7, in_channels=1).eval()
    layers = convs(model, nn.Conv1d)
    assert len(layers) == 5 and any(m.kernel_size == (1,) for m in layers)
    assert layers[0].kernel_size == (9,) and layers[0].stride == (2,)
    assert not convs(model) and not convs(model, nn.Conv3d)
    images = torch.randn(2, 1, 28, 28)
    logits, pooled = logits_and_pooled_size(model, images)
    assert logits.shape == (2, 7) and pooled == (49,)  # 784 steps: stride 2, then three 2x pools
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images.reshape(2, 1, 784)))
        assert model(torch.randn(2, 1, 1000)).shape == (2, 7)
        assert model(torch.randn(1, 1, 5)).shape == (1, 7)
    with pytest.raises(ValueError, match=r"input must be \(N, C, L\) or \(N, C, H, W\), got shape \(2, 1, 4, 4, 4\)"):
        model(torch.randn(2, 1, 4, 4, 4))


def test_conv3d_forward_shape_and_layers():
    model = build_backbone("conv3d", num_classes=7, in_channels=3).eval()
    logits, pooled = logits_and_pooled_size(model, torch.randn(2, 3, 8, 32, 32))
    assert logits.shape == (2, 7) and pooled == (2, 8, 8)
    layers = convs(model, nn.Conv3d)
    assert [m.out_channels for m in layers] == [16, 32, 32, 64]
    assert [m.kernel_size for m in layers].count((1, 1, 1)) == 1
    assert [m.stride for m in layers] == [(1, 1, 1), (2, 2, 2), (1, 1, 1), (2, 2, 2)]
    assert all(isinstance(m, nn.BatchNorm3d) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize(("name", "kind"), [("conv1d", nn.Conv1d), ("conv3d", nn.Conv3d)])
def test_1d_and_3d_convs_get_he_normal_fan_out_init(name, kind):
    torch.manual_seed(0)
    model = build_backbone(name)
    pointwise = next(m for m in convs(model, kind) if set(m.kernel_size) == {1})
    assert pointwise.weight.std().item() == pytest.approx((2 / pointwise.out_channels) ** 0.5, rel=0.1)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in norms)


@pytest.mark.parametrize(("name", "kwargs", "shape"), [
    ("mobilenet_v2", {"width": 0.25, "small_input": True}, (1, 16, 16)),
    ("resnext", {"width": 16, "cardinality": 4}, (1, 16, 16)),
    ("conv1d", {"width": 8}, (1, 28, 28)),
    ("conv3d", {"width": 4}, (1, 4, 8, 8)),
])
def test_new_backbones_train_every_parameter(name, kwargs, shape):
    model = build_backbone(name, num_classes=3, in_channels=1, **kwargs)
    loss = nn.functional.cross_entropy(model(torch.randn(4, *shape)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
