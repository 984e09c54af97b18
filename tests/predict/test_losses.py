"""Objectives: KL, alignment, multimodal ELBO with absent leads, annealing, focal loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from kale_ext.predict.losses import (
    ELBOTerms,
    FocalLoss,
    alignment_loss,
    gaussian_kl,
    linear_annealing,
    multimodal_elbo,
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
