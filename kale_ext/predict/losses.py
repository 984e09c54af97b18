"""Objectives of LS-EMVAE: Gaussian likelihood and KL, alignment, the multimodal ELBO, gate balance, focal loss.

All of them run in float32 (inputs are upcast), also under mixed precision, and depend on torch alone.
Method: Suvon et al., arXiv 2503.13470 (Eq. 1 and 2); gate balance losses: Shazeer et al., "Outrageously Large
Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer" (ICLR 2017); unimodal and subset terms: Wu and
Goodman (MVAE, 2018), Sutter et al. (MoPoE-VAE, 2021); focal loss: Lin et al., "Focal Loss for Dense Object
Detection" (ICCV 2017).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ELBOTerms(NamedTuple):
    """Parts of the multimodal ELBO.

    Attributes:
        total: scalar, ``recon + beta * kl`` (with ``recon_reduction="gaussian"`` and ``beta = 1``: the negative
            ELBO in nats per sample).
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


HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _lead_log_sigma(log_sigma: float | Tensor, leads: int, device: torch.device) -> Tensor:
    """``log_sigma`` as a float32 (leads,) tensor on ``device``."""
    value = torch.as_tensor(log_sigma, dtype=torch.float32, device=device)
    if value.dim() == 0:
        return value.expand(leads)
    if value.shape != (leads,):
        raise ValueError(f"log_sigma must be a float or a (leads,) = ({leads},) tensor, got {tuple(value.shape)}.")
    return value


