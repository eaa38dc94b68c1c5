"""Factorization of issue #2: every factorized layer computes exactly what the projected dense layer computes;
layer selection, the break-even guard, parameter and MAC accounting, save/load, non-finite weights and the
validation of every option."""
import copy
import re

import pytest
import torch
from torch import nn

from lrlightning import (
    Activation,
    Compression,
    Energy,
    LowRankOptions,
    NonFiniteWeightError,
    Selection,
    Solver,
    TiledSVD,
    Tucker2,
    count_macs,
    count_params,
    factorize,
    load_factorized,
    plan_layers,
    project_,
    save_factorized,
)
from lrlightning.layers import LowRankConv2d, LowRankLinear
from lrlightning.plan import frozen_ranks
from lrlightning.schemes.tiled_svd import TiledSVDConv2d
from lrlightning.zoo import build_backbone

IN_CHANNELS, OUT_CHANNELS = 8, 12

CONV_CONFIGS = {
    "stride2": dict(kernel_size=3, stride=2, padding=1),
    "padding2_dilation2": dict(kernel_size=3, padding=2, dilation=2),
    "no_padding": dict(kernel_size=3),
    "no_bias": dict(kernel_size=3, padding=1, bias=False),
    "kernel3x5_stride2x1": dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2)),
    "same": dict(kernel_size=3, padding="same"),
    "same_dilation2_kernel3x5": dict(kernel_size=(3, 5), padding="same", dilation=2),
    "same_even_kernel2x4": dict(kernel_size=(2, 4), padding="same"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular_kernel3x5": dict(kernel_size=(3, 5), stride=2, padding=(1, 2), padding_mode="circular"),
    "replicate_dilation2": dict(kernel_size=3, padding=2, dilation=2, padding_mode="replicate"),
}

SCHEME_OPTIONS = {
    "svd": dict(scheme="svd", rank=3),
    "spatial_svd": dict(scheme="spatial_svd", rank=3),
    "tucker2": dict(scheme="tucker2", rank=(3, 4)),
    "tucker2_hooi": dict(scheme=Tucker2(hooi_iters=2), rank=(3, 4)),
    "tiled_svd_ragged": dict(scheme=TiledSVD(tile_shape=(5, 7)), rank=2),
}


def seeded(seed):
    torch.manual_seed(seed)


def conv_model(**conv_args):
    """A stem conv (skipped as the first conv) then the conv under test, named ``body``."""
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, conv_args.pop("in_channels", IN_CHANNELS), 3, padding=1))
    model.add_module("body", nn.Conv2d(model.stem.out_channels, conv_args.pop("out_channels", OUT_CHANNELS),
                                       **conv_args))
    if model.body.bias is not None:
        with torch.no_grad():
            model.body.bias.normal_()
    return model


def max_abs_diff(a, b):
    return (a - b).abs().max().item()


def assert_projected_equals_factorized(model, options, inputs):
    """Project ``model`` in place, factorize it with the same options, compare outputs; returns the copy."""
    project_(model, **options)
    factorized = factorize(model, **options)
    with torch.no_grad():
        dense_out, factorized_out = model(inputs), factorized(inputs)
    assert dense_out.shape == factorized_out.shape
    assert max_abs_diff(dense_out, factorized_out) <= 1e-4
    return factorized


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("config", sorted(CONV_CONFIGS))
@pytest.mark.parametrize("scheme", sorted(SCHEME_OPTIONS))
def test_factorized_conv_equals_the_projected_dense_conv(scheme, config):
    seeded(0)
    model = conv_model(**CONV_CONFIGS[config])
    inputs = torch.randn(2, 3, 11, 13)
    factorized = assert_projected_equals_factorized(model, SCHEME_OPTIONS[scheme], inputs)
    expected_type = TiledSVDConv2d if scheme.startswith("tiled") else LowRankConv2d
    assert type(factorized.body) is expected_type
    assert type(factorized.stem) is nn.Conv2d


ALIGNED_CONFIGS = ["stride2", "padding2_dilation2", "no_padding", "no_bias", "same"]


@pytest.mark.parametrize("config", ALIGNED_CONFIGS)
def test_aligned_tiled_svd_takes_the_grouped_conv_and_channel_shuffle_path(config):
    """Tile columns a multiple of kh·kw that divide the matrix: grouped conv, ChannelShuffle, grouped 1×1 conv."""
    seeded(1)
    model = conv_model(out_channels=16, **CONV_CONFIGS[config])
    options = dict(scheme=TiledSVD(tile_shape=(8, 18)), rank=2)
    factorized = assert_projected_equals_factorized(model, options, torch.randn(2, 3, 11, 13))
    body = factorized.body
    assert isinstance(body, LowRankConv2d)
    assert [type(m) for m in body] == [nn.Conv2d, nn.ChannelShuffle, nn.Conv2d]
    assert body[0].groups == 72 // 18 and body[2].groups == 16 // 8


