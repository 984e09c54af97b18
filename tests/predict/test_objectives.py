"""Tests of kale_ext.predict.objectives: schedules, and that each objective scores the posterior it claims."""

import pytest
import torch

from kale_ext.embed.zoo import build_model
from kale_ext.predict.losses import alignment_loss, gaussian_kl
from kale_ext.predict.objectives import (
    ELBOObjective,
    PretrainBatch,
    ReferenceObjective,
    TrainingProgress,
    build_objective,
    objective_names,
)

LEADS = ("I", "II", "V1")
T = 32


def _batch(sample=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, T, generator=g)
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[0, 2] = False
    return PretrainBatch(x, mask, LEADS, x, mask, sample=sample)


def test_paper_beta_rises_per_step_within_an_epoch():
    obj = ELBOObjective(beta=0.5, beta_warmup_epochs=2)
    betas = [obj.beta(TrainingProgress(step=s, epoch=0, steps_per_epoch=10)) for s in range(0, 25)]
    assert betas[0] == 0.0 and betas[20] == pytest.approx(0.5) and betas[24] == pytest.approx(0.5)
    # strictly increasing step by step inside the first epoch (not a per-epoch staircase)
    assert all(b2 > b1 for b1, b2 in zip(betas[:10], betas[1:11]))
    assert betas[5] == pytest.approx(0.5 * 5 / 20)


def test_reference_beta_is_a_per_epoch_staircase():
    obj = ReferenceObjective(beta=1.0, beta_warmup_epochs=4)
    within = {obj.beta(TrainingProgress(step=s, epoch=1, steps_per_epoch=10)) for s in range(10, 20)}
    assert within == {0.25}
    assert obj.beta(TrainingProgress(epoch=10)) == 1.0


def test_elbo_kl_and_alignment_use_the_fused_posterior():
    torch.manual_seed(0)
    model = build_model("lsemvae", LEADS, T, 4).eval()
    obj = ELBOObjective(beta=1.0, beta_warmup_epochs=0, gamma=0.3)
    batch = _batch()
    terms = obj(model, batch, TrainingProgress())
    out = model(batch.signals, mask=batch.mask, leads=LEADS, sample=False)
    fused_kl = gaussian_kl(out.fusion.mean, out.fusion.log_var).mean()
    torch.testing.assert_close(terms["kl"], fused_kl)
    align = alignment_loss(out.fusion.expert_mean, out.fusion.mean, out.fusion.expert_mask, 0.3)
    torch.testing.assert_close(terms["align"], align)
    # not the lead-average posterior (what the authors' code uses): the test can tell them apart
    mean, log_var, m = model.encode(batch.signals, leads=LEADS, mask=batch.mask)
    w = m.float().unsqueeze(-1)
    avg_kl = gaussian_kl((mean * w).sum(0) / w.sum(0), (log_var * w).sum(0) / w.sum(0)).mean()
    assert not torch.allclose(terms["kl"], avg_kl)
    torch.testing.assert_close(terms["loss"], terms["recon"] + terms["kl"] + terms["align"] + terms["balance"])
    assert terms["balance"] > 0  # the gate of an untrained model is not balanced: the term is there and acts


def test_reference_kl_is_on_the_lead_average_and_the_registry_names_both():
    torch.manual_seed(0)
    model = build_model("lsemvae_reference", LEADS, T, 4).eval()
    batch = _batch()
    batch.mask[:] = True
    terms = ReferenceObjective(beta=1.0, beta_warmup_epochs=0, gamma=0.0)(model, batch, TrainingProgress())
    mean, log_var, _ = model.encode(batch.signals, leads=LEADS)
    torch.testing.assert_close(terms["kl"], gaussian_kl(mean.mean(0), log_var.mean(0)).mean())
    assert set(objective_names()) >= {"elbo", "reference"}
    assert isinstance(build_objective("elbo", gamma=0.5), ELBOObjective)
    with pytest.raises(ValueError, match="reference"):
        build_objective("nope")


def test_build_objective_hands_each_objective_only_its_own_settings():
    settings = {"beta": 0.5, "gamma": 0.2, "recon_reduction": "mean", "c_max": 10.0, "capacity_gamma": 2.0}
    masked = build_objective("masked_patch", **settings)  # takes none of them
    capacity = build_objective("capacity", **settings)
    elbo = build_objective("elbo", **settings)
    assert type(masked).__name__ == "MaskedPatchObjective"
    assert capacity.c_max == 10.0 and capacity.capacity_gamma == 2.0
    assert elbo.beta_max == 0.5 and elbo.gamma == 0.2 and elbo.recon_reduction == "mean"
