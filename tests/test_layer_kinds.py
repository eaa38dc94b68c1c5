"""Every conv kind users deploy: pointwise, grouped and depthwise Conv2d, Conv1d and Conv3d are selected where
their factorized form can be smaller, projected exactly (the factorized model computes what the projected dense
model computes), under both objectives, and counted in parameters and MACs."""
import math

import pytest
import torch
from torch import nn

from lrlightning import (Activation, Budget, Compression, Energy, LowRankOptions, Selection, TiledSVD, Tucker2,
                         count_macs, count_params, factorize, load_factorized, plan_layers, project_, save_factorized)
from lrlightning.layers import LowRankConv2d
from lrlightning.plan import conv_kind, layer_scheme
from lrlightning.schemes import GroupedScheme, LoweredSVD, SpatialSVD

from helpers import MIXED_MODELS, mixed1d, mixed2d, named


def seeded(seed):
    torch.manual_seed(seed)


def relative_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


SCHEMES = {"svd": "svd", "tucker2": Tucker2(), "tucker2-hooi": Tucker2(hooi_iters=2), "spatial_svd": "spatial_svd",
           "tiled_svd": TiledSVD((8, 8))}


def test_every_conv_kind_is_named():
    model = mixed2d()
    kinds = {name: conv_kind(model.get_submodule(name)) for name in
             ("stem", "depthwise", "grouped", "pointwise", "multiplier")}
    assert kinds == {"stem": "dense conv2d", "depthwise": "depthwise conv2d", "grouped": "grouped conv2d",
                     "pointwise": "pointwise conv2d", "multiplier": "depthwise conv2d"}
    assert conv_kind(nn.Conv1d(4, 4, 1)) == "pointwise conv1d" and conv_kind(nn.Conv3d(4, 8, 3, groups=2)) == \
        "grouped conv3d" and conv_kind(nn.Linear(3, 4)) == "linear"


def test_pointwise_grouped_and_depthwise_convs_are_selected_with_their_schemes():
    plans, skipped = plan_layers(mixed2d(), LowRankOptions("tucker2", rank=0.5), warn=False)
    by_name = {p.name: p for p in plans}
    assert set(by_name) == {"depthwise", "grouped", "pointwise", "full", "multiplier"}
    assert [s.name for s in skipped] == ["stem"]
    options = LowRankOptions("tucker2", rank=0.5)
    assert type(layer_scheme(by_name["pointwise"], options)) is LoweredSVD  # one matrix problem, whatever the scheme
    assert by_name["pointwise"].scheme == "svd" and by_name["full"].scheme == "tucker2"
    depthwise = layer_scheme(by_name["depthwise"], options)
    assert isinstance(depthwise, GroupedScheme) and type(depthwise.inner) is SpatialSVD and depthwise.groups == 16
    grouped = layer_scheme(by_name["grouped"], options)
    assert isinstance(grouped, GroupedScheme) and type(grouped.inner) is Tucker2 and by_name["grouped"].groups == 4
    assert by_name["grouped"].rank == (2, 4)  # half of each group's (S/g, T/g) = (4, 8)


@pytest.mark.parametrize("dims", sorted(MIXED_MODELS))
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_the_factorized_model_computes_what_the_projected_model_computes(dims, scheme):
    seeded(0)
    build, shape = MIXED_MODELS[dims]
    model = build().eval()
    options = dict(scheme=SCHEMES[scheme], rank=0.5)
    plans, skipped = plan_layers(model, LowRankOptions(**options), warn=False)
    project_(model, **options)
    factorized = factorize(model, **options).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert relative_diff(factorized(x), model(x)) <= 1e-4
    replaced = [name for name, m in factorized.named_children() if isinstance(m, LowRankConv2d)
                or type(m).__name__ == "TiledSVDConv2d"]
    assert replaced == [p.name for p in plans]
    if dims != "2d" and scheme in ("spatial_svd", "tiled_svd"):  # 2-D only: the pointwise conv (svd) alone
        assert [p.name for p in plans] == ["pointwise"]
        assert any("factorizes Conv2d only" in s.reason for s in skipped)
    for plan in plans:
        module = factorized.get_submodule(plan.name)
        assert sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight") or "first" in n
                   or "second" in n) == plan.params_factorized


