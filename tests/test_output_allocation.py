"""Data-aware allocation: under ``objective="activation"`` a ``Budget`` chooses ranks by the layers' output errors on
data (``Scheme.output_rank_errors``), gathered once over the candidate layers."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrlightning import Activation, Budget, LowRankProjection, factorize, project_
from lrlightning.schemes import Weighting, scheme_of

from helpers import NetModule, quiet_trainer


@pytest.mark.parametrize("scheme, n", [("svd", 8 * 9), ("tucker2", 8)])
def test_output_errors_under_an_identity_metric_are_the_weight_errors(scheme, n):
    torch.manual_seed(0)
    weight = torch.randn(12, 8, 3, 3)
    configured = scheme_of(scheme)
    ranks = [4, 8] if scheme == "svd" else [(4, 4), (2, 6)]
    weighting = Weighting(torch.eye(n, dtype=torch.float64).unsqueeze(0), None, 1e-2)
    output = configured.output_rank_errors(weight, ranks, "exact", weighting)
    assert output == pytest.approx(configured.rank_errors(weight, ranks, "exact"), rel=1e-4)


def test_output_errors_follow_the_inputs_and_fall_with_the_rank():
    torch.manual_seed(1)
    weight = torch.randn(12, 8, 3, 3)
    scales = torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1]).repeat_interleave(9)
    metric = torch.diag(scales.double() ** 2).unsqueeze(0)
    svd = scheme_of("svd")
    output = svd.output_rank_errors(weight, [2, 4, 8], "exact", Weighting(metric, None, 1e-2))
    assert output[0] > output[1] > output[2] > 0
    assert output != pytest.approx(svd.rank_errors(weight, [2, 4, 8], "exact"), rel=0.05)


class Skewed(nn.Module):
    """Two convs of equal shape: the first sees one dominant input channel, the second isotropic inputs, so
    their output errors at a rank differ from their weight errors."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.first = nn.Conv2d(8, 8, 3, padding=1)
        self.second = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = self.stem(x)
        gain = torch.ones(8, device=x.device)
        gain[0] = 20.0
        h = self.first(h * gain.view(1, -1, 1, 1))
        return self.second(torch.relu(h))


def batches(count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(count)]


def test_an_activation_budget_allocates_from_output_errors_and_errs_less_where_it_counts():
    torch.manual_seed(2)
    model = Skewed()
    rule = Budget(2.0, objective="max")
    weight_ranks = {s.name: s.rank for s in project_(copied(model), "svd", rule)}
    output = project_(copied(model), "svd", rule, objective="activation", calibration=batches())
    weight = project_(copied(model), "svd", weight_ranks, objective="activation", calibration=batches())
    assert {s.name: s.rank for s in output} != weight_ranks
    assert max(s.output_rel_error for s in output) < max(s.output_rel_error for s in weight)


def copied(model):
    fresh = Skewed()
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_factorize_allocates_an_activation_budget_from_output_errors_and_exports_exactly():
    torch.manual_seed(3)
    model = Skewed().eval()
    calibration = iter(batches())  # one pass over it: the statistics are gathered once
    small = factorize(model, "svd", Budget(2.0), objective="activation", calibration=calibration).eval()
    projected = copied(model)
    project_(projected, "svd", Budget(2.0), objective="activation", calibration=batches())
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(x), projected.eval()(x), rtol=1e-4, atol=1e-5)


class SkewedModule(NetModule):
    """``Skewed`` trained to small outputs (mean square) on batches of images alone, SGD."""

    def __init__(self):
        super().__init__(Skewed(), lr=1e-3)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()


def test_the_callback_allocates_an_activation_budget_from_training_batches(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(32, 3, 8, 8)), batch_size=8)
    callbacks = {objective: LowRankProjection("svd", Budget(2.0), every_n_train_steps=2, objective=objective)
                 for objective in ("weight", Activation(batches=2))}
    for callback in callbacks.values():
        torch.manual_seed(4)
        quiet_trainer(tmp_path, [callback], max_epochs=1).fit(SkewedModule(), data)
    assert (callbacks["weight"].allocation.errors, callbacks["weight"].allocation.objective) == ("weight", "max")
    output = callbacks[Activation(batches=2)].allocation
    assert (output.errors, output.objective) == ("output", "sum") and output.achieved >= 2.0 * 0.95


def test_statistics_missing_a_candidate_layer_are_named():
    from lrlightning import LowRankOptions
    from lrlightning.plan import allocate_plan

    options = LowRankOptions("svd", Budget(2.0), objective="activation")
    with pytest.raises(ValueError, match=r"allocates the budget from output errors, but the input statistics miss "
                                         r"layer 'first'"):
        allocate_plan(Skewed(), options, statistics=lambda candidates: {})
