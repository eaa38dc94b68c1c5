"""Input statistics for ``objective="activation"``: im2col moments as the conv sees its inputs, the BatchNorm each
layer feeds, and passes that leave the model as they found it."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrlightning.activations as activations
from lrlightning.activations import input_statistics

FLOAT32 = dict(rtol=1e-4, atol=1e-4)


def lowered(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(rows, S·kh·kw) im2col rows of ``x`` as ``conv`` reads them (zero padding)."""
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).double()


def test_moments_are_those_of_the_im2col_rows_the_conv_multiplies(monkeypatch):
    monkeypatch.setattr(activations, "ROWS_PER_FEATURE", 10_000)  # every row
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    model = nn.Sequential(conv)
    batches = [torch.randn(4, 3, 9, 8) for _ in range(3)]
    stats = input_statistics(model, ["0"], batches)["0"]
    rows = torch.cat([lowered(conv, x) for x in batches])
    assert stats.rows.item() == rows.shape[0]
    torch.testing.assert_close(stats.moment_sum, rows.T @ rows, **FLOAT32)  # float32 products, float64 sums
    torch.testing.assert_close(stats.row_sum, rows.sum(0), **FLOAT32)
    assert stats.output_scale is None
    torch.testing.assert_close(stats.input_metric, rows.T @ rows / rows.shape[0], **FLOAT32)  # no BatchNorm
    out = torch.cat([conv(x).permute(0, 2, 3, 1).reshape(-1, 5) for x in batches]).double() - conv.bias.double()
    torch.testing.assert_close((conv.weight.double().reshape(5, -1) @ rows.T).T, out, rtol=1e-5, atol=1e-5)


def test_reflect_padding_and_chunked_lowering_give_the_same_moments(monkeypatch):
    monkeypatch.setattr(activations, "ROWS_PER_FEATURE", 10_000)  # every row
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
    x = torch.randn(6, 2, 7, 7)
    rows = lowered(nn.Conv2d(2, 4, 3), F.pad(x, (1, 1, 1, 1), mode="reflect"))
    whole = input_statistics(nn.Sequential(conv), ["0"], [x])["0"]
    monkeypatch.setattr(activations, "CHUNK_ELEMENTS", 1)  # one sample at a time
    chunked = input_statistics(nn.Sequential(conv), ["0"], [x])["0"]
    torch.testing.assert_close(whole.moment_sum, rows.T @ rows, **FLOAT32)
    torch.testing.assert_close(chunked.moment_sum, whole.moment_sum, **FLOAT32)


def test_linear_inputs_and_the_batchnorm_fed_by_a_layer():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6))
    for norm in (model[1], model[5], model[8]):
        norm.weight.data.uniform_(-2, 2)
        norm.running_var.uniform_(0.5, 2)
    x = torch.randn(8, 3, 6, 6)
    stats = input_statistics(model, ["0", "3", "7"], [x])
    expected = model[1].weight.detach().double().abs() / (model[1].running_var.double() + model[1].eps).sqrt()
    torch.testing.assert_close(stats["0"].output_scale, expected)
    assert stats["3"].output_scale is None  # a ReLU stands between the conv and the BatchNorm
    assert stats["7"].output_scale.shape == (6,)
    features = model[:7](x).double()
    torch.testing.assert_close(stats["7"].moment_sum, features.T @ features, rtol=1e-5, atol=1e-6)
    mean = features.mean(0)
    torch.testing.assert_close(stats["7"].input_metric, features.T @ features / 8 - torch.outer(mean, mean),
                               rtol=1e-5, atol=1e-6)


def test_passes_leave_batchnorm_statistics_mode_and_generator_as_they_were():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 4, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    first = input_statistics(model, ["3"], [torch.ones(2, 3, 8, 8)], seed=5)["3"]
    again = input_statistics(model, ["3"], [torch.ones(2, 3, 8, 8)], seed=5)["3"]
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(first.moment_sum, again.moment_sum)  # dropout drew the same masks under the seed
    assert first.moment_sum.abs().sum() > 0


def test_a_layer_the_passes_never_run_is_missing():
    model = nn.ModuleDict({"used": nn.Conv2d(3, 3, 3), "unused": nn.Conv2d(3, 3, 3)})
    stats = input_statistics(model, ["used", "unused"], [torch.randn(1, 3, 5, 5)],
                             forward=lambda m, x: m["used"](x))
    assert list(stats) == ["used"]
    assert not model["used"]._forward_pre_hooks and not model["used"]._forward_hooks


def test_hooks_are_removed_when_a_pass_fails():
    model = nn.Sequential(nn.Conv2d(3, 3, 3))
    with pytest.raises(RuntimeError):
        input_statistics(model, ["0"], [torch.randn(1, 5, 5, 5)])
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks


def test_channel_moments_are_those_of_the_input_pixels(monkeypatch):
    monkeypatch.setattr(activations, "PIXELS_PER_CHANNEL", 10_000)  # every pixel
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(4, 3, 7, 7)
    stats = input_statistics(nn.Sequential(conv), ["0"], [x], channels={"0"})["0"]
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).double()
    assert stats.rows.item() == 4 * 7 * 7
    torch.testing.assert_close(stats.moment_sum, pixels.T @ pixels, **FLOAT32)