def test_aligned_tiles_with_reflect_padding_fall_back_to_im2col():
    seeded(2)
    model = conv_model(out_channels=16, **CONV_CONFIGS["reflect"])
    options = dict(scheme=TiledSVD(tile_shape=(8, 18)), rank=2)
    factorized = assert_projected_equals_factorized(model, options, torch.randn(2, 3, 9, 9))
    assert isinstance(factorized.body, TiledSVDConv2d)


def test_tiles_larger_than_the_matrix_are_clamped():
    seeded(3)
    model = conv_model(out_channels=16, kernel_size=3, padding=1)
    options = dict(scheme=TiledSVD(tile_shape=(100, 36)), rank=3)
    factorized = assert_projected_equals_factorized(model, options, torch.randn(2, 3, 8, 8))
    assert [type(m) for m in factorized.body] == [nn.Conv2d, nn.ChannelShuffle, nn.Conv2d]


@pytest.mark.parametrize("bias", [True, False])
def test_factorized_linear_equals_the_projected_dense_linear(bias):
    seeded(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 25, 30, bias=bias), nn.ReLU(),
                          nn.Linear(30, 10, bias=bias))
    options = dict(scheme="tucker2", rank=4, layers=Selection(linear=True))
    factorized = assert_projected_equals_factorized(model, options, torch.randn(3, 3, 5, 5))
    assert isinstance(factorized[2], LowRankLinear) and isinstance(factorized[4], LowRankLinear)
    assert factorized[2].rank == 4 and (factorized[4][1].bias is not None) == bias
    assert type(factorized[0]) is nn.Conv2d


def test_linear_layers_are_left_alone_without_linear_true():
    seeded(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    factorized = factorize(model, "svd", rank=2)
    assert type(factorized[3]) is nn.Linear and isinstance(factorized[1], LowRankConv2d)


def mixed_model():
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 16, 3, padding=1))
    model.add_module("depthwise", nn.Conv2d(16, 16, 3, padding=1, groups=16))
    model.add_module("grouped", nn.Conv2d(16, 16, 3, padding=1, groups=2))
    model.add_module("pointwise", nn.Conv2d(16, 16, 1))
    model.add_module("full", nn.Conv2d(16, 16, 3, padding=1))
    return model


def test_the_first_conv_is_left_alone_and_every_other_kind_is_factorized():
    seeded(6)
    model = mixed_model()
    plans, skipped = plan_layers(model, LowRankOptions("svd", rank=1))
    assert [p.name for p in plans] == ["depthwise", "grouped", "pointwise", "full"]
    assert [(s.name, "first conv" in s.reason) for s in skipped] == [("stem", True)]
    factorized = factorize(model, "svd", rank=1)
    assert type(factorized.stem) is nn.Conv2d and torch.equal(factorized.stem.weight, model.stem.weight)
    assert all(isinstance(factorized.get_submodule(p.name), LowRankConv2d) for p in plans)


def test_first_conv_is_projected_when_skip_first_conv_is_false():
    model = mixed_model()
    plans, _ = plan_layers(model, LowRankOptions("svd", rank=1, layers=Selection(skip_first_conv=False)))
    assert [p.name for p in plans] == ["stem", "depthwise", "grouped", "pointwise", "full"]


def test_break_even_layer_stays_dense_with_a_warning_naming_it():
    seeded(7)
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 4, 3, padding=1))
    model.add_module("narrow", nn.Conv2d(4, 4, 3, padding=1))
    model.add_module("wide", nn.Conv2d(4, 32, 3, padding=1))
    with pytest.warns(UserWarning, match=r"'narrow' stays dense \(break-even"):
        factorized = factorize(model, "svd", rank=4)
    assert type(factorized.narrow) is nn.Conv2d and torch.equal(factorized.narrow.weight, model.narrow.weight)
    assert isinstance(factorized.wide, LowRankConv2d)
    _, skipped = plan_layers(model, LowRankOptions("svd", rank=4), warn=False)
    assert [s.name for s in skipped if s.reason.startswith("break-even")] == ["narrow"]


