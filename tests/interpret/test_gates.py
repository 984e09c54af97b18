"""Fusion weights per lead and the shared expert, averaged per class and fold."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kale_ext.interpret.gates import (
    SHARED_EXPERT,
    GateWeights,
    compute_gate_weights,
    expert_names_for,
    gate_weight_table,
)

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")


def test_table_averages_and_sums_to_one():
    """Per-(class, fold) mean weight; absent experts count 0; unused experts are dropped; each cell sums to 1."""
    w = np.array(
        [
            [0.5, 0.2, 0.0, 0.4],  # I
            [0.0, 0.0, 0.0, 0.0],  # II: never present
            [0.5, 0.8, 1.0, 0.6],  # shared
        ]
    )
    present = np.array([[True, True, False, True], [False] * 4, [True] * 4])
    gates = GateWeights(w, present, ("I", "II", SHARED_EXPERT), "learned")
    table = gate_weight_table(gates, classes=[0, 0, 1, 1], folds=[0, 0, 0, 0])
    assert "II" not in set(table["expert"])
    cell = table[table["class"] == 1].set_index("expert")
    assert cell.loc["I", "weight"] == pytest.approx(0.2)
    assert cell.loc["I", "n_records"] == 1
    assert cell.loc[SHARED_EXPERT, "weight"] == pytest.approx(0.8)
    np.testing.assert_allclose(table.groupby(["class", "fold"])["weight"].sum().to_numpy(), 1.0)
    assert (table["gate"] == "learned").all()


def test_expert_names():
    """Leads, leads + shared, a joint expert, positional groups."""
    assert expert_names_for(LEADS, 6) == LEADS
    assert expert_names_for(LEADS, 7)[-1] == SHARED_EXPERT
    assert expert_names_for(LEADS, 1) == ("joint",)
    assert expert_names_for(LEADS, 2, group_size=3) == ("group 1 (I+II+III)", "group 2 (aVR+aVL+aVF)")


class _FakeVAE(nn.Module):
    """encode/fuse with weights proportional to the lead's mean amplitude: a fixed, non-learned rule."""

    def __init__(self):
        super().__init__()
        self.lead_names = LEADS
        self.scale = nn.Parameter(torch.ones(()))

    def encode(self, x, leads=None):
        idx = [self.lead_names.index(lead) for lead in leads]
        mean = torch.zeros(len(self.lead_names), x.shape[0], 1)
        mean[idx, :, 0] = x.abs().mean(dim=-1).T
        mask = torch.zeros(len(self.lead_names), x.shape[0], dtype=torch.bool)
        mask[idx] = True
        return mean, torch.zeros_like(mean), mask

    def fuse(self, mean, log_var, mask):
        w = torch.where(mask, mean[..., 0], torch.zeros(()))
        w = w / w.sum(dim=0, keepdim=True)
        return SimpleNamespace(weights=w, expert_mask=mask)


def test_compute_maps_leads_by_name_and_honours_the_data_mask():
    """Channels given in any order land on their named experts; a lead masked in a record gets weight 0 there."""
    x = torch.ones(2, 3, 10)
    x[:, 0] *= 3.0  # channel 0 is aVF
    mask = torch.tensor([[True, True, True], [True, False, True]])
    gates = compute_gate_weights(_FakeVAE(), x, ["aVF", "I", "II"], mask)
    names = list(gates.expert_names)
    assert names == list(LEADS)
    assert gates.kind == "fixed"
    np.testing.assert_allclose(gates.weights[:, 0][[names.index(n) for n in ("aVF", "I", "II")]], [0.6, 0.2, 0.2])
    assert gates.weights[names.index("I"), 1] == 0.0
    assert not gates.expert_mask[names.index("III")].any()
    np.testing.assert_allclose(gates.weights.sum(axis=0), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="not leads of the model"):
        compute_gate_weights(_FakeVAE(), x, ["V1", "I", "II"])


def test_on_the_lsemvae_model():
    """The real HiME model: 6 leads + shared, learned gate; without the gate the weights are reported uniform."""
    lsemvae = pytest.importorskip("kale_ext.embed.zoo")
    torch.manual_seed(0)
    x = torch.randn(5, 3, 64)
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[0, 1] = False
    model = lsemvae.build_model("lsemvae", LEADS, input_dim=64, latent_dim=4)
    gates = compute_gate_weights(model, x, ["I", "II", "aVF"], mask)
    assert gates.kind == "learned"
    assert gates.expert_names == LEADS + (SHARED_EXPERT,)
    np.testing.assert_allclose(gates.weights.sum(axis=0), 1.0, rtol=1e-5)
    assert gates.weights[1, 0] == 0.0 and gates.weights[2].max() == 0.0  # II masked in record 0; III never given
    table = gate_weight_table(gates, classes=[0, 1, 0, 1, 0])
    assert set(table["expert"]) == {"I", "II", "aVF", SHARED_EXPERT}

    plain = lsemvae.build_model("lsemvae", LEADS, input_dim=64, latent_dim=4, no_gate=True)
    uniform = compute_gate_weights(plain, x, ["I", "II", "aVF"], mask)
    assert uniform.kind == "uniform"
    np.testing.assert_allclose(uniform.weights[-1], [1 / 3, 1 / 4, 1 / 4, 1 / 4, 1 / 4], rtol=1e-5)


def test_gate_is_recognised_by_attribute_not_by_class_name():
    """A gating network declares ``is_gate = True`` (or is a fusion's ``gate``); class names play no part."""
    from kale_ext.embed.fusion import HierarchicalModalityExperts
    from kale_ext.interpret.gates import _has_gate

    class Router(nn.Module):  # no "Gate" in the name
        is_gate = True

        def forward(self, mean, log_var, mask):
            return mask.float()

    class GatekeeperNorm(nn.LayerNorm):  # "Gate" in the name, but not a gate
        pass

    assert _has_gate(nn.Sequential(nn.Linear(2, 2), Router()))
    assert not _has_gate(nn.Sequential(GatekeeperNorm(4)))
    assert _has_gate(HierarchicalModalityExperts(3, 2))
    assert not _has_gate(HierarchicalModalityExperts(3, 2, gate=False))

    class Plain(nn.Module):  # no is_gate attribute, but held as HiME's gate
        def forward(self, mean, log_var, mask):
            return mask.float()

    assert _has_gate(HierarchicalModalityExperts(3, 2, gate=Plain()))


def test_a_windowed_model_gets_the_mean_weights_of_every_window_of_a_record():
    """With ``window`` each record is cut into every window (the last flush with the end); weights are averaged."""
    from kale_ext.embed.zoo import build_model

    torch.manual_seed(0)
    model = build_model("lsemvae", LEADS, input_dim=16, latent_dim=4).eval()
    x = torch.randn(3, 6, 40)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 2] = False
    gates = compute_gate_weights(model, x, LEADS, mask, window=16)
    per_window = [compute_gate_weights(model, x[..., s : s + 16].contiguous(), LEADS, mask) for s in (0, 16, 24)]
    np.testing.assert_allclose(gates.weights, np.mean([g.weights for g in per_window], axis=0), atol=1e-6)
    assert np.array_equal(gates.expert_mask, per_window[0].expert_mask)
    np.testing.assert_allclose(gates.weights.sum(0), 1.0, atol=1e-5)
