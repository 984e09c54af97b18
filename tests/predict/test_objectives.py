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


# ------------------------------------------------------------------ issue 18: every term of the objective tested
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from kale_ext.predict.losses import gate_balance_kl, gaussian_recon_nll, importance_loss  # noqa: E402
from kale_ext.predict.objectives import CapacityObjective, uniform_subsets  # noqa: E402

# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 6: 22.46}


def _chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def _subset_codes(chosen: torch.Tensor) -> torch.Tensor:
    """(E, B) bool -> (B,) integer code of each subset."""
    return (chosen.long() * (2 ** torch.arange(chosen.shape[0])).unsqueeze(1)).sum(0)


@pytest.mark.parametrize("present_leads", [(0, 2), (0, 1, 3), (2,)])
def test_uniform_subsets_are_uniform_at_small_n(present_leads):
    n_draws = 12_000
    present = torch.zeros(4, n_draws, dtype=torch.bool)
    present[list(present_leads)] = True
    chosen = uniform_subsets(present, generator=torch.Generator().manual_seed(0))
    assert not (chosen & ~present).any() and chosen.any(0).all()
    n = len(present_leads)
    counts = torch.bincount(_subset_codes(chosen), minlength=16).float()
    counts = counts[counts > 0]
    assert len(counts) == 2**n - 1  # every non-empty subset occurs
    if n > 1:
        assert _chi_square(counts) < CHI2_999[2**n - 2]


class _RecordingDecoder(torch.nn.Module):
    """decode(z) records z and returns ``value`` (B, L, T)."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.z = None

    def decode(self, z):
        self.z = z
        return self.value[: z.shape[0]]


def _one_hot_experts(present: torch.Tensor, latent: int):
    """Experts k with mean 100 e_k and tiny variance: a subset's product has mean ~ 100 x its indicator / size."""
    num, batch = present.shape
    mean = (100.0 * torch.eye(num, latent)).unsqueeze(1).expand(num, batch, latent).clone()
    log_var = torch.full((num, batch, latent), -30.0)
    return SimpleNamespace(expert_mean=mean, expert_log_var=log_var, expert_mask=present)