def test_exactly_break_even_layer_stays_dense():
    """spatial_svd at half rank of a square 3×3 conv: r·(3S + 3T) = 1.5S·6S = 9S², the dense count."""
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 16, 3, padding=1))
    model.add_module("square", nn.Conv2d(16, 16, 3, padding=1))
    model.add_module("widening", nn.Conv2d(16, 32, 3, padding=1))
    with pytest.warns(UserWarning, match=r"'square' stays dense \(break-even: rank 24 gives 2304 >= 2304"):
        plans, _ = plan_layers(model, LowRankOptions("spatial_svd", rank=0.5))
    assert [p.name for p in plans] == ["widening"]


def named_blocks_model():
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 8, 3, padding=1))
    for block in ("layer1", "layer2"):
        stage = nn.Sequential()
        stage.add_module("conv1", nn.Conv2d(8, 8, 3, padding=1))
        stage.add_module("conv2", nn.Conv2d(8, 8, 3, padding=1))
        model.add_module(block, stage)
    return model


def test_include_and_exclude_patterns_select_layers_by_name():
    model = named_blocks_model()
    plans, _ = plan_layers(model, LowRankOptions("svd", rank=2, layers=Selection(include="layer2.*")))
    assert [p.name for p in plans] == ["layer2.conv1", "layer2.conv2"]
    plans, skipped = plan_layers(model, LowRankOptions("svd", rank=2, layers=Selection(exclude=["*.conv2"])))
    assert [p.name for p in plans] == ["layer1.conv1", "layer2.conv1"]
    assert {s.name for s in skipped if "exclude" in s.reason} == {"layer1.conv2", "layer2.conv2"}
    plans, _ = plan_layers(model, LowRankOptions("svd", rank=2, layers=Selection(include=["stem", "layer1.*"],
                                                                               exclude="*.conv1")))
    assert [p.name for p in plans] == ["stem", "layer1.conv2"]
    factorized = factorize(model, "svd", rank=2, layers=Selection(include="layer2.*"))
    assert type(factorized.layer1.conv1) is nn.Conv2d and isinstance(factorized.layer2.conv1, LowRankConv2d)


def test_no_layer_selected_raises_listing_the_candidates():
    model = named_blocks_model()
    with pytest.raises(ValueError, match=r"no layer selected.*candidate layers are \['stem', 'layer1.conv1'"):
        factorize(model, "svd", rank=2, layers=Selection(include="layer3.*"))
    with pytest.raises(ValueError, match=r"candidate layers are \['0'\]"):
        project_(nn.Sequential(nn.Conv2d(3, 8, 3)), "svd", rank=2)


def test_factorize_does_not_mutate_its_input():
    seeded(8)
    model = named_blocks_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    factorized = factorize(model, "tucker2", rank=0.5)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert factorized.stem.weight is not model.stem.weight
    with torch.no_grad():
        factorized.stem.weight.add_(1.0)
    assert torch.equal(model.stem.weight, before["stem.weight"])


PARAM_CASES = {
    "svd": dict(scheme="svd", rank=5),
    "spatial_svd": dict(scheme="spatial_svd", rank=5),
    "tucker2": dict(scheme="tucker2", rank=(3, 6)),
    "tiled_svd_aligned": dict(scheme=TiledSVD(tile_shape=(8, 18)), rank=2),
    "tiled_svd_ragged": dict(scheme=TiledSVD(tile_shape=(5, 7)), rank=2),
}


def weight_numel(module):
    return sum(p.numel() for name, p in module.named_parameters() if not name.endswith("bias"))


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_planned_factorized_params_equal_the_factorized_module_weights(case):
    model = conv_model(out_channels=16, kernel_size=3, padding=1)
    options = PARAM_CASES[case]
    (plan,), _ = plan_layers(model, LowRankOptions(**options))
    factorized = factorize(model, **options)
    assert plan.params_factorized == weight_numel(factorized.body)
    assert plan.params_dense == model.body.weight.numel()
    assert count_params(model) - count_params(factorized) == plan.params_dense - plan.params_factorized


@pytest.mark.parametrize("tile_shape, rank, ratio", [((64, 64), 16, 2.0), ((64, 64), 8, 4.0), ((8, 8), 1, 4.0)])
def test_tiled_svd_compression_of_paper_table_1(tile_shape, rank, ratio):
    model = conv_model(in_channels=64, out_channels=64, kernel_size=3, padding=1, bias=False)
    options = dict(scheme=TiledSVD(tile_shape=tile_shape), rank=rank)
    (plan,), _ = plan_layers(model, LowRankOptions(**options))
    assert plan.compression == ratio
    factorized = factorize(model, **options)
    assert 64 * 64 * 9 / weight_numel(factorized.body) == ratio