def _lead_mask(recon: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Check (batch, leads, time) shapes and return the (batch, leads) presence mask (all present for None)."""
    if recon.shape != target.shape or recon.dim() != 3:
        raise ValueError(f"recon and target must both be (batch, leads, time); got {recon.shape} and {target.shape}.")
    batch, leads, _ = recon.shape
    if mask is None:
        return torch.ones((batch, leads), dtype=torch.bool, device=recon.device)
    if mask.shape != (batch, leads):
        raise ValueError(f"mask must be (batch, leads) = {(batch, leads)}; got {tuple(mask.shape)}.")
    return mask


def gaussian_recon_nll(
    recon: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    log_sigma: float | Tensor = 0.0,
    per_lead: bool = False,
) -> Tensor:
    """Negative log-likelihood of the signals under ``N(recon, sigma_l^2)``, summed over time and present leads.

    Per sample: ``sum_l present_l sum_t [ (x - x_hat)^2 / (2 sigma_l^2) + log sigma_l + 0.5 log 2 pi ]``. With this
    reconstruction term and the KL summed over the latent dimensions, ``recon + kl`` is the negative ELBO (beta = 1
    is the ELBO). ``log_sigma`` may be a learned ``(leads,)`` parameter (the caller owns it; then the optimum is
    ``sigma_l`` = the RMS residual of lead l); bound it from below (e.g. ``clamp_min(log(0.05))``) if the decoder
    can overfit.

    Args:
        recon: (batch, leads, time) reconstructions.
        target: (batch, leads, time) signals (absent leads may hold anything, NaN included).
        mask: (batch, leads) bool, True = present; None means all present.
        log_sigma: log of the likelihood's standard deviation: a float (all leads) or a (leads,) tensor.
        per_lead: return (batch, leads) instead of the sum over leads.

    Returns:
        (batch,) float32 (or (batch, leads) with ``per_lead``; 0 for absent leads).
    """
    mask = _lead_mask(recon, target, mask)
    batch, leads, time = recon.shape
    log_sigma = _lead_log_sigma(log_sigma, leads, recon.device)
    # where, not multiply: absent leads may hold NaN placeholders.
    sq = torch.where(mask.unsqueeze(-1), (recon.float() - target.float()).square(), torch.zeros((), device=mask.device))
    per = 0.5 * sq.sum(dim=-1) * torch.exp(-2.0 * log_sigma) + time * (log_sigma + HALF_LOG_2PI)  # (B, L)
    per = torch.where(mask, per, torch.zeros((), device=mask.device))
    return per if per_lead else per.sum(dim=1)


def multimodal_elbo(
    recon: Tensor,
    target: Tensor,
    mean: Tensor,
    log_var: Tensor,
    beta: float,
    lead_weights: Tensor | None = None,
    mask: Tensor | None = None,
    recon_reduction: str = "mean",
    log_sigma: float | Tensor = 0.0,
) -> ELBOTerms:
    """Negative ELBO of a multi-lead VAE with absent leads ignored (paper Eq. 2, without the alignment term).

    ``recon_reduction="gaussian"``: the Gaussian negative log-likelihood of :func:`gaussian_recon_nll` (summed over
    time, ``sum_l lambda_l NLL_l`` over present leads), averaged over the batch; with ``beta = 1`` and
    ``lambda_l = 1`` the total is the negative ELBO in nats. ``"mean"``: per lead the MSE over time, then
    ``sum_l lambda_l MSE_l`` over the present leads of each sample, averaged over the batch; against the summed KL
    this weighs the KL about T / 2 times more than the ELBO does (kept for old configurations). ``"reference"``:
    the authors' scale, the summed squared error over present leads and time (times ``lambda_l``) x 1e-3 / batch.
    The KL term is the same in all modes and is computed on the ``mean``/``log_var`` given (the caller picks the
    posterior: the fused one, or the authors' average of encoders).

    Args:
        recon: (batch, leads, time) reconstructions.
        target: (batch, leads, time) signals.
        mean: (batch, latent) posterior mean.
        log_var: (batch, latent) posterior log-variance.
        beta: KL weight (e.g. from :func:`linear_annealing`).
        lead_weights: (leads,) lambda_l; None means all 1.
        mask: (batch, leads) bool, True = present; None means all present.
        recon_reduction: "gaussian", "mean" or "reference".
        log_sigma: the likelihood's log standard deviation for ``"gaussian"`` (float or (leads,) tensor).

    Returns:
        ELBOTerms(total, recon, recon_per_lead, kl).
    """
    if recon_reduction not in ("gaussian", "mean", "reference"):
        raise ValueError(f"recon_reduction must be 'gaussian', 'mean' or 'reference', got {recon_reduction!r}.")
    mask = _lead_mask(recon, target, mask)
    batch, leads, _ = recon.shape
    weights = torch.ones(leads, device=recon.device) if lead_weights is None else lead_weights.float()
    if recon_reduction == "gaussian":
        per = gaussian_recon_nll(recon, target, mask, log_sigma, per_lead=True)  # (B, L)
        recon_term = (per * weights).sum(dim=1).mean()
    else:
        # where, not multiply: absent leads may hold NaN placeholders.
        sq = torch.where(
            mask.unsqueeze(-1), (recon.float() - target.float()).square(), torch.zeros((), device=mask.device)
        )
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


def expert_kl(expert_mean: Tensor, expert_log_var: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL of each expert's (or subset posterior's) Gaussian to N(0, I), 0 where absent.

    The KL part of MVAE's unimodal and MoPoE's subset ELBO terms, for posteriors stacked as experts (e.g. from
    :func:`kale_ext.embed.fusion.subset_products`).

    Args:
        expert_mean: (experts, batch, latent).
        expert_log_var: (experts, batch, latent).
        mask: (experts, batch) bool, True = present; None means all present.

    Returns:
        (experts, batch) float32.
    """
    kl = gaussian_kl(expert_mean, expert_log_var)  # gaussian_kl reduces the last dim: (K, B)
    if mask is None:
        return kl
    return torch.where(mask, kl, torch.zeros((), device=kl.device))


def unimodal_kl(expert_mean: Tensor, expert_log_var: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum over the present experts of KL(q_k || N(0, I)), averaged over the batch: the KL of the unimodal terms.

    MVAE's objective adds, for each present modality k, the ELBO of x_k under its own posterior
    ``q(z | x_k)``: ``E_{z ~ q_k}[-log p(x_k | z)] + KL(q_k || p)``. This function is the sum of the KL parts;
    the reconstruction part decodes ``z_k ~ q_k`` and scores lead k (MVAE) or every present lead (MoPoE's subset
    terms) with :func:`gaussian_recon_nll`. See docs/fusion.md for how to combine the terms.

    Args:
        expert_mean: (experts, batch, latent).
        expert_log_var: (experts, batch, latent).
        mask: (experts, batch) bool, True = present; None means all present.

    Returns:
        Scalar float32.
    """
    return expert_kl(expert_mean, expert_log_var, mask).sum(dim=0).mean()


def _uniform_share(mask: Tensor) -> Tensor:
    """(K, B): the weight each present expert gets from a uniform gate, 1 / (number present); 0 where absent."""
    present = mask.float()
    return present / present.sum(dim=0, keepdim=True).clamp_min(1.0)


def _cv_squared(values: Tensor, valid: Tensor) -> Tensor:
    """Squared coefficient of variation (population variance / mean^2) of ``values`` over the ``valid`` entries."""
    count = valid.float().sum().clamp_min(1.0)
    v = torch.where(valid, values, torch.zeros((), device=values.device))
    mean = v.sum() / count
    var = torch.where(valid, (values - mean).square(), torch.zeros((), device=values.device)).sum() / count
    return var / (mean.square() + 1e-10)


def importance_loss(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """Shazeer et al.'s importance loss: CV^2 over experts of the batch sum of the gate weights.

    ``Importance_k = sum_b w_kb``; the loss is ``Var_k / Mean_k^2`` (population variance) over the experts present in
    at least one sample. With missing experts, an expert present in fewer samples would look unimportant by
    construction, so each expert's importance is divided by what a uniform gate would give it,
    ``sum_b 1 / n_b`` over the samples b where it is present (n_b = number present in b). With every expert present
    the divisor is the same for all experts and the loss is exactly Shazeer's (CV^2 is scale-free). A uniform gate
    gives 0; all weight on one of K experts gives K - 1.

    Args:
        weights: (experts, batch) gate weights (``FusionOutput.weights``).
        mask: (experts, batch) bool, True = present (``FusionOutput.expert_mask``); None means all present.

    Returns:
        Scalar float32 (multiply by the balance weight, ``w_importance`` in the paper).
    """
    weights = weights.float()
    if mask is None:
        mask = torch.ones(weights.shape, dtype=torch.bool, device=weights.device)
    baseline = _uniform_share(mask).sum(dim=1)  # (K,)
    total = torch.where(mask, weights, torch.zeros((), device=weights.device)).sum(dim=1)
    valid = baseline > 0
    return _cv_squared(total / baseline.clamp_min(1e-12), valid)


def load_loss(load: Tensor, mask: Tensor | None = None, top_k: int | None = None) -> Tensor:
    """Shazeer et al.'s load loss: CV^2 over experts of the batch sum of the (smooth) selection probabilities.

    ``load`` is ``GateOutput.load`` / ``FusionOutput.gate_load``: under top-k gating the smooth estimate of the
    probability that each expert is selected; under dense gating (``top_k=None``) the weights, so that the loss then
    equals :func:`importance_loss`. As there, each expert's load is divided by its load under balanced routing,
    ``sum_b min(k, n_b) / n_b`` over the samples where it is present, so missing experts are not penalised; with
    every expert present this is exactly Shazeer's loss.

    Args:
        load: (experts, batch) per-sample loads.
        mask: (experts, batch) bool, True = present; None means all present.
        top_k: the gate's k; None for dense gating.

    Returns:
        Scalar float32 (multiply by ``w_load``).
    """
    load = load.float()
    if mask is None:
        mask = torch.ones(load.shape, dtype=torch.bool, device=load.device)
    share = _uniform_share(mask)
    if top_k is not None:
        count = mask.float().sum(dim=0, keepdim=True)
        share = share * torch.minimum(count, torch.full_like(count, float(top_k)))
    baseline = share.sum(dim=1)
    total = torch.where(mask, load, torch.zeros((), device=load.device)).sum(dim=1)
    return _cv_squared(total / baseline.clamp_min(1e-12), baseline > 0)


def gate_balance_kl(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(uniform || mean gate): a log barrier that keeps every expert's average weight away from 0.

    With ``p_k`` the batch-mean share of expert k (its summed weight over the batch, over the total) and ``u_k``
    the same share under a uniform gate over the present experts, the loss is ``sum_k u_k log(u_k / p_k)`` over
    the experts present somewhere in the batch: 0 for a uniform gate, growing like ``-log p_k`` as an expert is
    starved. Why beside :func:`importance_loss`: CV^2 is bounded (at most K - 1) and its gradient with respect to a
    starved expert's logits vanishes with the softmax (d w / d logit = w (1 - w)), so once the gate has collapsed
    onto one expert (as the ELBO drives HiME onto the shared PoE expert) it cannot pull the others back; here the
    ``1 / p_k`` of the log cancels that factor and the logit-gradient of a starved expert stays of order 1.

    Args:
        weights: (experts, batch) gate weights.
        mask: (experts, batch) bool, True = present; None means all present.

    Returns:
        Scalar float32, >= 0.
    """
    weights = weights.float()
    if mask is None:
        mask = torch.ones(weights.shape, dtype=torch.bool, device=weights.device)
    zero = torch.zeros((), device=weights.device)
    uniform = _uniform_share(mask).sum(dim=1)
    total = torch.where(mask, weights, zero).sum(dim=1)
    valid = uniform > 0
    u = uniform / uniform.sum().clamp_min(1e-12)
    p = total / total.sum().clamp_min(1e-12)
    # p is floored so that an expert with exactly zero weight gives a large finite loss, not inf.
    ratio = torch.where(valid, u / p.clamp_min(1e-12), torch.ones((), device=weights.device))
    return torch.where(valid, u * ratio.log(), zero).sum()


def gate_entropy_floor_loss(weights: Tensor, mask: Tensor | None = None, floor: float = 0.5) -> Tensor:
    """Hinge on the per-sample normalised entropy of the gate: ``mean_b max(0, floor - H_b / log n_b)``.

    The importance and load losses balance the batch *sums* only: a gate that puts each sample one-hot on a
    different expert is perfectly balanced, yet every fused posterior is a single expert and the mixture (and the
    other experts' gradient) is gone. This term keeps each sample's weights spread: ``H_b / log n_b`` is 1 for
    uniform weights over the ``n_b`` present experts and 0 for one-hot; samples with fewer than two present experts
    are skipped. Off unless the caller weights it.

    Args:
        weights: (experts, batch) gate weights.
        mask: (experts, batch) bool, True = present; None means all present.
        floor: the normalised entropy below which a sample is penalised, in [0, 1].

    Returns:
        Scalar float32.
    """
    weights = weights.float()
    if mask is None:
        mask = torch.ones(weights.shape, dtype=torch.bool, device=weights.device)
    zero = torch.zeros((), device=weights.device)
    w = torch.where(mask, weights, zero)
    # 0 log 0 = 0, with a where so that exact zeros give no NaN gradient.
    safe = torch.where(w > 0, w, torch.ones((), device=w.device))
    entropy = -(torch.where(w > 0, w * safe.log(), zero)).sum(dim=0)
    count = mask.float().sum(dim=0)
    valid = count >= 2
    normalised = entropy / torch.where(valid, count, torch.full_like(count, 2.0)).log()
    hinge = torch.where(valid, (floor - normalised).clamp_min(0.0), zero)
    return hinge.sum() / valid.float().sum().clamp_min(1.0)


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