def test_subset_term_of_the_objective_draws_uniformly_at_n_2_and_3():
    torch.manual_seed(0)
    batch_size, leads = 8_000, 3
    present = torch.ones(leads, batch_size, dtype=torch.bool)
    present[2, batch_size // 2 :] = False  # the second half has 2 present leads
    target = torch.zeros(batch_size, leads, T)
    model = _RecordingDecoder(target.clone())
    batch = PretrainBatch(target, present.t(), LEADS, target, present.t(), sample=True)
    obj = ELBOObjective(subset_terms="subset", sigma=1.0)
    obj._subset_term(model, _one_hot_experts(present, leads), batch, 0.0)
    chosen = (model.z > 1.0).t()  # (leads, B): which experts the decoded z came from
    assert torch.equal(chosen & present, chosen) and chosen.any(0).all()
    codes = _subset_codes(chosen)
    for half, n in ((slice(0, batch_size // 2), 3), (slice(batch_size // 2, None), 2)):
        counts = torch.bincount(codes[half], minlength=8).float()
        counts = counts[counts > 0]
        assert len(counts) == 2**n - 1
        assert _chi_square(counts) < CHI2_999[2**n - 2], counts


def test_sub_elbo_terms_are_scaled_as_the_elbos_they_estimate():
    torch.manual_seed(0)
    batch_size, leads, sigma = 6, 3, 0.5
    present = torch.ones(leads, batch_size, dtype=torch.bool)
    present[1, :3] = False  # 2 present leads in the first half, 3 in the second
    target = torch.randn(batch_size, leads, T)
    model = _RecordingDecoder(target.clone())  # perfect reconstruction: the NLL is the constant per lead
    per_lead = T * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
    mean = torch.randn(1, batch_size, 4).expand(leads, -1, -1).clone()  # every expert the same posterior
    fusion = SimpleNamespace(expert_mean=mean, expert_log_var=torch.zeros(leads, batch_size, 4), expert_mask=present)
    batch = PretrainBatch(target, present.t(), LEADS, target, present.t(), sample=True)
    n = present.sum(0).float()
    uni = ELBOObjective(subset_terms="unimodal", sigma=sigma)._subset_term(model, fusion, batch, math.log(sigma))
    # MVAE: sum over the n present leads of [NLL of lead l + KL(q_l p)], q_l p = N(mean / 2, 1 / 2)
    kl_single = gaussian_kl(mean[0] / 2, torch.full_like(mean[0], math.log(0.5)))
    torch.testing.assert_close(uni, (n * (per_lead + kl_single)).mean())
    # MoPoE: the drawn subset's product reconstructs every present lead, plus that product's KL. With experts of
    # mean 100 e_k and precision e^30, z names the subset and the product is N(100 e_s e^30 / P, 1 / P),
    # P = |s| e^30 + 1.
    fusion = _one_hot_experts(present, 4)
    sub = ELBOObjective(subset_terms="subset", sigma=sigma)._subset_term(model, fusion, batch, math.log(sigma))
    chosen = (model.z > 1.0).float()  # (B, 4), members of the drawn subset
    precision = chosen.sum(1, keepdim=True) * math.exp(30.0) + 1.0
    kl_sub = gaussian_kl(100.0 * chosen * math.exp(30.0) / precision, -torch.log(precision).expand(-1, 4))
    torch.testing.assert_close(sub, (n * per_lead + kl_sub).mean())


def test_balance_in_the_objective_output_is_coefficient_times_t_over_two_sigma_squared():
    torch.manual_seed(0)
    model = build_model("lsemvae", LEADS, T, 4).eval()
    batch = _batch()
    sigma = 0.3
    obj = ELBOObjective(
        beta=1.0, beta_warmup_epochs=0, gamma=0.0, sigma=sigma, gate_importance=0.1, gate_balance_kl=0.3
    )
    terms = obj(model, batch, TrainingProgress())
    fusion = model(batch.signals, mask=batch.mask, leads=LEADS, sample=False).fusion
    w, m = fusion.weights, fusion.expert_mask
    scale = T / (2 * sigma**2)
    expected = scale * (0.1 * importance_loss(w, m) + 0.3 * gate_balance_kl(w, m))
    torch.testing.assert_close(terms["balance"], expected)
    torch.testing.assert_close(terms["loss"], terms["recon"] + terms["kl"] + terms["align"] + expected)
    mean_scale = ELBOObjective(recon_reduction="mean", gamma=0.0, sigma=sigma, gate_importance=0.1, gate_balance_kl=0.0)
    torch.testing.assert_close(mean_scale(model, batch, TrainingProgress())["balance"], 0.1 * importance_loss(w, m))


class _ShiftedFusion(torch.nn.Module):
    """The model's fusion with the fused mean moved by +3 and variance x 1/4: far from every listed expert."""

    def __init__(self, fusion):
        super().__init__()
        self.inner = fusion

    def forward(self, mean, log_var, mask=None, generator=None):
        out = self.inner(mean, log_var, mask)
        return out._replace(mean=out.mean + 3.0, log_var=out.log_var - math.log(4.0))


def test_z_is_drawn_from_the_gaussian_whose_kl_is_scored():
    torch.manual_seed(0)
    model = build_model("lsemvae", LEADS, T, 4).eval()
    model.fusion = _ShiftedFusion(model.fusion)  # a z drawn around any other Gaussian of the output stands out
    x = torch.randn(1, 3, T).expand(3000, -1, -1).contiguous()  # one record: every row draws its own z
    mask = torch.ones(3000, 3, dtype=torch.bool)
    batch = PretrainBatch(x, mask, LEADS, x, mask, sample=True)
    obj = ELBOObjective(beta=1.0, beta_warmup_epochs=0, gamma=0.0, gate_importance=0.0, gate_balance_kl=0.0)
    torch.manual_seed(5)
    terms = obj(model, batch, TrainingProgress())
    torch.manual_seed(5)
    out = model(x, mask=mask, leads=LEADS, sample=True)
    # the objective scored the decode of this z ...
    nll = gaussian_recon_nll(model.decode(out.z), x, mask, math.log(0.3)).mean()
    torch.testing.assert_close(terms["recon"], nll, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms["kl"], gaussian_kl(out.fusion.mean, out.fusion.log_var).mean())
    # ... and this z is a draw from the fused posterior whose KL it scored: standardised, it is N(0, 1)
    eps = (out.z - out.fusion.mean) / torch.exp(0.5 * out.fusion.log_var)
    assert eps.mean(0).abs().max() < 0.08
    assert (eps.std(0) - 1).abs().max() < 0.06


def test_neg_elbo_and_poe_elbo_are_reported_in_nats_whatever_the_scale():
    torch.manual_seed(0)
    batch = _batch()
    model = build_model("lsemvae", LEADS, T, 4).eval()
    obj = ELBOObjective(beta=0.3, beta_warmup_epochs=0, recon_reduction="mean", sigma=0.5)
    terms = obj(model, batch, TrainingProgress())
    out = model(batch.signals, mask=batch.mask, leads=LEADS, sample=False)
    nll = gaussian_recon_nll(out.recon, batch.target, batch.target_mask, math.log(0.5)).mean()
    torch.testing.assert_close(terms["neg_elbo"], nll + gaussian_kl(out.fusion.mean, out.fusion.log_var).mean())
    # the PoE expert alone: the last expert of HiME (the product of the present leads with the prior)
    poe_mean, poe_log_var = out.fusion.expert_mean[-1], out.fusion.expert_log_var[-1]
    poe_nll = gaussian_recon_nll(model.decode(poe_mean), batch.target, batch.target_mask, math.log(0.5)).mean()
    expected = poe_nll + gaussian_kl(poe_mean, poe_log_var).mean()
    torch.testing.assert_close(terms["neg_elbo_poe"], expected, rtol=1e-4, atol=1e-3)
    assert not terms["neg_elbo_poe"].requires_grad
    # a PoE model: the two are the same posterior
    mvae = build_model("mvae", LEADS, T, 4).eval()
    same = ELBOObjective()(mvae, batch, TrainingProgress())
    torch.testing.assert_close(same["neg_elbo"], same["neg_elbo_poe"], rtol=1e-5, atol=1e-3)
    assert "neg_elbo_poe" not in ELBOObjective(report_poe=False)(model, batch, TrainingProgress())


def test_learned_sigma_is_bounded_per_lead_and_the_elbo_is_at_it():
    torch.manual_seed(0)
    batch = _batch()
    model = build_model("lsemvae", LEADS, T, 4).eval()
    obj = ELBOObjective(learn_sigma=True, num_leads=3, sigma=0.3, sigma_min=0.05, sigma_max=1.0)
    assert [p.shape for p in obj.parameters()] == [torch.Size([3])]
    torch.testing.assert_close(obj.lead_log_sigma(), torch.full((3,), math.log(0.3)))
    with torch.no_grad():
        obj.sigma_raw.copy_(torch.tensor([-100.0, 0.0, 100.0]))
    sigma = obj.lead_log_sigma().exp()
    torch.testing.assert_close(sigma, torch.tensor([0.05, 0.525, 1.0]))
    terms = obj(model, batch, TrainingProgress())
    out = model(batch.signals, mask=batch.mask, leads=LEADS, sample=False)
    nll = gaussian_recon_nll(out.recon, batch.target, batch.target_mask, sigma.log()).mean()
    torch.testing.assert_close(terms["recon"], nll)
    torch.testing.assert_close(terms["sigma_mean"], sigma.mean())
    terms["loss"].backward()
    assert obj.sigma_raw.grad is not None and obj.sigma_raw.grad[1] != 0
    with pytest.raises(ValueError, match="num_leads"):
        ELBOObjective(learn_sigma=True)
    with pytest.raises(ValueError, match="SIGMA_MAX"):
        ELBOObjective(learn_sigma=True, num_leads=3, sigma=2.0)


def test_capacity_objective_uses_the_configured_sigma():
    torch.manual_seed(0)
    batch = _batch()
    model = build_model("betavae", LEADS, T, 4).eval()
    obj = build_objective("capacity", recon_reduction="gaussian", sigma=0.3, c_max=5.0)
    terms = obj(model, batch, TrainingProgress())
    out = model(batch.signals, mask=batch.mask, leads=LEADS, sample=False)
    nll = gaussian_recon_nll(out.recon, batch.target, batch.target_mask, math.log(0.3)).mean()
    torch.testing.assert_close(terms["recon"], nll)
    assert isinstance(obj, CapacityObjective)