def test_each_scheme_gathers_the_statistic_it_weights_by():
    from lrlightning import LowRankOptions, plan_layers
    from lrlightning.projection import gather_statistics

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3), nn.Conv2d(6, 6, 3))
    for scheme, size in (("tucker2", lambda s: s), ("svd", lambda s: 9 * s)):
        options = LowRankOptions(scheme, rank=2)
        plans, _ = plan_layers(model, options)
        stats = gather_statistics(model, plans, options, [torch.randn(2, 3, 9, 9)])
        assert {name: s.moment_sum.shape[-1] for name, s in stats.items()} == {"1": size(4), "2": size(6)}


def test_a_batch_adds_a_bounded_uniform_draw_of_im2col_rows(monkeypatch):
    torch.manual_seed(5)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(16, 2, 12, 12)
    rows = lowered(conv, x)
    monkeypatch.setattr(activations, "ROWS_PER_FEATURE", 1000)
    full = input_statistics(nn.Sequential(conv), ["0"], [x])["0"]
    monkeypatch.setattr(activations, "ROWS_PER_FEATURE", 40)  # 720 of the 2304 rows
    drawn = input_statistics(nn.Sequential(conv), ["0"], [x], seed=1)["0"]
    again = input_statistics(nn.Sequential(conv), ["0"], [x], seed=1)["0"]
    assert (full.rows.item(), drawn.rows.item()) == (rows.shape[0], 40 * 18)
    torch.testing.assert_close(drawn.moment_sum, again.moment_sum)
    relative = (drawn.input_metric - full.input_metric).norm() / full.input_metric.norm()
    assert relative < 0.2  # an unbiased estimate from 40 rows per feature
    monkeypatch.setattr(activations, "PIXELS_PER_CHANNEL", 10_000)
    every = input_statistics(nn.Sequential(conv), ["0"], [x], channels={"0"})["0"]
    monkeypatch.setattr(activations, "PIXELS_PER_CHANNEL", 300)  # 600 of the 2304 pixels
    pixels = input_statistics(nn.Sequential(conv), ["0"], [x], channels={"0"}, seed=2)["0"]
    assert (every.rows.item(), pixels.rows.item()) == (16 * 12 * 12, 600)
    relative = (pixels.input_metric - every.input_metric).norm() / every.input_metric.norm()
    assert 0 < relative < 0.2
    torch.testing.assert_close(pixels.moment_sum, input_statistics(nn.Sequential(conv), ["0"], [x], channels={"0"},
                                                                   seed=2)["0"].moment_sum)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_drawn_rows_are_rows_of_the_full_lowering(monkeypatch, padding_mode):
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1), padding_mode=padding_mode)
    x = torch.randn(5, 3, 11, 9)
    padded = F.pad(x, (1, 1, 2, 2), mode="constant" if padding_mode == "zeros" else padding_mode)
    full = lowered(nn.Conv2d(3, 4, (3, 2), stride=(2, 1), dilation=(2, 1)), padded)
    monkeypatch.setattr(activations, "ROWS_PER_FEATURE", 2)
    (drawn,) = activations.input_rows(conv, x)
    assert drawn.shape == (2 * 18, 18) and full.shape[0] > 36
    distances = torch.cdist(drawn.double(), full)
    assert distances.min(1).values.max() < 1e-6  # each drawn row is a row of the lowering
    again = torch.cdist(next(activations.input_rows(conv, x, generator=torch.Generator().manual_seed(1))).double(),
                        full)
    assert distances.argmin(1).tolist() != again.argmin(1).tolist()  # drawn at random, from the given generator


def test_moments_are_summed_in_full_precision_under_autocast():
    torch.manual_seed(7)
    conv = nn.Conv2d(16, 4, 3, padding=1)
    x = 8 * torch.randn(2, 16, 6, 6)
    exact = input_statistics(nn.Sequential(conv), ["0"], [x], channels={"0"})["0"].moment_sum
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = input_statistics(nn.Sequential(conv), ["0"], [x.bfloat16()], channels={"0"})["0"].moment_sum
    pixels = x.bfloat16().double().permute(0, 2, 3, 1).reshape(-1, 16)
    torch.testing.assert_close(mixed, pixels.T @ pixels, **FLOAT32)  # bf16 inputs, float32 products
    assert torch.isfinite(exact).all()


def test_an_untracked_batchnorm_still_centres_and_scales_by_gamma():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    model[1].weight.data = torch.tensor([1.0, -2.0, 0.5, 3.0])
    stats = input_statistics(model, ["0"], [torch.randn(2, 3, 6, 6)])["0"]
    assert stats.normalized
    torch.testing.assert_close(stats.output_scale, torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64))


def test_each_submodule_keeps_its_own_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    input_statistics(model, ["2"], [torch.randn(2, 3, 8, 8)])
    assert [m.training for m in model] == [True, False, True] and model.training