def conv_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def test_dense_conv_macs_follow_the_formula():
    conv = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    height = conv_output_size(15, 3, 2, 1, 1)
    width = conv_output_size(17, 5, 1, 2, 2)
    assert count_macs(nn.Sequential(conv), (6, 15, 17)) == height * width * 10 * 6 * 15
    assert count_macs(nn.Sequential(conv, nn.Flatten(), nn.Linear(10 * height * width, 7)), (6, 15, 17)) == \
        height * width * 10 * 6 * 15 + 10 * height * width * 7


def test_factorized_svd_macs_follow_the_formula():
    model = conv_model(in_channels=16, out_channels=24, kernel_size=3, stride=2, padding=1)
    factorized = factorize(model, "svd", rank=5)
    out = conv_output_size(20, 3, 2, 1, 1)
    macs = count_macs(factorized, (3, 20, 20), per_layer=True)
    stem = 20 * 20 * 16 * 3 * 9
    assert macs["stem"] == stem
    assert macs["body.0"] + macs["body.1"] == out * out * 5 * (16 * 9 + 24)
    assert count_macs(factorized, (3, 20, 20)) == stem + out * out * 5 * (16 * 9 + 24)


def test_factorized_tiled_macs_are_positions_times_stored_factors():
    model = conv_model(in_channels=8, out_channels=12, kernel_size=3, padding=1)
    factorized = factorize(model, TiledSVD(tile_shape=(5, 7)), rank=2)
    (plan,), _ = plan_layers(model, LowRankOptions(TiledSVD(tile_shape=(5, 7)), rank=2))
    assert count_macs(factorized, (3, 9, 9), per_layer=True)["body"] == 9 * 9 * plan.params_factorized


SAVE_CASES = {
    "svd_linear": dict(scheme="svd", rank=3, layers=Selection(linear=True)),
    "spatial_svd": dict(scheme="spatial_svd", rank=3),
    "tucker2": dict(scheme="tucker2", rank=(3, 4)),
    "tiled_svd_aligned": dict(scheme=TiledSVD(tile_shape=(8, 24)), rank=2),
    "tiled_svd_ragged": dict(scheme=TiledSVD(tile_shape=(5, 7)), rank=2),
}


def save_load_model():
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("reflect", nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="reflect"))
    model.add_module("same", nn.Conv2d(16, 16, 3, padding="same", bias=False))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(16, 10))
    return model


@pytest.mark.parametrize("case", sorted(SAVE_CASES))
def test_save_then_load_gives_identical_outputs(case, tmp_path):
    seeded(9)
    model = save_load_model()
    options = SAVE_CASES[case]
    project_(model, **options)
    factorized = factorize(model, **options).eval()
    path = tmp_path / "model.pt"
    save_factorized(factorized, path, metadata={"case": case})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "lrlightning.factorized/1" and payload["metadata"] == {"case": case}
    replaced = {n for n, m in factorized.named_children() if type(m) is not type(model.get_submodule(n))}
    assert set(payload["layers"]) == replaced
    seeded(99)
    loaded = load_factorized(path, model=save_load_model()).eval()
    inputs = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), factorized(inputs))
        assert max_abs_diff(loaded(inputs), model(inputs)) <= 1e-4
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in factorized.named_modules()]


def test_load_factorized_rejects_other_files(tmp_path):
    state_dict_path = tmp_path / "state_dict.pt"
    torch.save(nn.Linear(2, 2).state_dict(), state_dict_path)
    with pytest.raises(ValueError, match=r"state_dict\.pt'.*not a factorized model"):
        load_factorized(state_dict_path, model=nn.Linear(2, 2))
    other_format = tmp_path / "other.pt"
    torch.save({"format": "something/9"}, other_format)
    with pytest.raises(ValueError, match="not a factorized model"):
        load_factorized(other_format, model=nn.Linear(2, 2))


def saved_factorized_file(path):
    save_factorized(factorize(named_blocks_model(), "svd", rank=2), path)
    return path


def test_load_factorized_of_a_file_that_is_not_a_torch_file_raises_naming_the_path(tmp_path):
    for name, data, says in (("notes.txt", b"hello, not a torch file\n", r"is not a torch file \(it starts with b'hell'\)"),
                             ("empty.pt", b"", r"is not a torch file \(it starts with b''\)"),
                             ("zip.pt", b"PK\x03\x04 not really a zip archive",
                              r"cannot be read as a factorized model \(truncated, corrupt or not a torch file")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(repr(str(path))) + " " + says):
            load_factorized(path, model=named_blocks_model())


