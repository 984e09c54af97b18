"""Objectives: KL, alignment, multimodal ELBO with absent leads, annealing, focal loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from kale_ext.predict.losses import (
    ELBOTerms,
    FocalLoss,
    alignment_loss,
    expert_kl,
    gate_balance_kl,
    gate_entropy_floor_loss,
    gaussian_kl,
    gaussian_recon_nll,
    importance_loss,
    linear_annealing,
    load_loss,
    multimodal_elbo,
    unimodal_kl,
)


def test_gaussian_kl_matches_torch_distributions():
    mean = torch.randn(5, 3)
    log_var = torch.randn(5, 3)
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gaussian_kl(mean, log_var), expected)
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0
    assert gaussian_kl(mean.bfloat16(), log_var.bfloat16()).dtype == torch.float32


def test_alignment_loss_masked_mean():
    k, b, d = 4, 3, 2
    expert_mean = torch.randn(k, b, d)
    fused = torch.randn(b, d)
    mask = torch.ones(k, b, dtype=torch.bool)
    mask[1, 0] = False
    mask[:, 2] = False  # no expert: excluded from the batch average
    expert_mean[1, 0] = float("nan")  # absent placeholder must not leak
    dist = (expert_mean - fused).square().sum(-1)
    per0 = dist[[0, 2, 3], 0].mean()
    per1 = dist[:, 1].mean()
    got = alignment_loss(expert_mean, fused, mask, gamma=0.5)
    torch.testing.assert_close(got, 0.5 * (per0 + per1) / 2)
    clean = expert_mean.clone()
    clean[1, 0] = 0
    torch.testing.assert_close(alignment_loss(clean, fused, gamma=2.0), 2.0 * (clean - fused).square().sum(-1).mean())
    assert alignment_loss(expert_mean, fused, torch.zeros(k, b, dtype=torch.bool)) == 0


def test_multimodal_elbo_mean_ignores_absent_leads():
    b, leads, t, d = 3, 4, 8, 2
    recon, target = torch.randn(b, leads, t), torch.randn(b, leads, t)
    mean, log_var = torch.randn(b, d), torch.randn(b, d)
    mask = torch.ones(b, leads, dtype=torch.bool)
    mask[0, 1] = False
    mask[:, 3] = False
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    dirty = target.clone()
    dirty[~mask] = float("nan")
    out = multimodal_elbo(recon, dirty, mean, log_var, beta=0.3, lead_weights=weights, mask=mask)
    assert isinstance(out, ELBOTerms)
    mse = (recon - target).square().mean(-1)
    expected_recon = ((mse * weights) * mask).sum(1).mean()
    torch.testing.assert_close(out.recon, expected_recon)
    kl = gaussian_kl(mean, log_var).mean()
    torch.testing.assert_close(out.kl, kl)
    torch.testing.assert_close(out.total, expected_recon + 0.3 * kl)
    assert out.recon_per_lead.shape == (leads,)
    torch.testing.assert_close(out.recon_per_lead[1], mse[1:, 1].mean())
    torch.testing.assert_close(out.recon_per_lead[0], mse[:, 0].mean())
    assert out.recon_per_lead[3] == 0
    # changing an absent lead's reconstruction changes nothing
    recon2 = recon.clone()
    recon2[0, 1] += 100
    torch.testing.assert_close(multimodal_elbo(recon2, target, mean, log_var, 0.3, weights, mask).total, out.total)


def test_multimodal_elbo_reference_scale():
    b, leads, t, d = 2, 3, 5, 2
    recon, target = torch.randn(b, leads, t), torch.randn(b, leads, t)
    mean, log_var = torch.randn(b, d), torch.randn(b, d)
    out = multimodal_elbo(recon, target, mean, log_var, beta=1.0, recon_reduction="reference")
    torch.testing.assert_close(out.recon, (recon - target).square().sum() * 1e-3 / b)
    with pytest.raises(ValueError):
        multimodal_elbo(recon, target, mean, log_var, beta=1.0, recon_reduction="sum")


def test_linear_annealing():
    assert linear_annealing(0, 10) == 0.0
    assert linear_annealing(5, 10) == 0.5
    assert linear_annealing(25, 10) == 1.0
    assert linear_annealing(-3, 10) == 0.0
    assert linear_annealing(3, 0) == 1.0


def test_focal_loss_reduces_to_cross_entropy():
    logits = torch.randn(16, 3)
    target = torch.randint(0, 3, (16,))
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target))
    binary = torch.randn(16)
    y = torch.randint(0, 2, (16,))
    bce = F.binary_cross_entropy_with_logits(binary, y.float())
    torch.testing.assert_close(FocalLoss(gamma=0.0)(binary, y), bce)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(binary[:, None], y), bce)
    two = torch.randn(16, 2)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(two, y), F.cross_entropy(two, y))


def test_focal_loss_focusing_and_alpha():
    logits = torch.tensor([3.0, -3.0, 0.2])
    y = torch.tensor([1, 1, 0])
    gamma = 2.0
    p = torch.sigmoid(logits)
    pt = torch.where(y == 1, p, 1 - p)
    expected = -((1 - pt) ** gamma) * pt.log()
    torch.testing.assert_close(FocalLoss(gamma=gamma, reduction="none")(logits, y), expected)
    alpha_t = torch.where(y == 1, 0.25, 0.75)
    torch.testing.assert_close(
        FocalLoss(alpha=0.25, gamma=gamma, reduction="sum")(logits, y), (alpha_t * expected).sum()
    )
    # per-class alpha on two logits equals the scalar form
    two = torch.stack([torch.zeros(3), logits], 1)
    torch.testing.assert_close(
        FocalLoss(alpha=[0.75, 0.25], gamma=gamma)(two, y), FocalLoss(alpha=0.25, gamma=gamma)(logits, y)
    )
    # confident correct predictions are down-weighted relative to cross-entropy
    assert FocalLoss(gamma=2.0, reduction="none")(logits, y)[0] < F.softplus(-logits[0]) * math.exp(-3)
    with pytest.raises(ValueError):
        FocalLoss(alpha=0.25)(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError):
        FocalLoss(alpha=[0.2, 0.3])(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))


def test_focal_loss_finite_gradients_for_extreme_logits():
    logits = torch.tensor([80.0, -80.0, 0.0], requires_grad=True)
    y = torch.tensor([0, 1, 1])
    loss = FocalLoss(alpha=0.5, gamma=2.0)(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- Gaussian likelihood, unimodal KL


def test_gaussian_recon_nll_is_the_normal_log_likelihood():
    b, leads, t = 3, 4, 7
    recon, target = torch.randn(b, leads, t), torch.randn(b, leads, t)
    mask = torch.ones(b, leads, dtype=torch.bool)
    mask[1, 2] = False
    log_sigma = torch.tensor([0.0, -1.0, 0.5, -2.0])
    dirty = target.clone()
    dirty[1, 2] = float("nan")
    got = gaussian_recon_nll(recon, dirty, mask, log_sigma)
    dist = torch.distributions.Normal(recon, log_sigma.exp()[None, :, None])
    per_lead = -dist.log_prob(target).sum(-1) * mask
    torch.testing.assert_close(got, per_lead.sum(1))
    torch.testing.assert_close(gaussian_recon_nll(recon, dirty, mask, log_sigma, per_lead=True), per_lead)
    # a float sigma applies to all leads
    scalar = gaussian_recon_nll(recon, target, log_sigma=math.log(0.3))
    torch.testing.assert_close(scalar, -torch.distributions.Normal(recon, 0.3).log_prob(target).sum((1, 2)))
    # a learned sigma: the NLL is minimal at sigma = the RMS residual of the lead
    ls = torch.zeros(leads, requires_grad=True)
    opt = torch.optim.Adam([ls], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        gaussian_recon_nll(recon, target, log_sigma=ls).mean().backward()
        opt.step()
    rms = (recon - target).square().mean((0, 2)).sqrt()
    torch.testing.assert_close(ls.detach().exp(), rms, rtol=2e-2, atol=0)
    with pytest.raises(ValueError, match="log_sigma"):
        gaussian_recon_nll(recon, target, log_sigma=torch.zeros(3))


def test_multimodal_elbo_gaussian_is_the_negative_elbo():
    b, leads, t, d = 4, 3, 6, 2
    recon, target = torch.randn(b, leads, t), torch.randn(b, leads, t)
    mean, log_var = torch.randn(b, d), torch.randn(b, d)
    mask = torch.ones(b, leads, dtype=torch.bool)
    mask[0, 0] = False
    weights = torch.tensor([1.0, 2.0, 1.0])
    out = multimodal_elbo(
        recon, target, mean, log_var, 1.0, weights, mask, recon_reduction="gaussian", log_sigma=math.log(0.3)
    )
    per = gaussian_recon_nll(recon, target, mask, math.log(0.3), per_lead=True)
    torch.testing.assert_close(out.recon, (per * weights).sum(1).mean())
    torch.testing.assert_close(out.total, out.recon + gaussian_kl(mean, log_var).mean())
    torch.testing.assert_close(out.recon_per_lead[0], per[1:, 0].mean())
    # unweighted, beta = 1: -E_q log p(x|z) + KL, the recon summed over time (T/2 x the MSE at sigma = 1)
    unit = multimodal_elbo(recon, target, mean, log_var, 1.0, recon_reduction="gaussian")
    sse = (recon - target).square().sum((1, 2))
    torch.testing.assert_close(unit.recon, (0.5 * sse + leads * t * 0.5 * math.log(2 * math.pi)).mean())


def test_expert_and_unimodal_kl():
    k, b, d = 3, 4, 2
    mean, log_var = torch.randn(k, b, d), torch.randn(k, b, d)
    mask = torch.ones(k, b, dtype=torch.bool)
    mask[1, 2] = False
    mean[1, 2] = float("nan")
    per = expert_kl(mean, log_var, mask)
    assert per.shape == (k, b) and per[1, 2] == 0
    torch.testing.assert_close(per[0], gaussian_kl(mean[0], log_var[0]))
    torch.testing.assert_close(unimodal_kl(mean, log_var, mask), per.sum(0).mean())


# ---------------------------------------------------------------- gate balance (Shazeer et al. 2017)


def test_importance_loss_is_shazeers_cv_squared():
    k, b = 5, 8
    w = torch.softmax(torch.randn(k, b), 0)
    imp = w.sum(1)
    torch.testing.assert_close(importance_loss(w), imp.var(unbiased=False) / imp.mean() ** 2)
    assert importance_loss(torch.full((k, b), 1 / k)) < 1e-10
    one_hot = torch.zeros(k, b)
    one_hot[-1] = 1
    torch.testing.assert_close(importance_loss(one_hot), torch.tensor(k - 1.0))
    # with missing experts a uniform gate over the present ones is still balanced (0)
    mask = torch.rand(k, b, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[-1] = True
    uniform = mask.float() / mask.float().sum(0, keepdim=True)
    assert importance_loss(uniform, mask) < 1e-10
    assert importance_loss(torch.where(mask, w, 0.0), mask) > 0


def test_load_loss_dense_equals_importance_and_top_k_is_normalised():
    k, b = 4, 6
    w = torch.softmax(torch.randn(k, b), 0)
    mask = torch.ones(k, b, dtype=torch.bool)
    mask[0, :3] = False
    w = torch.where(mask, w, 0.0)
    w = w / w.sum(0)
    torch.testing.assert_close(load_loss(w, mask), importance_loss(w, mask))
    # top-2 with balanced selection: every present expert selected with probability min(2, n) / n
    n = mask.sum(0, keepdim=True).float()
    balanced = mask.float() * torch.clamp(n, max=2) / n
    assert load_loss(balanced, mask, top_k=2) < 1e-10
    # full mask: Shazeer's CV^2 of the raw sums
    load = torch.rand(k, b)
    total = load.sum(1)
    torch.testing.assert_close(load_loss(load, top_k=2), total.var(unbiased=False) / total.mean() ** 2)


def test_gate_balance_kl_barrier_keeps_gradients_for_a_starved_expert():
    k, b = 5, 16
    assert gate_balance_kl(torch.full((k, b), 1 / k)).abs() < 1e-6
    logits = torch.zeros(k, b)
    logits[-1] = 12.0  # collapsed onto the last expert: the others get ~6e-6
    w = torch.softmax(logits, 0)
    p = w.mean(1) / w.mean(1).sum()
    torch.testing.assert_close(gate_balance_kl(w), (0.2 * torch.log(0.2 / p)).sum())
    grads = {}
    for name, fn in (("kl", gate_balance_kl), ("importance", importance_loss)):
        lg = logits.clone().requires_grad_(True)
        fn(torch.softmax(lg, 0)).backward()
        grads[name] = lg.grad[0].abs().sum()
    assert grads["kl"] > 0.1 and grads["importance"] < 1e-3  # CV^2 cannot revive a starved expert
    zero = torch.zeros(k, b)
    zero[-1] = 1
    assert torch.isfinite(gate_balance_kl(zero)) and gate_balance_kl(zero) > 5
    mask = torch.ones(k, b, dtype=torch.bool)
    mask[0] = False  # an expert absent from the batch is not penalised
    uniform = mask.float() / mask.float().sum(0)
    assert gate_balance_kl(uniform, mask).abs() < 1e-6


def test_gate_entropy_floor_loss():
    k, b = 4, 3
    assert gate_entropy_floor_loss(torch.full((k, b), 0.25)) == 0
    one_hot = torch.zeros(k, b)
    one_hot[0] = 1
    torch.testing.assert_close(gate_entropy_floor_loss(one_hot, floor=0.5), torch.tensor(0.5))
    mask = torch.ones(k, b, dtype=torch.bool)
    mask[1:, 0] = False  # one present expert: skipped
    torch.testing.assert_close(gate_entropy_floor_loss(one_hot, mask, floor=0.5), torch.tensor(0.5))
    lg = torch.randn(k, b, requires_grad=True)
    gate_entropy_floor_loss(torch.softmax(lg * 10, 0), floor=0.9).backward()
    assert torch.isfinite(lg.grad).all()
