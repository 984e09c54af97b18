"""Objectives of LS-EMVAE: Gaussian KL, alignment, the multimodal ELBO, KL annealing and the focal loss.

All of them run in float32 (inputs are upcast), also under mixed precision, and depend on torch alone.
Method: Suvon et al., arXiv 2503.13470 (Eq. 1 and 2); focal loss: Lin et al., "Focal Loss for Dense Object
Detection" (ICCV 2017).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ELBOTerms(NamedTuple):
    """Parts of the multimodal ELBO.

    Attributes:
        total: scalar, ``recon + beta * kl``.
        recon: scalar reconstruction term.
        recon_per_lead: (leads,) each lead's (unweighted) reconstruction term averaged over the samples where the
            lead is present; 0 for a lead absent from the whole batch (for monitoring).
        kl: scalar, KL to N(0, I) averaged over the batch.
    """

    total: Tensor
    recon: Tensor
    recon_per_lead: Tensor
    kl: Tensor


def gaussian_kl(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, exp(log_var)) || N(0, I)) per sample, summed over the latent dimensions.

    Args:
        mean: (batch, latent).
        log_var: (batch, latent).

    Returns:
        (batch,) float32.
    """
    mean, log_var = mean.float(), log_var.float()
    return 0.5 * (log_var.exp() + mean.square() - 1.0 - log_var).sum(dim=-1)


def alignment_loss(expert_mean: Tensor, fused_mean: Tensor, mask: Tensor | None = None, gamma: float = 1.0) -> Tensor:
    """Alignment of the experts with the fused posterior (paper Eq. 1).

    ``gamma * mean over present experts k of ||mu_k - mu||^2`` per sample, averaged over the samples that have at
    least one present expert (0 when none has). The authors' code instead uses 0.1 x the mean over leads of the MSE
    (averaged over latent dims too); pass ``gamma = 0.1 / latent`` and the lead experts only to get that scale.

    Args:
        expert_mean: (experts, batch, latent).
        fused_mean: (batch, latent).
        mask: (experts, batch) bool, True = present; None means all present.
        gamma: weight of the term.

    Returns:
        Scalar float32 tensor.
    """
    expert_mean, fused_mean = expert_mean.float(), fused_mean.float()
    if mask is None:
        mask = torch.ones(expert_mean.shape[:2], dtype=torch.bool, device=expert_mean.device)
    diff = torch.where(mask.unsqueeze(-1), expert_mean - fused_mean.unsqueeze(0), torch.zeros((), device=mask.device))
    dist = diff.square().sum(dim=-1)  # (K, B)
    count = mask.sum(dim=0)
    per_sample = dist.sum(dim=0) / count.clamp_min(1)
    valid = count > 0
    return gamma * per_sample.sum() / valid.sum().clamp_min(1)


def multimodal_elbo(
    recon: Tensor,
    target: Tensor,
    mean: Tensor,
    log_var: Tensor,
    beta: float,
    lead_weights: Tensor | None = None,
    mask: Tensor | None = None,
    recon_reduction: str = "mean",
) -> ELBOTerms:
    """Negative ELBO of a multi-lead VAE with absent leads ignored (paper Eq. 2, without the alignment term).

    ``recon_reduction="mean"``: per lead the MSE over time, then ``sum_l lambda_l MSE_l`` over the present leads of
    each sample, averaged over the batch. ``"reference"``: the authors' scale, the summed squared error over present
    leads and time (times ``lambda_l``) x 1e-3 / batch. The KL term is the same in both modes and is computed on the
    ``mean``/``log_var`` given (the caller picks the posterior: the fused one, or the authors' average of encoders).

    Args:
        recon: (batch, leads, time) reconstructions.
        target: (batch, leads, time) signals.
        mean: (batch, latent) posterior mean.
        log_var: (batch, latent) posterior log-variance.
        beta: KL weight (e.g. from :func:`linear_annealing`).
        lead_weights: (leads,) lambda_l; None means all 1.
        mask: (batch, leads) bool, True = present; None means all present.
        recon_reduction: "mean" or "reference".

    Returns:
        ELBOTerms(total, recon, recon_per_lead, kl).
    """
    if recon.shape != target.shape or recon.dim() != 3:
        raise ValueError(f"recon and target must both be (batch, leads, time); got {recon.shape} and {target.shape}.")
    if recon_reduction not in ("mean", "reference"):
        raise ValueError(f"recon_reduction must be 'mean' or 'reference', got {recon_reduction!r}.")
    batch, leads, _ = recon.shape
    if mask is None:
        mask = torch.ones((batch, leads), dtype=torch.bool, device=recon.device)
    if mask.shape != (batch, leads):
        raise ValueError(f"mask must be (batch, leads) = {(batch, leads)}; got {tuple(mask.shape)}.")
    weights = torch.ones(leads, device=recon.device) if lead_weights is None else lead_weights.float()
    # where, not multiply: absent leads may hold NaN placeholders.
    sq = torch.where(mask.unsqueeze(-1), (recon.float() - target.float()).square(), torch.zeros((), device=mask.device))
    if recon_reduction == "mean":
        per = sq.mean(dim=-1)  # (B, L) MSE over time
        recon_term = (per * weights).sum(dim=1).mean()
    else:
        per = sq.sum(dim=-1) * 1e-3  # (B, L)
        recon_term = (per * weights).sum() / batch
    present = mask.float()
    recon_per_lead = (per * present).sum(dim=0) / present.sum(dim=0).clamp_min(1.0)
    kl = gaussian_kl(mean, log_var).mean()
    return ELBOTerms(recon_term + beta * kl, recon_term, recon_per_lead, kl)