@pytest.mark.parametrize("dims", sorted(MIXED_MODELS))
def test_grouped_layers_are_exported_as_grouped_convs(dims):
    seeded(1)
    build, shape = MIXED_MODELS[dims]
    model = build()
    factorized = factorize(model, "svd", rank=0.5)
    chain = factorized.grouped
    dense = model.grouped
    assert [type(part) for part in chain] == [type(dense)] * 2
    assert [part.groups for part in chain] == [dense.groups] * 2
    assert chain[0].kernel_size == dense.kernel_size and chain[1].kernel_size == (1,) * len(dense.kernel_size)
    assert chain[0].stride == dense.stride and chain[0].padding == dense.padding


def test_depthwise_convs_are_separated_spatially_per_channel():
    seeded(2)
    model = mixed2d()
    factorized = factorize(model, "svd", rank=1)
    vertical, horizontal = factorized.depthwise
    assert (vertical.kernel_size, horizontal.kernel_size) == ((5, 1), (1, 5))
    assert vertical.groups == horizontal.groups == 16 and vertical.out_channels == 16
    # rank 1 per channel: 16·(5 + 5) weights against 16·25
    assert sum(p.numel() for n, p in factorized.depthwise.named_parameters() if n.endswith("weight")) == 160


def test_a_grouped_projection_is_each_groups_projection():
    """The projection of a grouped conv at rank r is the projection of each group's dense kernel at r."""
    seeded(3)
    conv = nn.Conv2d(12, 18, 3, groups=3)
    model = named(("stem", nn.Conv2d(1, 12, 1)), ("grouped", conv))
    groups = [w.clone() for w in conv.weight.detach().chunk(3)]
    project_(model, "svd", rank=2)
    for group, projected in zip(groups, conv.weight.detach().chunk(3)):
        u, s, vh = torch.linalg.svd(group.reshape(6, -1).double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(projected.reshape(6, -1).double(), best, atol=1e-5)
        assert torch.linalg.matrix_rank(projected.reshape(6, -1)) == 2


def test_projection_is_idempotent_on_every_kind():
    seeded(4)
    for build, _ in MIXED_MODELS.values():
        model = build()
        project_(model, "tucker2", rank=0.5)
        before = [p.detach().clone() for p in model.parameters()]
        project_(model, "tucker2", rank=0.5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, model.parameters()))


def test_layers_that_cannot_shrink_stay_dense_with_the_reason():
    model = named(("stem", nn.Conv2d(3, 8, 3)), ("scale", nn.Conv2d(8, 8, 1, groups=8)),
                  ("depthwise1d", nn.Conv2d(8, 8, (1, 3), groups=8)), ("full", nn.Conv2d(8, 16, 3)))
    seq = named(("stem", nn.Conv1d(3, 8, 3)), ("depthwise", nn.Conv1d(8, 8, 5, groups=8)),
                ("full", nn.Conv1d(8, 16, 3)))
    _, skipped = plan_layers(model, LowRankOptions("svd", rank=1), warn=False)
    reasons = {s.name: s.reason for s in skipped}
    assert "no rank makes it smaller" in reasons["scale"] and reasons["scale"].startswith("depthwise conv2d")
    assert "no rank makes it smaller" in reasons["depthwise1d"]
    _, skipped = plan_layers(seq, LowRankOptions("svd", rank=1), warn=False)
    assert {s.name for s in skipped} == {"stem", "depthwise"}


def test_tiled_svd_leaves_grouped_convs_dense_and_says_why():
    _, skipped = plan_layers(mixed2d(), LowRankOptions(TiledSVD((8, 8)), rank=2), warn=False)
    reasons = {s.name: s.reason for s in skipped}
    assert "does not factorize grouped convs (groups=4)" in reasons["grouped"]
    assert "depthwise" not in reasons  # depthwise convs take spatial_svd


@pytest.mark.parametrize("dims, scheme", [(dims, scheme) for dims in sorted(MIXED_MODELS) for scheme in
                                           ("svd", "tucker2", "spatial_svd") if dims == "2d" or scheme != "spatial_svd"])
