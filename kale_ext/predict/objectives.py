"""Pre-training objectives as objects: one ``Objective`` per way of scoring a batch, chosen by name.

A pre-training module (``kale_ext.pipeline.pretrain.PretrainModule``) holds a model and an objective and never
branches on a mode: it calls ``objective(model, batch, progress)`` and optimises the returned ``loss``. Objectives
are ``nn.Module`` so that one may own parameters (a learned likelihood scale, say); the training module optimises
them with the model's.

- :class:`ELBOObjective` (``"elbo"``): the paper's objective (Suvon et al., arXiv 2503.13470, Eqs. 1-2):
  reconstruction of every present lead + beta x KL of the fused posterior + gamma x the alignment of every expert
  with the fused mean; beta annealed linearly per optimiser step.
- :class:`ReferenceObjective` (``"reference"``): the objective of the authors' published code: summed squared error
  x 1e-3 / batch, KL on the arithmetic mean of the lead encoders' mean and log-variance, alignment = gamma x mean
  over leads of the MSE between each lead mean and the mean of the lead means, beta = min(epoch / warmup, 1).
- :class:`MaskedPatchObjective` (``"masked_patch"``): ST-MEM's masked-patch reconstruction.
- :class:`CapacityObjective` (``"capacity"``): beta-VAE with the capacity-controlled KL of Burgess et al. (2018).

Depends on torch alone (like :mod:`kale_ext.predict.losses`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kale_ext.predict.losses import (
    alignment_loss,
    gate_balance_kl,
    gaussian_kl,
    gaussian_recon_nll,
    importance_loss,
    linear_annealing,
    multimodal_elbo,
)
from kale_ext.predict.pretext import capacity_kl, capacity_schedule


@dataclass(frozen=True)
class TrainingProgress:
    """Where training is, for schedules: optimiser step, epoch and steps per epoch.

    Attributes:
        step: global optimiser step (0-based).
        epoch: current epoch (0-based).
        steps_per_epoch: optimiser steps per epoch (1 when unknown).
    """

    step: int = 0
    epoch: int = 0
    steps_per_epoch: int = 1


@dataclass
class PretrainBatch:
    """One batch as an objective sees it.

    Attributes:
        signals: (B, L', T) float signals, channels named by ``leads``.
        mask: (B, L') bool, True = present.
        leads: names of the channels of ``signals``.
        target: (B, L, T) the signals placed in the model's lead slots (zeros where the model has no channel).
        target_mask: (B, L) bool presence over the model's leads.
        sample: draw z from the fused posterior (training and validation) or take its mean.
        forward: the model's forward to call (the model's own, or a compiled view of it).
    """

    signals: Tensor
    mask: Tensor
    leads: tuple[str, ...]
    target: Tensor
    target_mask: Tensor
    sample: bool = True
    forward: Callable | None = None


class Objective(nn.Module):
    """Base class: ``forward(model, batch, progress) -> dict`` with a scalar ``loss`` and logged terms.

    Subclasses return at least ``loss``, ``recon``, ``kl``, ``align`` (scalar tensors) and ``beta`` (float).
    """

    def beta(self, progress: TrainingProgress) -> float:
        """KL weight at ``progress`` (1 unless a subclass anneals it)."""
        return 1.0

    def forward(self, model: nn.Module, batch: PretrainBatch, progress: TrainingProgress) -> dict:
        """Loss terms of one batch (implemented by subclasses)."""
        raise NotImplementedError


SUBSET_TERMS = ("none", "unimodal", "subset")


class ELBOObjective(Objective):
    """The paper's objective: multimodal ELBO of the fused posterior, alignment of the experts, gate balance.

    ``loss = NLL(x | z) + beta KL(q_fused || p) + gamma alignment + balance + w_sub sub-ELBO``, with z drawn from
    the fused posterior (paper Eqs. 1-2). With ``recon_reduction="gaussian"`` (default) the reconstruction is the
    Gaussian negative log-likelihood summed over time and present leads with a fixed sigma per lead, so beta = 1 is
    the ELBO in nats; ``"mean"`` (per-lead MSE averaged over time) is the scale of earlier versions.

    Gate balance (Shazeer et al. 2017, cited by the paper for its gate): when the fusion has a learned gate, its
    importance loss (CV^2 of the per-expert batch sums) and a KL(uniform || batch-mean gate) barrier are added with
    weights ``gate_importance x T / (2 sigma^2)`` and ``gate_balance_kl x T / (2 sigma^2)`` (T = samples per lead;
    the factor is 1 with the ``"mean"`` reconstruction), so the weights follow the reconstruction's scale
    (docs/fusion.md gives the derivation).

    Sub-ELBO terms (``subset_terms``), one draw per sample so each costs one extra decode: ``"unimodal"`` (MVAE,
    Wu and Goodman 2018): one present lead expert per sample, its posterior ``q_l p`` alone reconstructs lead l,
    times the number of present leads; ``"subset"`` (MoPoE, Sutter et al. 2021): one non-empty subset of the present
    lead experts per sample, uniform over the ``2^n - 1`` of them (:func:`uniform_subsets`), its product
    reconstructs every present lead. Both make the lead experts valid posteriors on their own, which masked (6-lead)
    inference relies on. They need a fusion whose first L listed experts are the L lead experts (HiME in paper mode,
    PoE, mean fusion).

    Reported beside the loss (no gradient; in nats per record, beta = 1, the Gaussian likelihood at the current
    sigma whatever ``recon_reduction``): ``neg_elbo``, the negative ELBO of the fused posterior, and, for lead-expert
    fusions, ``neg_elbo_poe``, the negative ELBO of the product of the present lead experts with the prior (the
    PoE expert alone; one extra decode without autograd, ``report_poe=False`` skips it). The ELBO prefers the PoE
    expert: the gap ``neg_elbo - neg_elbo_poe`` is what the gate balance and the mixture cost in ELBO terms.

    Learned sigma (``learn_sigma``): one standard deviation per lead, ``sigma_min + (sigma_max - sigma_min) x
    sigmoid(theta_l)``, starting at ``sigma``, optimised with the model; the reconstruction and ``neg_elbo`` are
    then the ELBO at the learned sigma, and ``sigma_mean`` is logged. The balance weights keep the fixed ``sigma``
    (their scale does not move while sigma is learned).

    Args:
        beta: final KL weight.
        beta_warmup_epochs: epochs over which beta rises linearly from 0, per optimiser step (0 = no warm-up).
        gamma: alignment weight (0 = no alignment).
        recon_reduction: ``"gaussian"``, ``"mean"`` or ``"reference"`` (see ``multimodal_elbo``).
        sigma: the Gaussian likelihood's standard deviation per lead (z-scored signals), fixed.
        gate_importance: coefficient of the importance (CV^2) loss.
        gate_balance_kl: coefficient of the KL(uniform || mean gate) barrier.
        subset_terms: ``"none"``, ``"unimodal"`` or ``"subset"``.
        subset_weight: weight of the sub-ELBO term.
        report_poe: compute ``neg_elbo_poe`` (one extra decode without autograd per batch).
        learn_sigma: learn a bounded sigma per lead (needs ``num_leads``).
        num_leads: number of model leads (for ``learn_sigma``).
        sigma_min: lower bound of the learned sigma.
        sigma_max: upper bound of the learned sigma.
    """

    def __init__(
        self,
        beta: float = 1.0,
        beta_warmup_epochs: float = 50.0,
        gamma: float = 0.5,
        recon_reduction: str = "gaussian",
        sigma: float = 0.3,
        gate_importance: float = 0.1,
        gate_balance_kl: float = 0.3,
        subset_terms: str = "none",
        subset_weight: float = 1.0,
        report_poe: bool = True,
        learn_sigma: bool = False,
        num_leads: int = 0,
        sigma_min: float = 0.05,
        sigma_max: float = 1.0,
    ) -> None:
        super().__init__()
        if subset_terms not in SUBSET_TERMS:
            raise ValueError(f"subset_terms {subset_terms!r} is not accepted; use one of {SUBSET_TERMS}")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.beta_max = float(beta)
        self.beta_warmup_epochs = float(beta_warmup_epochs)
        self.gamma = float(gamma)
        self.recon_reduction = recon_reduction
        self.log_sigma = math.log(float(sigma))
        self.gate_importance = float(gate_importance)
        self.gate_balance_kl = float(gate_balance_kl)
        self.subset_terms = subset_terms
        self.subset_weight = float(subset_weight)
        self.report_poe = bool(report_poe)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_raw: nn.Parameter | None = None
        if learn_sigma:
            if num_leads < 1:
                raise ValueError("learn_sigma needs num_leads (the model's number of leads) >= 1")
            if not 0 < self.sigma_min < float(sigma) < self.sigma_max:
                raise ValueError(
                    f"learn_sigma needs 0 < sigma_min < sigma < sigma_max; got {sigma_min}, {sigma}, {sigma_max} "
                    "(PRETRAIN.SIGMA_MIN, PRETRAIN.SIGMA, PRETRAIN.SIGMA_MAX)"
                )
            start = (float(sigma) - self.sigma_min) / (self.sigma_max - self.sigma_min)
            self.sigma_raw = nn.Parameter(torch.full((int(num_leads),), math.log(start / (1.0 - start))))

    def lead_log_sigma(self) -> float | Tensor:
        """The likelihood's log sigma: the fixed float, or the learned, bounded (leads,) tensor."""
        if self.sigma_raw is None:
            return self.log_sigma
        sigma = self.sigma_min + (self.sigma_max - self.sigma_min) * torch.sigmoid(self.sigma_raw.float())
        return torch.log(sigma)

    def beta(self, progress: TrainingProgress) -> float:
        """beta_max x a linear ramp over ``beta_warmup_epochs`` epochs counted in optimiser steps."""
        warmup = int(round(self.beta_warmup_epochs * max(progress.steps_per_epoch, 1)))
        return self.beta_max * linear_annealing(int(progress.step), warmup)

    def _scale(self, length: int) -> float:
        return length / (2.0 * math.exp(2.0 * self.log_sigma)) if self.recon_reduction == "gaussian" else 1.0

    def forward(self, model: nn.Module, batch: PretrainBatch, progress: TrainingProgress) -> dict:
        """ELBO terms on the fused posterior that z was drawn from, the alignment and balance of its experts."""
        beta = self.beta(progress)
        run = batch.forward or model
        out = run(batch.signals, mask=batch.mask, leads=batch.leads, sample=batch.sample)
        fusion = out.fusion
        log_sigma = self.lead_log_sigma()
        terms = multimodal_elbo(
            out.recon.float(), batch.target, fusion.mean.float(), fusion.log_var.float(), beta,
            mask=batch.target_mask, recon_reduction=self.recon_reduction, log_sigma=log_sigma,
        )  # fmt: skip
        zero = terms.total.new_zeros(())
        align = zero
        if self.gamma > 0:
            align = alignment_loss(fusion.expert_mean.float(), fusion.mean.float(), fusion.expert_mask, self.gamma)
        balance = zero
        gated = getattr(fusion, "gate_logits", None) is not None
        if gated and (self.gate_importance > 0 or self.gate_balance_kl > 0):
            scale = self._scale(batch.target.shape[-1])
            w, m = fusion.weights.float(), fusion.expert_mask
            balance = scale * (
                self.gate_importance * importance_loss(w, m) + self.gate_balance_kl * gate_balance_kl(w, m)
            )
        sub = (
            self._subset_term(model, fusion, batch, log_sigma) if self.subset_terms != "none" and batch.sample else zero
        )
        loss = terms.total + align + balance + self.subset_weight * sub
        result = {"loss": loss, "recon": terms.recon, "kl": terms.kl, "align": align, "balance": balance, "beta": beta}
        if self.subset_terms != "none":
            result["subset"] = sub
        result.update(self._reported_elbos(model, out, batch, log_sigma, terms.kl))
        if self.sigma_raw is not None:
            result["sigma_mean"] = torch.exp(log_sigma).mean().detach()
        result["fusion"] = fusion
        return result

    @torch.no_grad()
    def _reported_elbos(self, model: nn.Module, out, batch: PretrainBatch, log_sigma, kl: Tensor) -> dict:
        """``neg_elbo`` of the fused posterior and ``neg_elbo_poe`` of the lead experts' product (nats, beta = 1)."""
        target, mask = batch.target, batch.target_mask
        nll = gaussian_recon_nll(out.recon.float(), target, mask, log_sigma).mean()
        result = {"neg_elbo": (nll + kl).detach()}
        fusion = out.fusion
        num_leads = mask.shape[1]
        if not self.report_poe or num_leads < 2 or fusion.expert_mean.shape[0] < num_leads:
            return result
        present = fusion.expert_mask[:num_leads]
        poe_mean, poe_log_var = _product(
            fusion.expert_mean[:num_leads].float(), fusion.expert_log_var[:num_leads].float(), present
        )
        z = poe_mean
        if batch.sample:
            z = z + torch.exp(0.5 * poe_log_var) * torch.randn_like(z)
        poe_nll = gaussian_recon_nll(model.decode(z).float(), target, mask, log_sigma).mean()
        result["neg_elbo_poe"] = poe_nll + gaussian_kl(poe_mean, poe_log_var).mean()
        return result

    def _subset_term(self, model: nn.Module, fusion, batch: PretrainBatch, log_sigma: float | Tensor) -> Tensor:
        """One-draw estimate of the unimodal (MVAE) or subset (MoPoE) ELBO terms, averaged over the batch."""
        num_leads = batch.target_mask.shape[1]
        mean, log_var = fusion.expert_mean[:num_leads].float(), fusion.expert_log_var[:num_leads].float()
        present = fusion.expert_mask[:num_leads]  # (L, B)
        n_present = present.sum(0)  # (B,)
        if self.subset_terms == "unimodal":
            u = torch.rand(present.shape, device=present.device)
            pick = torch.where(present, u, torch.full_like(u, -1.0)).argmax(0)  # one present lead per sample
            chosen = nn.functional.one_hot(pick, num_leads).t().bool() & present
        else:
            chosen = uniform_subsets(present)
        sub_mean, sub_log_var = _product(mean, log_var, chosen)
        z = sub_mean + torch.exp(0.5 * sub_log_var) * torch.randn_like(sub_mean)
        recon = model.decode(z).float()
        nll = gaussian_recon_nll(recon, batch.target, batch.target_mask, log_sigma, per_lead=True)  # (B, L)
        if self.recon_reduction != "gaussian":
            nll = nll / self._scale(batch.target.shape[-1])
        kl = gaussian_kl(sub_mean, sub_log_var)
        if self.subset_terms == "unimodal":
            per_sample = ((nll * chosen.t().float()).sum(1) + kl) * n_present.float()
        else:
            per_sample = nll.sum(1) + kl
        valid = n_present > 0
        return (per_sample * valid.float()).sum() / valid.float().sum().clamp_min(1.0)


def uniform_subsets(present: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One subset per sample, uniform over the ``2^n - 1`` non-empty subsets of its n present experts.

    Exactly uniform at every n (also n = 2, 3), on the device and without a host synchronisation: per sample an
    integer r is drawn uniformly from ``1 .. 2^n - 1`` and the k-th present expert (in expert order) joins the
    subset when bit k of r is set. (A Bernoulli(1/2) draw per expert with an empty draw replaced by one expert is
    not uniform: with n = 2 it gives the two singletons 3/8 each and the pair 1/4.)

    Args:
        present: (experts, batch) bool, True = present (at most 24 present experts per sample).
        generator: torch.Generator for the draw (default: torch's global generator).

    Returns:
        (experts, batch) bool, a subset of ``present``, non-empty wherever ``present`` has a present expert.
    """
    n = present.sum(0)  # (B,)
    device = generator.device if generator is not None else present.device
    u = torch.rand(n.shape, generator=generator, device=device).to(present.device)
    count = torch.exp2(n.float()) - 1.0  # non-empty subsets
    r = (u * count).floor().clamp_max(count - 1.0).long() + 1  # 1 .. 2^n - 1
    rank = (present.long().cumsum(0) - 1).clamp_min(0)  # position of each expert among the present ones
    return present & (((r.unsqueeze(0) >> rank) & 1) == 1)


def _product(mean: Tensor, log_var: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Product of the experts selected by ``mask`` (L, B) with a N(0, I) prior: (B, D) mean and log-variance."""
    precision = torch.where(mask.unsqueeze(-1), torch.exp(-log_var), torch.zeros((), device=mean.device))
    total = precision.sum(0) + 1.0
    fused_mean = (precision * mean).sum(0) / total
    return fused_mean, -torch.log(total)


def reference_alignment(mean: Tensor, mask: Tensor | None = None, gamma: float = 0.1) -> Tensor:
    """Alignment term of the authors' code: gamma x mean over leads of MSE(mean_i, mean over leads of mean_j).

    Args:
        mean: (L, B, D) lead posterior means.
        mask: (L, B) bool, True = present; absent leads are left out of both means.
        gamma: weight.

    Returns:
        Scalar.
    """
    mean = mean.float()
    if mask is None:
        mask = torch.ones(mean.shape[:2], dtype=torch.bool, device=mean.device)
    w = mask.float().unsqueeze(-1)  # (L, B, 1)
    centre = (mean * w).sum(0) / w.sum(0).clamp_min(1.0)  # (B, D)
    sq = ((mean - centre) ** 2).mean(-1)  # (L, B)
    per_lead = (sq * mask.float()).sum(1) / mask.float().sum(1).clamp_min(1.0)  # (L,)
    present = mask.any(1)
    return gamma * per_lead[present].mean() if present.any() else mean.new_zeros(())


class ReferenceObjective(Objective):
    """The authors' published objective, composed from the model's ``encode`` / ``fuse`` / ``decode``.

    Args:
        beta: final KL weight.
        beta_warmup_epochs: beta = beta_max x min(epoch / beta_warmup_epochs, 1) (0 = no warm-up).
        gamma: weight of :func:`reference_alignment` (the authors use 0.1; 0 = off).
    """

    def __init__(self, beta: float = 1.0, beta_warmup_epochs: float = 50.0, gamma: float = 0.1) -> None:
        super().__init__()
        self.beta_max = float(beta)
        self.beta_warmup_epochs = float(beta_warmup_epochs)
        self.gamma = float(gamma)

    def beta(self, progress: TrainingProgress) -> float:
        """beta_max x min(epoch / warm-up epochs, 1): the authors' per-epoch schedule."""
        if self.beta_warmup_epochs <= 0:
            return self.beta_max
        return self.beta_max * min(progress.epoch / self.beta_warmup_epochs, 1.0)

    def forward(self, model: nn.Module, batch: PretrainBatch, progress: TrainingProgress) -> dict:
        """Summed-error reconstruction, KL of the averaged encoders and the reference alignment."""
        beta = self.beta(progress)
        mean, log_var, lead_mask = model.encode(batch.signals, leads=batch.leads, mask=batch.mask)  # (L, B, D)
        fusion = model.fuse(mean, log_var, lead_mask)
        z = fusion.mean.float()
        if batch.sample:
            z = z + torch.exp(0.5 * fusion.log_var.float()) * torch.randn_like(z)
        recon = model.decode(z)
        terms = multimodal_elbo(
            recon.float(),
            batch.target,
            fusion.mean.float(),
            fusion.log_var.float(),
            0.0,
            mask=batch.target_mask,
            recon_reduction="reference",
        )
        w = lead_mask.float().unsqueeze(-1)
        avg_mean = (mean.float() * w).sum(0) / w.sum(0).clamp_min(1.0)
        avg_log_var = (log_var.float() * w).sum(0) / w.sum(0).clamp_min(1.0)
        kl = gaussian_kl(avg_mean, avg_log_var).mean()
        align = reference_alignment(mean, lead_mask, self.gamma) if self.gamma > 0 else kl.new_zeros(())
        return {"loss": terms.recon + beta * kl + align, "recon": terms.recon, "kl": kl, "align": align, "beta": beta}


class MaskedPatchObjective(Objective):
    """Masked-patch reconstruction (ST-MEM, Na et al. 2024): the model's own masked, per-patch-normalised MSE.

    The model's ``forward(x, leads=..., mask=...)`` draws the patch mask (ratio per lead, from the global generator
    in training, which the pre-training loop reseeds per step for exact resume) and returns an output with
    ``loss``.
    """

    def forward(self, model: nn.Module, batch: PretrainBatch, progress: TrainingProgress) -> dict:
        """The masked-patch loss of one batch (absent leads are dropped tokens, never zeros)."""
        run = batch.forward or model
        out = run(batch.signals, leads=batch.leads, mask=batch.mask)
        zero = out.loss.new_zeros(())
        return {"loss": out.loss, "recon": out.loss.detach(), "kl": zero, "align": zero, "beta": 0.0}


class CapacityObjective(Objective):
    """beta-VAE with controlled capacity (Burgess et al. 2018): recon + gamma x |KL - C|, C rising linearly.

    Args:
        gamma: weight of the capacity term.
        c_max: final capacity C in nats.
        warmup_epochs: epochs over which C rises from 0 to ``c_max`` (per optimiser step).
        recon_reduction: reconstruction scale (see :func:`~kale_ext.predict.losses.multimodal_elbo`).
        sigma: the Gaussian likelihood's standard deviation per lead for ``recon_reduction="gaussian"``
            (``PRETRAIN.SIGMA``, as in :class:`ELBOObjective`).
    """

    def __init__(
        self,
        capacity_gamma: float = 3.0,
        c_max: float = 50.0,
        warmup_epochs: float = 50.0,
        recon_reduction: str = "mean",
        sigma: float = 0.3,
    ) -> None:
        super().__init__()
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.capacity_gamma = float(capacity_gamma)
        self.c_max = float(c_max)
        self.warmup_epochs = float(warmup_epochs)
        self.recon_reduction = recon_reduction
        self.log_sigma = math.log(float(sigma))

    def capacity(self, progress: TrainingProgress) -> float:
        """The capacity C (nats) at ``progress``."""
        warmup = int(round(self.warmup_epochs * max(progress.steps_per_epoch, 1)))
        return capacity_schedule(int(progress.step), self.c_max, warmup)

    def forward(self, model: nn.Module, batch: PretrainBatch, progress: TrainingProgress) -> dict:
        """Reconstruction plus the capacity-controlled KL of the (single, joint) posterior."""
        run = batch.forward or model
        out = run(batch.signals, mask=batch.mask, leads=batch.leads, sample=batch.sample)
        terms = multimodal_elbo(
            out.recon.float(), batch.target, out.fusion.mean.float(), out.fusion.log_var.float(), 0.0,
            mask=batch.target_mask, recon_reduction=self.recon_reduction, log_sigma=self.log_sigma,
        )  # fmt: skip
        cap = capacity_kl(terms.kl, self.capacity(progress), self.capacity_gamma)
        zero = terms.kl.new_zeros(())
        return {"loss": terms.recon + cap, "recon": terms.recon, "kl": terms.kl, "align": zero, "beta": 0.0}


OBJECTIVES: dict[str, type[Objective]] = {
    "elbo": ELBOObjective,
    "reference": ReferenceObjective,
    "masked_patch": MaskedPatchObjective,
    "capacity": CapacityObjective,
}


def build_objective(name: str, **kwargs) -> Objective:
    """Instantiate a registered objective by name.

    Args:
        name: a key of :data:`OBJECTIVES`.
        **kwargs: constructor arguments; those the objective does not take are left out, so a configuration can
            hand every objective the same settings (beta, gamma, capacity, ...).

    Returns:
        Objective.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    # Only the arguments the objective's own constructor names (nn.Module's *args/**kwargs do not count).
    own = cls.__init__ if "__init__" in vars(cls) else None
    accepted = set(inspect.signature(own).parameters) - {"self"} if own is not None else set()
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def objective_names() -> Sequence[str]:
    """Names of the registered objectives."""
    return tuple(OBJECTIVES)
