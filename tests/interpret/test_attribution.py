"""Integrated gradients, the attribution ratio, shares and the tidy per-class per-fold table."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kale_ext.interpret.attribution import (
    attribution_ratio,
    integrated_gradients,
    lead_importance_table,
    lead_shares,
    make_baseline,
    normalised_attribution,
    predict_proba,
    summarise_over_folds,
)


class MaskedLinear(nn.Module):
    """logits = W (masked x flattened) + b: integrated gradients are exact for a linear model."""

    def __init__(self, leads: int, time: int):
        super().__init__()
        self.linear = nn.Linear(leads * time, 3)

    def forward(self, x, mask=None):
        if mask is not None:
            x = torch.where(mask[:, :, None], x, torch.zeros_like(x))
        return self.linear(x.flatten(1))


@pytest.fixture()
def linear_model():
    torch.manual_seed(3)
    return MaskedLinear(4, 16)


def test_completeness_on_a_linear_model(linear_model):
    """Attributions sum to logit(x) - logit(baseline) and equal (x - baseline) * weight of the target row."""
    x = torch.randn(5, 4, 16)
    target = torch.tensor([0, 1, 2, 1, 0])
    result = integrated_gradients(linear_model, x, target=target, baseline="mean", n_steps=8, batch_size=2)
    base = make_baseline(x, "mean")
    with torch.no_grad():
        diff = linear_model(x).gather(1, target[:, None])[:, 0] - linear_model(base).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(result.attributions.sum(dim=(1, 2)), diff, atol=1e-4, rtol=1e-4)
    weight = linear_model.linear.weight.detach().view(3, 4, 16)
    torch.testing.assert_close(result.attributions, (x - base) * weight[target], atol=1e-5, rtol=1e-4)
    assert result.delta.abs().max() < 1e-4
    assert torch.equal(result.target, target)
    torch.testing.assert_close(result.probabilities.sum(dim=1), torch.ones(5))


def test_predicted_target_and_internal_batching_agree(linear_model):
    """target='predicted' is the argmax class; splitting the path into small internal batches changes nothing."""
    x = torch.randn(6, 4, 16)
    a = integrated_gradients(linear_model, x, n_steps=10, batch_size=6)
    b = integrated_gradients(linear_model, x, n_steps=10, batch_size=4, internal_batch_size=7)
    with torch.no_grad():
        assert torch.equal(a.target, linear_model(x).argmax(dim=1))
    torch.testing.assert_close(a.attributions, b.attributions, atol=1e-6, rtol=1e-5)


def test_absent_lead_gets_zero_attribution_and_does_not_matter(linear_model):
    """A masked-out lead has exactly zero attribution, and whatever it holds leaves the other leads unchanged."""
    x = torch.randn(3, 4, 16)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[:, 2] = False
    a = integrated_gradients(linear_model, x, mask, target=1, n_steps=8).attributions
    x2 = x.clone()
    x2[:, 2] = 100.0
    b = integrated_gradients(linear_model, x2, mask, target=1, n_steps=8).attributions
    assert torch.count_nonzero(a[:, 2]) == 0
    torch.testing.assert_close(a, b)


def test_single_logit_models_are_read_as_binary():
    """A (B,) logit output is class-1 logit: its probabilities match the sigmoid."""
    x = torch.randn(4, 2, 8)

    def model(inputs, mask):
        return inputs.sum(dim=(1, 2)) * 0.1

    prob = predict_proba(model, x)
    torch.testing.assert_close(prob[:, 1], torch.sigmoid(x.sum(dim=(1, 2)) * 0.1))
    attr = integrated_gradients(model, x, target=1, n_steps=4).attributions
    torch.testing.assert_close(attr, 0.1 * x)


def test_baselines():
    """zeros, the per-record per-lead temporal mean, a number and a tensor; anything else is refused."""
    x = torch.randn(2, 3, 10)
    assert torch.count_nonzero(make_baseline(x, "zeros")) == 0
    torch.testing.assert_close(make_baseline(x, "mean")[..., 4], x.mean(dim=-1))
    assert torch.all(make_baseline(x, 0.5) == 0.5)
    avg = torch.randn(3, 10)
    torch.testing.assert_close(make_baseline(x, avg)[1], avg)
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline(x, "median")


def test_ratio_record_versus_lead_normalisation():
    """Record-wise: a weak lead scores 0; lead-wise: it scores by its own spread. Absent leads are NaN."""
    attr = np.zeros((1, 3, 10))
    attr[0, 0, :5] = 2.0  # half of lead 0 at the record maximum
    attr[0, 1, :] = -0.2  # lead 1 flat and weak
    attr[0, 2, :] = 5.0  # lead 2 strong but absent
    mask = np.array([[True, True, False]])
    ratio = attribution_ratio(attr, mask, threshold=0.5)
    np.testing.assert_allclose(ratio, [[0.5, 0.0, np.nan]])
    per_lead = attribution_ratio(attr, mask, threshold=0.5, normalise="lead")
    np.testing.assert_allclose(per_lead, [[0.5, 1.0, np.nan]])
    with pytest.raises(ValueError):
        attribution_ratio(attr, mask, threshold=0.0)


def test_smoothing_spreads_a_spike():
    """A single-sample spike clears the threshold on 1 sample raw and on the smoothing window when smoothed."""
    attr = np.zeros((2, 50))
    attr[0, 25] = 1.0
    assert attribution_ratio(attr[None], threshold=0.5)[0, 0] == pytest.approx(1 / 50)
    norm = normalised_attribution(attr, smooth=5)
    assert norm.max() == pytest.approx(1.0)
    assert (norm[0] >= 0.5).sum() == 5


def test_shares_sum_to_one_over_present_leads():
    """Shares of present leads sum to 1; absent leads stay NaN; an all-zero row is NaN."""
    ratio = np.array([[0.2, 0.6, np.nan], [0.0, 0.0, 0.0]])
    shares = lead_shares(ratio)
    np.testing.assert_allclose(shares[0], [0.25, 0.75, np.nan])
    assert np.isnan(shares[1]).all()


def test_lead_importance_table_means_and_shares():
    """Cell ratio = mean over the cell's records; shares sum to 1 per (class, fold); unused leads are dropped."""
    ratio = np.array(
        [
            [0.2, 0.4, np.nan],
            [0.4, 0.0, np.nan],
            [0.1, 0.3, np.nan],
            [0.3, 0.1, np.nan],
        ]
    )
    table = lead_importance_table(ratio, ["I", "II", "V1"], classes=[0, 0, 1, 1], folds=[0, 0, 0, 1])
    assert "V1" not in set(table["lead"])
    cell = table[(table["class"] == 0) & (table["fold"] == 0)].set_index("lead")
    assert cell.loc["I", "ratio"] == pytest.approx(0.3)
    assert cell.loc["II", "ratio"] == pytest.approx(0.2)
    assert cell.loc["I", "share"] == pytest.approx(0.6)
    assert cell.loc["I", "n_records"] == 2
    sums = table.groupby(["class", "fold"])["share"].sum()
    np.testing.assert_allclose(sums.to_numpy(), 1.0)
    pooled = table[(table["class"] == "all") & (table["fold"] == 0)].set_index("lead")
    assert pooled.loc["I", "ratio"] == pytest.approx((0.2 + 0.4 + 0.1) / 3)


def test_summarise_over_folds():
    """Mean and sample std over folds; a single fold gets std 0."""
    table = pd.DataFrame(
        {"lead": ["I", "I", "II"], "fold": [0, 1, 0], "share": [0.2, 0.4, 0.5], "ratio": [1.0, 3.0, 2.0]}
    )
    out = summarise_over_folds(table, ["lead"], ["share", "ratio"]).set_index("lead")
    assert out.loc["I", "share_mean"] == pytest.approx(0.3)
    assert out.loc["I", "ratio_std"] == pytest.approx(np.std([1.0, 3.0], ddof=1))
    assert out.loc["II", "share_std"] == 0.0
    assert out.loc["I", "n_folds"] == 2