def test_load_factorized_of_a_truncated_file_raises_naming_the_path(tmp_path):
    whole = saved_factorized_file(tmp_path / "whole.pt").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 1, 10):
        path = tmp_path / f"truncated_{cut}.pt"
        path.write_bytes(whole[:cut])
        message = re.escape(repr(str(path))) + r" cannot be read as a factorized model \(truncated, corrupt or not a " \
            r"torch file: "
        with pytest.raises(ValueError, match=message):
            load_factorized(path, model=named_blocks_model())
    assert isinstance(load_factorized(tmp_path / "whole.pt", model=named_blocks_model()).layer1.conv1, LowRankConv2d)


def test_load_factorized_of_a_missing_file_raises_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (tmp_path / "missing.pt", tmp_path):
        message = re.escape(repr(str(path))) + r" is not a file: `path` must name a factorized model written by " \
            r"save_factorized"
        with pytest.raises(ValueError, match=message):
            load_factorized(path, model=named_blocks_model())
    with pytest.raises(ValueError, match=r"'missing\.pt' is not a file"):
        load_factorized("missing.pt")


def test_load_factorized_of_a_torch_file_not_saved_by_lrlightning_raises_naming_the_path(tmp_path):
    pickled_module = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled_module)
    message = re.escape(repr(str(pickled_module))) + r" is not a factorized model saved by lrlightning: it holds " \
        r"Python objects"
    with pytest.raises(ValueError, match=message):
        load_factorized(pickled_module, model=nn.Linear(2, 2))
    for name, payload, found in (("list.pt", [torch.zeros(2)], "'list'"), ("no_format.pt", {"weight": torch.zeros(2)},
                                 "None"), ("old_format.pt", {"format": "lrlightning.factorized/0"},
                                 "'lrlightning.factorized/0'")):
        path = tmp_path / name
        torch.save(payload, path)
        with pytest.raises(ValueError, match=re.escape(repr(str(path))) + r" is not a factorized model saved by "
                           r"lrlightning \(format 'lrlightning\.factorized/1', found " + re.escape(found) + r"\)"):
            load_factorized(path, model=nn.Linear(2, 2))


@pytest.mark.parametrize("scheme", [TiledSVD(tile_shape=(4, 4)), Tucker2(hooi_iters=1)], ids=repr)
def test_scheme_with_its_own_option_round_trips_through_save_and_load(scheme, tmp_path):
    seeded(13)
    model = save_load_model()
    rank = 1 if isinstance(scheme, TiledSVD) else (3, 4)
    factorized = factorize(model, scheme, rank).eval()
    project_(model, scheme, rank)
    path = tmp_path / "model.pt"
    save_factorized(factorized, path)
    loaded = load_factorized(path, model=save_load_model()).eval()
    inputs = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), factorized(inputs))
        torch.testing.assert_close(loaded(inputs), model.eval()(inputs), atol=1e-4, rtol=0)
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in factorized.named_modules()]
    assert set(torch.load(path, weights_only=True)["layers"]) == {"reflect", "same"}
    if isinstance(scheme, TiledSVD):
        assert loaded.reflect.tile_shape == factorized.reflect.tile_shape == (4, 4)
    for key, value in factorized.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_load_factorized_without_backbone_or_model_raises(tmp_path):
    path = tmp_path / "model.pt"
    save_factorized(factorize(named_blocks_model(), "svd", rank=2), path)
    with pytest.raises(ValueError, match="records no `backbone`"):
        load_factorized(path)


RESNET_OPTIONS = {
    "svd": dict(scheme="svd", rank=0.25),
    "spatial_svd": dict(scheme="spatial_svd", rank=0.25),
    "tucker2": dict(scheme="tucker2", rank=0.25),
    "tiled_svd": dict(scheme=TiledSVD(tile_shape=(16, 16)), rank=4),
}


@pytest.mark.parametrize("scheme", sorted(RESNET_OPTIONS))
def test_projected_resnet_and_its_factorization_give_the_same_logits(scheme):
    seeded(10)
    model = build_backbone("resnet20", num_classes=10, in_channels=3).eval()
    options = RESNET_OPTIONS[scheme]
    stats = project_(model, **options)
    assert len(stats) == 18
    factorized = factorize(model, **options).eval()
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense_logits, factorized_logits = model(inputs), factorized(inputs)
    assert dense_logits.abs().max().item() > 1e-2
    assert max_abs_diff(dense_logits, factorized_logits) <= 1e-4
    assert count_params(factorized) < count_params(model)


def test_load_factorized_rebuilds_the_recorded_backbone(tmp_path):
    seeded(12)
    model = build_backbone("resnet20", num_classes=10, in_channels=3).eval()
    project_(model, "tucker2", rank=0.25)
    factorized = factorize(model, "tucker2", rank=0.25).eval()
    path = tmp_path / "resnet20.pt"
    save_factorized(factorized, path, backbone={"name": "resnet20", "num_classes": 10, "in_channels": 3})
    loaded = load_factorized(path).eval()
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), factorized(inputs))