def test_the_activation_objective_on_every_kind_lowers_the_output_error(dims, scheme):
    """spatial_svd factorizes Conv2d only, so it is run on the 2-D net alone."""
    seeded(5)
    build, shape = MIXED_MODELS[dims]
    batches = [torch.randn(16, *shape) * torch.linspace(0.1, 3, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
               for _ in range(3)]
    weight_model, activation_model = build(), build()
    activation_model.load_state_dict(weight_model.state_dict())
    weight_stats = project_(weight_model, scheme, rank=0.25, calibration=batches)
    activation_stats = project_(activation_model, scheme, rank=0.25, objective=Activation(batches=3),
                                calibration=batches)
    assert [s.name for s in weight_stats] == [s.name for s in activation_stats]
    weight_error = sum(s.output_rel_error for s in weight_stats)
    activation_error = sum(s.output_rel_error for s in activation_stats)
    assert all(s.output_rel_error is not None and s.output_rel_error >= 0 for s in activation_stats)
    assert activation_error < weight_error
    factorized = factorize(activation_model, scheme, rank=0.25)
    x = batches[0][:4]
    with torch.no_grad():
        assert relative_diff(factorized.eval()(x), activation_model.eval()(x)) <= 1e-4


def test_rank_rules_count_grouped_layers_per_group():
    seeded(6)
    model = mixed2d()
    plans, _ = plan_layers(model, LowRankOptions("svd", rank=Compression(2.0)), warn=False)
    grouped = next(p for p in plans if p.name == "grouped")
    assert grouped.params_dense >= 2 * grouped.params_factorized
    assert grouped.params_factorized == 4 * grouped.rank * (8 + 4 * 9)  # 4 groups of (8, 4·3·3)
    with torch.no_grad():  # group j has rank j + 1: the layer needs the largest, 4
        for index, group in enumerate(model.grouped.weight.chunk(4)):
            group.copy_((torch.randn(8, index + 1) @ torch.randn(index + 1, 36)).reshape(8, 4, 3, 3))
    plans, _ = plan_layers(model, LowRankOptions("svd", rank=Energy(0.999)), warn=False)
    assert {p.name: p.rank for p in plans}["grouped"] == 4


@pytest.mark.parametrize("metric", ["params", "macs"])
@pytest.mark.parametrize("dims", sorted(MIXED_MODELS))
def test_budgets_are_met_on_every_kind(metric, dims):
    seeded(7)
    build, shape = MIXED_MODELS[dims]
    model = build()
    rule = Budget(1.5, metric=metric, input_shape=shape if metric == "macs" else None)
    factorized = factorize(model, "svd", rank=rule)
    if metric == "params":
        plans, _ = plan_layers(model, LowRankOptions("svd", rank=rule), warn=False)
        dense = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)))
        reached = dense / (dense - sum(p.params_dense - p.params_factorized for p in plans))
    else:
        reached = count_macs(model, shape) / count_macs(factorized, shape)
    assert 1.5 <= reached <= 1.5 * 1.25


@pytest.mark.parametrize("dims", sorted(MIXED_MODELS))
def test_macs_are_counted_on_every_kind(dims):
    build, shape = MIXED_MODELS[dims]
    model = build()
    per_layer = count_macs(model, shape, per_layer=True)
    x = torch.zeros(1, *shape)
    for name, module in model.named_children():
        out = model[: list(dict(model.named_children())).index(name) + 1](x)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            expected = out[0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
            assert per_layer[name] == expected


@pytest.mark.parametrize("dims", sorted(MIXED_MODELS))
def test_save_and_load_rebuild_every_kind(tmp_path, dims):
    seeded(8)
    build, shape = MIXED_MODELS[dims]
    model = build().eval()
    factorized = factorize(model, "tucker2", rank=0.5).eval()
    save_factorized(factorized, tmp_path / "model.pt")
    loaded = load_factorized(tmp_path / "model.pt", build()).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), factorized(x))
    assert count_params(loaded) == count_params(factorized) < count_params(model)


def test_the_input_shape_of_a_budget_must_fit_the_models_kind():
    model = mixed1d()
    with pytest.raises(ValueError, match=r"`Budget.input_shape`=\(3, 12, 12\) does not fit"):
        factorize(model, "svd", rank=Budget(2.0, metric="macs", input_shape=(3, 12, 12)))
    factorize(model, "svd", rank=Budget(2.0, metric="macs", input_shape=(2, 64)))


def test_linear_selection_is_unchanged_for_convnext_style_blocks():
    """ConvNeXt-style blocks: a depthwise 7×7 conv and pointwise layers that are ``nn.Linear``."""
    seeded(9)
    model = named(("stem", nn.Conv2d(3, 16, 4, stride=4)), ("dw", nn.Conv2d(16, 16, 7, padding=3, groups=16)),
                  ("flat", nn.Flatten(2)), ("swap", _Transpose()), ("up", nn.Linear(16, 64)),
                  ("down", nn.Linear(64, 16)))
    plans, _ = plan_layers(model, LowRankOptions("svd", rank=0.25), warn=False)
    assert [p.name for p in plans] == ["dw"]
    plans, _ = plan_layers(model, LowRankOptions("svd", rank=0.25, layers=Selection(linear=True)), warn=False)
    assert [p.name for p in plans] == ["dw", "up", "down"]


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)