def linear_annealing(step: int, warmup_steps: int) -> float:
    """KL weight growing linearly from 0 at ``step = 0`` to 1 at ``warmup_steps``, then 1.

    Args:
        step: current step (or epoch).
        warmup_steps: length of the ramp; <= 0 means no annealing (always 1).

    Returns:
        A float in [0, 1].
    """
    if warmup_steps <= 0:
        return 1.0
    return float(min(max(step / warmup_steps, 0.0), 1.0))


class FocalLoss(nn.Module):
    """Focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` for binary and multiclass logits (Lin et al. 2017).

    Logits of shape (batch,) or (batch, 1) are binary (sigmoid); (batch, C) are softmax over C classes (C = 2 is the
    usual two-logit binary head). With ``gamma = 0`` and ``alpha = None`` it is exactly the (binary) cross-entropy.
    ``reduction="mean"`` is the plain mean over samples (unlike ``F.cross_entropy(weight=...)`` it does not divide
    by the sum of the class weights).

    Args:
        alpha: None (no class weighting); a float in [0, 1], the weight of the positive class (class 1) in a binary
            problem, ``1 - alpha`` for class 0; or a per-class tensor/sequence of length C.
        gamma: focusing parameter >= 0.
        reduction: "mean", "sum" or "none".
    """

    def __init__(self, alpha: float | Tensor | list[float] | None = None, gamma: float = 2.0, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}.")
        self.gamma = float(gamma)
        self.reduction = reduction
        self.alpha_scalar: float | None = None
        if alpha is None:
            self.register_buffer("alpha_per_class", None)
        elif isinstance(alpha, (int, float)):
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"a float alpha is the positive-class weight and must be in [0, 1], got {alpha}.")
            self.alpha_scalar = float(alpha)
            self.register_buffer("alpha_per_class", None)
        else:
            self.register_buffer("alpha_per_class", torch.as_tensor(alpha, dtype=torch.float32).flatten())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Compute the loss.

        Args:
            logits: (batch,), (batch, 1) or (batch, C).
            target: (batch,) class indices (0/1 for binary logits).

        Returns:
            Scalar (or (batch,) with reduction="none"), float32.
        """
        logits = logits.float()
        target = target.reshape(-1)
        if logits.dim() == 2 and logits.shape[1] == 1:
            logits = logits[:, 0]
        if logits.dim() == 1:
            y = target.float()
            # log p_t for the sigmoid, written with logsigmoid for stability at large |logits|.
            log_pt = y * F.logsigmoid(logits) + (1.0 - y) * F.logsigmoid(-logits)
            num_classes = 2
        elif logits.dim() == 2:
            num_classes = logits.shape[1]
            log_pt = F.log_softmax(logits, dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)
        else:
            raise ValueError(f"logits must be (batch,), (batch, 1) or (batch, C); got {tuple(logits.shape)}.")
        loss = -log_pt
        if self.gamma != 0.0:
            loss = loss * (1.0 - log_pt.exp()).clamp_min(0.0).pow(self.gamma)
        if self.alpha_scalar is not None:
            if num_classes != 2:
                raise ValueError(
                    f"a float alpha weights the positive class of a binary problem; with {num_classes} classes "
                    "pass a per-class alpha sequence instead."
                )
            pos = target.float()
            loss = loss * (self.alpha_scalar * pos + (1.0 - self.alpha_scalar) * (1.0 - pos))
        elif self.alpha_per_class is not None:
            if self.alpha_per_class.numel() != num_classes:
                raise ValueError(
                    f"alpha has {self.alpha_per_class.numel()} entries but the logits have {num_classes} classes."
                )
            loss = loss * self.alpha_per_class[target.long()]
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