def test_non_finite_weight_raises_naming_the_layer_and_writes_nothing():
    seeded(11)
    model = named_blocks_model()
    model.add_module("head", nn.Conv2d(8, 16, 3, padding=1))
    with torch.no_grad():
        model.head.weight[3, 2, 1, 0] = float("nan")
        model.layer2.conv1.weight[0, 0, 0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteWeightError, match=r"'layer2\.conv1'") as raised:
        project_(model, "svd", rank=2)
    assert raised.value.layer == "layer2.conv1"
    for key, value in model.state_dict().items():
        assert torch.equal(value.isnan(), before[key].isnan()), key
        assert torch.equal(value.nan_to_num(), before[key].nan_to_num()), key
    with torch.no_grad():
        model.layer2.conv1.weight[0, 0, 0, 0] = 0.0
    with pytest.raises(NonFiniteWeightError, match=r"'head'"):
        project_(model, "svd", rank=2)
    assert torch.equal(model.layer1.conv1.weight, before["layer1.conv1.weight"])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("rule", [dict(rank=2), dict(rank=Energy(0.9)), dict(rank=Compression(2.0))])
def test_factorize_of_a_non_finite_weight_raises_naming_the_layer(value, rule):
    model = named_blocks_model()
    with torch.no_grad():
        model.layer2.conv1.weight[1, 2, 0, 1] = value
    for function in (factorize, project_):
        with pytest.raises(NonFiniteWeightError, match=r"'layer2\.conv1'") as raised:
            function(model, "tucker2", **rule)
        assert raised.value.layer == "layer2.conv1"
    left_out = factorize(model, "svd", rank={"layer1.conv1": 2, "layer2.conv2": 2})
    assert type(left_out.layer2.conv1) is nn.Conv2d and isinstance(left_out.layer2.conv2, LowRankConv2d)
    excluded = factorize(model, "svd", layers=Selection(exclude="layer2.conv1"), **rule)
    assert isinstance(excluded.layer1.conv1, LowRankConv2d)


INVALID_OPTIONS = [
    (dict(scheme="tucker3", rank=2), r"`scheme` must be one of .*got 'tucker3'"),
    (dict(scheme=TiledSVD, rank=2), r"`scheme` must be one of .*a configured Scheme.*got <class .*TiledSVD'>"),
    (dict(rank=0), r"`rank` must be .*got 0$"),
    (dict(rank=-1), r"`rank` must be .*got -1$"),
    (dict(rank=1.5), r"`rank` .*must be in \(0, 1\], got 1\.5"),
    (dict(rank=0.0), r"`rank` .*must be in \(0, 1\], got 0\.0"),
    (dict(rank=True), r"`rank` must be .*got True"),
    (dict(rank="half"), r"`rank` must be .*got 'half'"),
    (dict(rank=None), r"`rank` must be .*Energy\(fraction\), Compression\(factor\) or Budget\(factor, \.\.\.\); "
                      r"got None$"),
    (dict(rank=(2, 3)), r"`rank` must be .*got \(2, 3\)"),
    (dict(scheme="tucker2", rank=(0, 3)), r"`rank` must be .*pair \(R_in, R_out\).*got \(0, 3\)"),
    (dict(scheme="tucker2", rank=(2, 3, 4)), r"`rank` must be .*got \(2, 3, 4\)"),
    (dict(rank={"layer1.conv1": 0}), r"`rank\['layer1\.conv1'\]` must be an int >= 1, got 0"),
    (dict(scheme="tiled_svd", rank=2), r"`scheme`='tiled_svd' needs options of its own \(.*'tile_shape'\): pass a "
                                       r"configured scheme, e\.g\. TiledSVD\(\.\.\.\)"),
    (dict(rank=2, solver={"driver": "lanczos"}), r"`Solver\.driver` must be one of \('auto', 'exact', 'randomized', "
                                                 r"'gram', 'gesvd', 'gesvdj', 'gesvda'\), got 'lanczos'"),
    (dict(rank=2, solver={"device": "tpu:3"}), r"`Solver\.device` must be 'cpu' or a CUDA device .*got 'tpu:3'"),
    (dict(rank=2, solver="gram"), r"`solver` must be a Solver or a mapping of its fields, got 'gram'"),
    (dict(rank=2, layers={"include": 3}), r"`Selection\.include` must be a glob pattern .*got 3"),
    (dict(rank=2, layers={"exclude": ["ok", 1]}), r"`Selection\.exclude` must be a glob pattern .*got \['ok', 1\]"),
    (dict(rank=2, layers={"linear": 1}), r"`Selection\.linear` must be a bool, got 1"),
    (dict(rank=2, layers=3), r"`layers` must be a Selection or a mapping of its fields, got 3"),
    (dict(rank=2, objective="output"), r"`objective` must be 'weight', 'activation' or Activation\(batches=\.\.\., "
                                       r"ridge=\.\.\., bn_weighting=\.\.\., observe_training=\.\.\.\), got 'output'"),
    (dict(rank=2, objective={"ridge": 0}), r"`Activation\.ridge` must be a number > 0 .*got 0$"),
    (dict(rank=2, objective={"batches": 0}), r"`Activation\.batches` must be an int >= 1, got 0$"),
    (dict(rank=2, objective={"bn_weighting": 1}), r"`Activation\.bn_weighting` must be a bool, got 1"),
]


