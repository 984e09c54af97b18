"""Share of |attribution| inside wave windows: planted signals, uniform attribution, spans, and IG end to end."""

import numpy as np
import pytest
import torch
from torch import nn

from kale_ext.interpret.attribution import integrated_gradients
from kale_ext.interpret.wave_share import wave_share_table, window_shares


def _windows(n_leads=2, n_samples=200):
    w = np.zeros((1, 2, n_leads, n_samples), dtype=bool)
    w[0, 0, :, 50:70] = True  # wave A: 20 samples
    w[0, 1, :, 120:160] = True  # wave B: 40 samples
    return w


def test_planted_attribution_inside_a_known_window_has_share_above_0_9():
    rng = np.random.default_rng(0)
    attr = rng.normal(0, 0.01, (1, 2, 200))
    attr[:, :, 50:70] += rng.choice([-1.0, 1.0], (1, 2, 20))
    shares = window_shares(attr, _windows())
    assert (shares.attribution[0, :, 0] > 0.9).all()
    assert (shares.attribution[0, :, 1] < 0.1).all()
    np.testing.assert_allclose(shares.time[0, :, 0], 20 / 200)
    np.testing.assert_allclose(shares.time[0, :, 1], 40 / 200)


def test_uniform_attribution_gets_the_time_share():
    attr = np.ones((1, 2, 200))
    shares = window_shares(attr, _windows())
    np.testing.assert_allclose(shares.attribution, shares.time)
    table = wave_share_table(shares, ["I", "II"], ["A", "B"], n_boot=20)
    np.testing.assert_allclose(table["ratio"], 1.0)
    assert set(table["lead"]) == {"I", "II", "all"}


def test_span_excludes_samples_outside_it():
    attr = np.zeros((1, 1, 200))
    attr[0, 0, 55] = 1.0
    attr[0, 0, 190] = 100.0  # outside the span: must not count
    span = np.zeros((1, 1, 200), dtype=bool)
    span[0, 0, 40:180] = True
    shares = window_shares(attr, _windows(1), span)
    assert shares.attribution[0, 0, 0] == pytest.approx(1.0)
    assert shares.time[0, 0, 0] == pytest.approx(20 / 140)
    empty = window_shares(attr, _windows(1), np.zeros_like(span))
    assert np.isnan(empty.attribution).all() and np.isnan(empty.time).all()


def test_unbatched_input_and_shape_errors():
    shares = window_shares(np.ones((2, 200)), _windows()[0])
    assert shares.attribution.shape == (1, 2, 2)
    with pytest.raises(ValueError, match="matching"):
        window_shares(np.ones((1, 2, 100)), _windows())


class _WindowModel(nn.Module):
    """Logit of class 1 = weighted sum of the signal inside samples 50..69 (a model that looks at one wave)."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(2, 200)
        w[:, 50:70] = torch.linspace(0.5, 1.5, 20)
        self.register_buffer("w", w)

    def forward(self, x, mask):
        logit = (x * self.w).sum(dim=(1, 2)) ** 2 / 10
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


def test_integrated_gradients_of_a_window_model_fall_in_its_window():
    x = torch.randn(4, 2, 200, generator=torch.Generator().manual_seed(1))
    att = integrated_gradients(_WindowModel(), x, target=1, n_steps=8)
    windows = np.repeat(_windows(), 4, axis=0)
    shares = window_shares(att.attributions.numpy(), windows)
    assert (shares.attribution[:, :, 0] > 0.9).all()
    table = wave_share_table(shares, ["I", "II"], ["A", "B"], n_boot=50)
    row = table[(table.wave == "A") & (table.lead == "all")].iloc[0]
    assert row.ratio > 5 and row.ratio_lo <= row.ratio <= row.ratio_hi