@pytest.mark.parametrize("kwargs, message", INVALID_OPTIONS,
                         ids=[re.sub(r"\W+", "-", str(kwargs)) for kwargs, _ in INVALID_OPTIONS])
def test_invalid_options_name_the_argument_and_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankOptions(**kwargs)


INVALID_PARTS = [
    (TiledSVD, dict(tile_shape=(0, 4)), r"`tile_shape` of TiledSVD must be a pair .*got \(0, 4\)"),
    (TiledSVD, dict(tile_shape=(4,)), r"`tile_shape` of TiledSVD must be a pair .*got \(4,\)"),
    (TiledSVD, dict(tile_shape=(4.0, 4)), r"`tile_shape` of TiledSVD must be a pair .*got \(4\.0, 4\)"),
    (Tucker2, dict(hooi_iters=-1), r"`hooi_iters` of Tucker2 must be an int >= 0, got -1"),
    (Tucker2, dict(hooi_iters=1.0), r"`hooi_iters` of Tucker2 must be an int >= 0, got 1\.0"),
    (Energy, dict(fraction=0), r"`Energy\.fraction` must be a number in \(0, 1\], got 0$"),
    (Energy, dict(fraction=1.2), r"`Energy\.fraction` must be a number in \(0, 1\], got 1\.2"),
    (Compression, dict(factor=1), r"`Compression\.factor` must be a number > 1 .*got 1$"),
    (Compression, dict(factor=0.5), r"`Compression\.factor` must be a number > 1 .*got 0\.5"),
    (Solver, dict(driver="lanczos"), r"`Solver\.driver` must be one of \('auto', 'exact', 'randomized', 'gram', "
                                     r"'gesvd', 'gesvdj', 'gesvda'\), got 'lanczos'"),
    (Selection, dict(include=3), r"`Selection\.include` must be a glob pattern .*got 3"),
    (Selection, dict(exclude=["ok", 1]), r"`Selection\.exclude` must be a glob pattern .*got \['ok', 1\]"),
    (Selection, dict(skip_first_conv=None), r"`Selection\.skip_first_conv` must be a bool, got None"),
    (Activation, dict(ridge=0), r"`Activation\.ridge` must be a number > 0 .*got 0$"),
    (Activation, dict(batches=0), r"`Activation\.batches` must be an int >= 1, got 0$"),
    (Activation, dict(bn_weighting=1), r"`Activation\.bn_weighting` must be a bool, got 1"),
    (Activation, dict(observe_training="yes"), r"`Activation\.observe_training` must be a bool, got 'yes'"),
]


@pytest.mark.parametrize("part, kwargs, message", INVALID_PARTS,
                         ids=[f"{part.__name__}-" + re.sub(r"\W+", "-", str(kwargs))
                              for part, kwargs, _ in INVALID_PARTS])
def test_invalid_scheme_rule_selection_solver_and_objective_options_name_the_argument_and_the_value(part, kwargs,
                                                                                                   message):
    with pytest.raises(ValueError, match=message):
        part(**kwargs)


@pytest.mark.parametrize("flat", [dict(tile_shape=(4, 4)), dict(energy=0.9), dict(compression=2.0),
                                  dict(hooi_iters=1), dict(include="layer1.*"), dict(svd_driver="gram"),
                                  dict(bn_weighting=True)])
def test_flat_options_are_gone_each_option_has_one_owner(flat):
    """Old flat options (a tile shape on a non-tiled scheme, two rank rules at once, ...) cannot be passed at all."""
    (argument,) = flat
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{argument}'"):
        LowRankOptions("svd", rank=2, **flat)
    with pytest.raises(TypeError, match=rf"unexpected keyword argument '{argument}'"):
        factorize(named_blocks_model(), "svd", rank=2, **flat)


def test_default_rank_rule_is_compression_two_and_groups_are_coerced():
    """Without a rank rule the options compress each layer 2x; mappings become the typed groups."""
    options = LowRankOptions(TiledSVD(tile_shape=(4, 4)), layers={"linear": True, "include": "layer*"},
                             solver={"driver": "gram"}, objective={"ridge": 0.5})
    assert options.rank == Compression(2.0) and LowRankOptions().rank == Compression(2.0)
    assert options.scheme == TiledSVD(tile_shape=(4, 4)) and options.scheme.name == "tiled_svd"
    assert options.layers == Selection(include=("layer*",), linear=True)
    assert options.solver == Solver(driver="gram")
    assert options.objective == Activation(ridge=0.5) and options.weighted
    assert LowRankOptions("tucker2").scheme == Tucker2(hooi_iters=0) and not LowRankOptions().weighted


def test_project_and_factorize_validate_like_low_rank_options():
    model = named_blocks_model()
    with pytest.raises(ValueError, match=r"`rank` must be .*got 0$"):
        project_(model, "svd", rank=0)
    with pytest.raises(ValueError, match=r"`scheme` must be one of .*got 'cp'"):
        factorize(model, "cp", rank=2)


def test_rank_mapping_selects_exactly_the_layers_it_names():
    model = named_blocks_model()
    plans, _ = plan_layers(model, LowRankOptions("svd", rank={"layer1.conv1": 2, "layer2.conv2": 3}))
    assert [(p.name, p.rank) for p in plans] == [("layer1.conv1", 2), ("layer2.conv2", 3)]
    with pytest.raises(ValueError, match=r"not selectable: \['layer9\.conv'\]"):
        plan_layers(model, LowRankOptions("svd", rank={"layer1.conv1": 2, "layer9.conv": 2}))


def test_frozen_ranks_reproduce_a_plan_with_break_even_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                          nn.Conv2d(8, 16, (1, 3), padding=(0, 1)))
    with pytest.warns(UserWarning, match=r"layer '2' stays dense \(break-even"):
        plans, skipped = plan_layers(model, LowRankOptions("svd", rank=0.9))
    assert [p.name for p in plans] == ["1"] and "2" in [s.name for s in skipped]
    again, _ = plan_layers(model, LowRankOptions("svd", rank=frozen_ranks(plans)))
    assert again == plans
    small = factorize(model, "svd", rank=frozen_ranks(plans))
    assert isinstance(small[1], LowRankConv2d) and isinstance(small[2], nn.Conv2d)


def test_rank_above_full_rank_is_clamped_with_a_warning():
    model = conv_model(in_channels=16, out_channels=4, kernel_size=3, padding=1)
    message = r"rank \(2, 9\) of layer 'body' exceeds its full rank \(16, 4\) .*clamped to \(2, 4\)"
    with pytest.warns(UserWarning, match=message):
        (plan,), _ = plan_layers(model, LowRankOptions("tucker2", rank=(2, 9)))
    assert plan.rank == (2, 4)


def test_one_options_object_makes_the_same_request_as_its_five_arguments():
    from lrlightning import LowRankOptions, LowRankProjection, Selection, project_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    options = LowRankOptions("tucker2", 0.5, layers=Selection(exclude=("3",)))
    spelled = factorize(model, "tucker2", 0.5, layers=Selection(exclude=("3",)))
    bundled = factorize(model, options=options)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(spelled(x), bundled(x), rtol=0, atol=0)
    assert LowRankProjection(options=options, every_n_train_steps=3).options == options
    assert LowRankProjection("svd", Compression(2.0), options=options).options == options  # defaults, spelled out
    assert LowRankProjection(options={"scheme": "tucker2", "rank": 0.5}).options == LowRankOptions("tucker2", 0.5)
    copy_a, copy_b = copy.deepcopy(model), copy.deepcopy(model)
    project_(copy_a, options=options), project_(copy_b, "tucker2", 0.5, layers=Selection(exclude=("3",)))
    torch.testing.assert_close(copy_a[2].weight, copy_b[2].weight, rtol=0, atol=0)
    for call in (lambda: factorize(model, "tucker2", options=options),
                 lambda: project_(model, rank=0.5, layers=Selection(), options=options),
                 lambda: LowRankProjection("tucker2", options=options)):
        with pytest.raises(ValueError, match=r"`options` bundles .* together with `(scheme|rank)`"):
            call()
    with pytest.raises(ValueError, match=r"`options` must be a LowRankOptions or a mapping of its fields, got 3"):
        factorize(model, options=3)
