"""Fusion of Gaussian experts: product, moment-matched mixture, gate and the hierarchical HiME layer.

Every layer here takes a stack of diagonal Gaussian experts, ``mean`` and ``log_var`` of shape
``(experts, batch, latent)``, and an optional boolean ``mask`` of shape ``(experts, batch)`` (True = present).
An absent expert contributes nothing: masking it gives the same result as removing it from the stack, and its
placeholder values (zeros, NaN, anything) never reach the output or the gradients.

The layers depend on torch alone so that any project can fuse its own modalities with them (see docs/fusion.md).
The Gaussian arithmetic always runs in float32, also inside a bf16/fp16 autocast region, and every log-variance is
bounded by :func:`bound_log_var` (the one place where the bound is defined).

Method: the hierarchical modality experts (HiME) of Suvon et al., "Multimodal Lead-Specific Modeling of ECG for
Low-Cost Pulmonary Hypertension Assessment" (arXiv 2503.13470); product of experts as in Wu and Goodman's MVAE;
subset products as in Sutter et al.'s MoPoE-VAE; mixture averaging as in Shi et al.'s MMVAE; noisy top-k gating as in
Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer" (ICLR 2017).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# Bounds of every log-variance (log sigma^2). exp(+-30) = 1e13 / 1e-13 stays far from the float32 limits (and the
# bf16 range, which matches float32), so precisions, variances and their sums over a dozen experts cannot overflow,
# while no realistic posterior (sigma between 3e-7 and 3e6) is clipped.
LOG_VAR_MIN = -30.0
LOG_VAR_MAX = 30.0

_AUTOCAST_DEVICES = ("cpu", "cuda")


def bound_log_var(log_var: Tensor) -> Tensor:
    """Clamp log-variances to ``[LOG_VAR_MIN, LOG_VAR_MAX]``: the single documented bound of the package.

    A hard clamp (rather than a soft squashing) keeps values inside the range untouched, so the layers stay exact
    where they are valid; its gradient is 1 inside the closed range (the bounds included) and 0 outside. Encoders
    apply it where they emit ``log sigma^2``; the fusion layers apply it again defensively.

    Args:
        log_var: log-variances of any shape.

    Returns:
        The clamped tensor, same shape and dtype.
    """
    return log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)


def _float32_region(tensor: Tensor):
    """A context with autocast disabled on the tensor's device, so Gaussian arithmetic stays float32."""
    if tensor.device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def _prepare(mean: Tensor, log_var: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Upcast to float32, bound log-variances, default the mask and neutralise absent experts' placeholders."""
    if mean.dim() != 3 or mean.shape != log_var.shape:
        raise ValueError(
            f"mean and log_var must both be (experts, batch, latent); got {tuple(mean.shape)} and "
            f"{tuple(log_var.shape)}. Stack the experts along dim 0, e.g. torch.stack(means)."
        )
    if mask is None:
        mask = torch.ones(mean.shape[:2], dtype=torch.bool, device=mean.device)
    elif mask.shape != mean.shape[:2]:
        raise ValueError(
            f"mask must be (experts, batch) = {tuple(mean.shape[:2])}; got {tuple(mask.shape)}. "
            "A (batch, experts) mask needs .T first."
        )
    mask = mask.to(device=mean.device, dtype=torch.bool)
    present = mask.unsqueeze(-1)
    # torch.where (not multiplication) so NaN/inf placeholders of absent experts cannot leak into values or grads.
    mean = torch.where(present, mean.float(), torch.zeros((), device=mean.device))
    log_var = torch.where(present, bound_log_var(log_var.float()), torch.zeros((), device=mean.device))
    return mean, log_var, mask


def _poe(mean: Tensor, log_var: Tensor, mask: Tensor, use_prior: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Precision-weighted product in log space; inputs already prepared (float32, bounded, sanitised).

    Returns:
        mean (B, D), log_var (B, D) and the experts' shares of the total precision (M, B, D).
    """
    neg_inf = torch.tensor(float("-inf"), device=mean.device)
    # log precision of each present expert; -inf removes an absent one from every sum below.
    log_prec = torch.where(mask.unsqueeze(-1), -log_var, neg_inf)
    # The N(0, I) prior has log precision 0. Without the prior it still stands in for samples with no present
    # expert, so that those get N(0, I) instead of 0/0 = NaN.
    if use_prior:
        prior = torch.zeros_like(log_prec[:1])
    else:
        none_present = ~mask.any(dim=0)
        prior = torch.where(none_present, 0.0, neg_inf).unsqueeze(-1).expand_as(log_prec[0]).unsqueeze(0)
    all_log_prec = torch.cat([log_prec, prior], dim=0)
    # Total precision via logsumexp and the mean as a softmax over log precisions: no exp can overflow.
    log_total = torch.logsumexp(all_log_prec, dim=0)
    share = torch.softmax(all_log_prec, dim=0)
    fused_mean = (share[:-1] * mean).sum(dim=0)  # the prior's mean is 0
    return fused_mean, bound_log_var(-log_total), share[:-1]


def _weights_from_share(share: Tensor, mask: Tensor) -> Tensor:
    """Per-sample expert weights (M, B) from precision shares (M, B, D): mean over D, renormalised over present."""
    w = share.mean(dim=-1) * mask
    total = w.sum(dim=0, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(w))


def _uniform_weights(mask: Tensor) -> Tensor:
    """Uniform weights (M, B) over present experts; rows with none present are all zero."""
    w = mask.float()
    return w / w.sum(dim=0, keepdim=True).clamp_min(1.0)


class FusionOutput(NamedTuple):
    """What every fusion layer returns.

    Attributes:
        mean: (batch, latent) mean of the fused posterior.
        log_var: (batch, latent) log-variance of the fused posterior (bounded).
        weights: (K, batch) weight of each listed expert in the fused posterior; 0 for absent experts.
        expert_mean: (K, batch, latent) means of the listed experts.
        expert_log_var: (K, batch, latent) log-variances of the listed experts.
        expert_mask: (K, batch) True where the listed expert is present (takes part in the fusion).
        gate_logits: (K, batch) the gate's logits (:attr:`GateOutput.logits`, 0 for absent experts) when the
            weights come from a gating network, else None.
        gate_load: (K, batch) the gate's per-sample load (:attr:`GateOutput.load`), the input of
            :func:`kale_ext.predict.losses.load_loss`, when the weights come from a gating network, else None.
            ``weights`` and ``expert_mask`` are the inputs of :func:`kale_ext.predict.losses.importance_loss`.
    """

    mean: Tensor
    log_var: Tensor
    weights: Tensor
    expert_mean: Tensor
    expert_log_var: Tensor
    expert_mask: Tensor
    gate_logits: Tensor | None = None
    gate_load: Tensor | None = None


class ProductOfExperts(nn.Module):
    """Product of Gaussian experts (precision-weighted), optionally with a N(0, I) prior expert.

    ``1/sigma^2 = sum_k 1/sigma_k^2 (+ 1 for the prior)`` and ``mu = sigma^2 sum_k mu_k / sigma_k^2``, computed in
    float32 in log space: the total precision is a logsumexp of ``-log_var`` and the mean a softmax-weighted sum, so
    the result is exact and finite for every log-variance in ``[LOG_VAR_MIN, LOG_VAR_MAX]``.

    Absent experts are left out of the product. With ``use_prior`` a sample with no present expert gets the prior
    N(0, I). Without the prior such a sample would have no posterior at all; it gets N(0, I) too (documented fallback,
    never NaN).

    Args:
        use_prior: include a standard normal expert in every product (MVAE practice).
    """

    def __init__(self, use_prior: bool = True) -> None:
        super().__init__()
        self.use_prior = use_prior

    def forward(self, mean: Tensor, log_var: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Fuse the experts.

        Args:
            mean: (experts, batch, latent) expert means.
            log_var: (experts, batch, latent) expert log-variances.
            mask: (experts, batch) bool, True = present; None means all present.

        Returns:
            mean (batch, latent) and log_var (batch, latent) of the product, float32.
        """
        with _float32_region(mean):
            mean, log_var, mask = _prepare(mean, log_var, mask)
            fused_mean, fused_log_var, _ = _poe(mean, log_var, mask, self.use_prior)
        return fused_mean, fused_log_var


class MixtureOfExperts(nn.Module):
    """Moment-matched Gaussian of a weighted mixture of Gaussian experts.

    ``mu = sum_k w_k mu_k`` and ``sigma^2 = sum_k w_k (sigma_k^2 + mu_k^2) - mu^2``. The variance is evaluated in
    the algebraically identical form ``sum_k w_k sigma_k^2 + sum_k w_k (mu_k - mu)^2``, which is a sum of
    non-negative terms and so cannot cancel to a negative number in float32; it is still floored at
    ``exp(LOG_VAR_MIN)`` before the log. Weights of absent experts are set to zero and each row is renormalised to
    sum to 1; weights must be non-negative. A row whose weights are all zero (e.g. no expert present) gets N(0, I).
    """

    def forward(
        self, mean: Tensor, log_var: Tensor, weights: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Moment-match the mixture.

        Args:
            mean: (experts, batch, latent) expert means.
            log_var: (experts, batch, latent) expert log-variances.
            weights: (experts, batch) non-negative mixture weights (need not be normalised).
            mask: (experts, batch) bool, True = present; None means all present.

        Returns:
            mean (batch, latent) and log_var (batch, latent) of the matched Gaussian, float32.
        """
        with _float32_region(mean):
            mean, log_var, mask = _prepare(mean, log_var, mask)
            return _moment_match(mean, log_var, weights.float(), mask)


def _moment_match(mean: Tensor, log_var: Tensor, weights: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Moment matching on prepared inputs; see :class:`MixtureOfExperts`."""
    w = torch.where(mask, weights, torch.zeros((), device=weights.device))
    total = w.sum(dim=0, keepdim=True)
    empty = total <= 0  # (1, B)
    w = torch.where(empty, torch.zeros((), device=w.device), w / total.clamp_min(torch.finfo(w.dtype).tiny))
    w = w.unsqueeze(-1)
    fused_mean = (w * mean).sum(dim=0)
    spread = (w * (mean - fused_mean).square()).sum(dim=0)
    var = (w * log_var.exp()).sum(dim=0) + spread
    log_var_out = torch.log(var.clamp_min(math.exp(LOG_VAR_MIN)))
    empty = empty.squeeze(0).unsqueeze(-1)
    fused_mean = torch.where(empty, torch.zeros((), device=mean.device), fused_mean)
    log_var_out = torch.where(empty, torch.zeros((), device=mean.device), log_var_out)
    return fused_mean, bound_log_var(log_var_out)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = 0) -> Tensor:
    """Softmax over the present entries only; absent entries get exactly 0 and an all-absent slice all zeros.

    Args:
        logits: scores, e.g. (experts, batch).
        mask: bool of the same shape, True = present.
        dim: the dimension to normalise over.

    Returns:
        Probabilities of the same shape, float32, summing to 1 along ``dim`` where any entry is present.
    """
    logits = logits.float()
    any_present = mask.any(dim=dim, keepdim=True)
    # -inf gives exp(-inf) = 0 exactly; rows with nothing present are scored 0 and zeroed after, so never 0/0.
    filled = logits.masked_fill(~mask, float("-inf"))
    filled = torch.where(any_present, filled, torch.zeros((), device=logits.device))
    return torch.softmax(filled, dim=dim) * any_present


class GateOutput(NamedTuple):
    """What a gate returns: the mixture weights and what the balance losses need.

    Attributes:
        weights: (experts, batch) float32, sum to 1 over the present experts of each sample (over the selected ones
            under top-k), exactly 0 for absent (and unselected) experts; all zero where nothing is present.
        logits: (experts, batch) float32, the logits the softmax was taken of (noisy in training when the gate is
            noisy), 0 for absent experts.
        load: (experts, batch) float32, each expert's load in each sample: under top-k the smooth probability that
            it is selected (Shazeer et al.'s estimator), under dense gating its weight (see :class:`ExpertGate`);
            0 for absent experts.
    """

    weights: Tensor
    logits: Tensor
    load: Tensor


def _normal_cdf(x: Tensor) -> Tensor:
    """Standard normal CDF."""
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


def _top_k_select(logits: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k present experts of each sample and the thresholds of Shazeer et al.'s load estimator.

    Args:
        logits: (K, B) float32 logits (noisy in training).
        mask: (K, B) bool presence.
        k: number of experts to keep, 1 <= k < K.

    Returns:
        selected (K, B) bool; threshold (K, B), for each expert the k-th largest logit of the *other* present
        experts (what it must beat to be selected), and has_threshold (K, B) bool, False where fewer than k other
        experts are present (the expert is then selected whatever its logit).
    """
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    filled = torch.where(mask, logits, neg_inf)
    top = torch.topk(filled, k + 1, dim=0).values  # (k+1, B), descending; -inf where too few present
    kth, next_one = top[k - 1 : k], top[k : k + 1]
    selected = mask & (filled >= kth)
    # Excluding expert i: if i is among the top k, the k-th largest of the others is the (k+1)-th overall.
    threshold = torch.where(selected, next_one, kth)
    has_threshold = torch.isfinite(threshold)
    threshold = torch.where(has_threshold, threshold, torch.zeros((), device=logits.device))
    return selected, threshold, has_threshold


GATE_CONTEXTS = ("expert", "consensus")


def consensus_disagreement(mean: Tensor, log_var: Tensor, mask: Tensor, pool: int) -> Tensor:
    """Per expert and dimension, ``log(1 + (mu_k - m_-k)^2 / (sigma_k^2 + v_-k))`` against the leave-one-out product.

    Args:
        mean, log_var: (K, B, D) expert parameters (log-variances already bounded).
        mask: (K, B) bool, True = present.
        pool: the first ``pool`` experts form the consensus; an expert outside it is compared with all of them.

    Returns:
        (K, B, D) float32, 0 where no other present pool expert exists (and for absent experts).
    """
    mean, log_var = mean.float(), log_var.float()
    k = mean.shape[0]
    member = mask.float()  # (K, B): present pool experts
    member[pool:] = 0.0
    precision = torch.exp(-log_var) * member.unsqueeze(-1)  # 0 outside the pool and for absent experts
    others = 1.0 - torch.eye(k, device=mean.device)  # others[j, k] = 1 for j != k (sums, not differences: exact)
    other_p = torch.einsum("jk,jbd->kbd", others, precision)
    other_pm = torch.einsum("jk,jbd->kbd", others, precision * mean)
    has_other = (torch.einsum("jk,jb->kb", others, member) > 0).unsqueeze(-1)
    safe_p = torch.where(has_other, other_p, torch.ones((), device=mean.device)).clamp_min(1e-30)
    ref_mean, ref_var = other_pm / safe_p, 1.0 / safe_p
    d = torch.log1p((mean - ref_mean).square() / (torch.exp(log_var) + ref_var))
    return torch.where(has_other & mask.unsqueeze(-1), d, torch.zeros((), device=mean.device))


class ExpertGate(nn.Module):
    """Per-sample gate over Gaussian experts, computed from the experts' own parameters (Shazeer et al. 2017 style).

    Scores. Each expert k is scored by a small MLP that is shared across experts and reads that expert's
    ``[mu_k, log sigma_k^2]`` (where the expert puts the sample and how confident it is), plus a learned embedding
    of the expert's identity added to the hidden layer (so experts can be told apart and given different priors)::

        h_k = act(W_in [mu_k, log sigma_k^2] + e_k),   clean_k = (w_out . h_k + b) / temperature

    Because each score depends only on its own expert, the gate works unchanged for any subset of present experts
    (a missing lead simply drops out of the softmax), unlike a gate reading the concatenation of all experts.

    Consensus context (``context="consensus"``, an option of ours; the paper does not say what its gate reads). A
    gate that sees one expert at a time cannot tell an inverted or noisy lead from a plausible one: a lead's own
    posterior says nothing about whether it agrees with the others. With this option each expert's hidden layer also
    reads its per-dimension disagreement with the precision-weighted consensus of the OTHER present experts of the
    pool (the first ``context_pool`` experts; HiME passes its lead experts, so the shared PoE expert, itself a
    product of the leads, is compared with the leads' consensus but never counted in it)::

        m_-k = sum_{j != k} p_j mu_j / sum_{j != k} p_j,   v_-k = 1 / sum_{j != k} p_j,   p_j = 1 / sigma_j^2
        d_k = log(1 + (mu_k - m_-k)^2 / (sigma_k^2 + v_-k))        (0 when no other pool expert is present)
        h_k = act(W_in [mu_k, log sigma_k^2] + W_c d_k + e_k)

    ``W_c`` starts at zero, so an untrained consensus gate equals the plain one; it costs one leave-one-out product
    per forward pass (O(K B D)) and keeps the per-expert form, so missing experts still simply drop out.

    Noisy top-k gating (Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
    Layer", 2017). With ``noise=True``, in training mode only, the logits are
    ``H_k = clean_k + eps_k * softplus(w_noise . h_k + b_noise)``, ``eps ~ N(0, 1)`` (the noise projection reads the
    same hidden layer; it starts at zero weight, so the initial noise scale is softplus(0) = 0.69 as in the paper's
    zero initialisation). In eval mode ``H = clean``: the gate is deterministic. With ``top_k`` = k smaller than
    the number of present experts, only the k largest ``H_k`` of each sample are kept and the softmax runs over
    them (the others get exactly 0); ``top_k=None`` (default) is dense gating, a softmax over all present experts.

    Balance losses (in :mod:`kale_ext.predict.losses`). ``importance_loss(weights, mask)`` is Shazeer's
    importance loss, the squared coefficient of variation over experts of the batch sum of the weights.
    ``load_loss(load, mask, top_k)`` is his load loss, on ``GateOutput.load``: under top-k the smooth estimate
    ``P(k selected) = Phi((clean_k - threshold_k) / softplus(noise_k))`` of the probability that expert k is kept
    under a fresh draw of its noise, threshold_k being the k-th largest noisy logit of the other experts (in eval
    mode, or without noise, the 0/1 selection indicator, which has no gradient). Under dense gating every present
    expert is always selected, so selection carries no information; the load is then defined as the expected share
    of the mixture, the weight itself, and the load loss equals the importance loss (use one of the two).

    Args:
        latent_dim: D, the experts' latent size.
        num_experts: K, the number of experts (identity embeddings).
        hidden_dim: width of the shared MLP.
        temperature: divides the clean scores; > 1 flattens the weights, < 1 sharpens them.
        detach_inputs: stop gradients from the gate into the experts' parameters (default False).
        noise: noisy gating in training mode (default False: deterministic in training too).
        top_k: keep the k largest logits per sample; None (default) or k >= K is dense gating.
        generator: torch.Generator for the noise when ``forward`` gets none (None: torch's default generator).
        context: ``"expert"`` (default: each score reads its own expert only) or ``"consensus"`` (also its
            disagreement with the other experts, above).
        context_pool: the first ``context_pool`` experts form the consensus (None = all experts).

    Attributes:
        is_gate: True; how :mod:`kale_ext.interpret.gates` and HiME recognise a gating network.
    """

    is_gate = True

    def __init__(
        self,
        latent_dim: int,
        num_experts: int,
        hidden_dim: int = 64,
        temperature: float = 1.0,
        detach_inputs: bool = False,
        noise: bool = False,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        context: str = "expert",
        context_pool: int | None = None,
    ) -> None:
        super().__init__()
        if context not in GATE_CONTEXTS:
            raise ValueError(f"gate context must be one of {GATE_CONTEXTS}, got {context!r}.")
        if context_pool is not None and not 1 <= context_pool <= num_experts:
            raise ValueError(f"context_pool must be in 1..num_experts={num_experts} or None, got {context_pool}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}; use 1.0 for a plain softmax.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (dense gating), got {top_k}.")
        self.latent_dim = latent_dim
        self.num_experts = num_experts
        self.temperature = float(temperature)
        self.detach_inputs = detach_inputs
        self.noise = bool(noise)
        self.top_k = None if top_k is None or top_k >= num_experts else int(top_k)
        self.generator = generator
        self.input_layer = nn.Linear(2 * latent_dim, hidden_dim)
        self.expert_embedding = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.activation = nn.GELU()
        self.output_layer = nn.Linear(hidden_dim, 1)
        self.context = context
        self.context_pool = num_experts if context_pool is None else int(context_pool)
        self.context_layer = None
        if context == "consensus":
            self.context_layer = nn.Linear(latent_dim, hidden_dim, bias=False)
            nn.init.zeros_(self.context_layer.weight)
        self.noise_layer = None
        if self.noise:
            self.noise_layer = nn.Linear(hidden_dim, 1)
            nn.init.zeros_(self.noise_layer.weight)
            nn.init.zeros_(self.noise_layer.bias)

    def forward(
        self, mean: Tensor, log_var: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> GateOutput:
        """Compute the gate weights and the balance-loss inputs.

        Args:
            mean: (experts, batch, latent) expert means.
            log_var: (experts, batch, latent) expert log-variances.
            mask: (experts, batch) bool, True = present; None means all present.
            generator: torch.Generator for this call's noise (training with ``noise`` only).

        Returns:
            GateOutput(weights, logits, load), each (experts, batch) float32.
        """
        if mean.shape[0] != self.num_experts:
            raise ValueError(
                f"ExpertGate was built for {self.num_experts} experts but got {mean.shape[0]}; "
                "build it with num_experts equal to the stacked experts (modalities + 1 for HiME)."
            )
        with _float32_region(mean):
            mean, log_var, mask = _prepare(mean, log_var, mask)
        features = torch.cat([mean, log_var], dim=-1)
        if self.detach_inputs:
            features = features.detach()
        # The MLP may run in reduced precision under autocast; the softmax and the noise run in float32.
        pre = self.input_layer(features) + self.expert_embedding.unsqueeze(1)
        if self.context_layer is not None:
            with _float32_region(mean):
                disagreement = consensus_disagreement(mean, log_var, mask, self.context_pool)
            if self.detach_inputs:
                disagreement = disagreement.detach()
            pre = pre + self.context_layer(disagreement.to(pre.dtype))
        hidden = self.activation(pre)
        scores = self.output_layer(hidden).squeeze(-1)
        noisy = self.noise_layer is not None and self.training
        noise_logits = self.noise_layer(hidden).squeeze(-1) if noisy else None
        with _float32_region(scores):
            zero = torch.zeros((), device=scores.device)
            clean = torch.where(mask, scores.float() / self.temperature, zero)
            logits = clean
            noise_std = None
            if noisy:
                generator = generator if generator is not None else self.generator
                device = generator.device if generator is not None else clean.device
                eps = torch.randn(clean.shape, generator=generator, device=device).to(clean.device)
                noise_std = F.softplus(noise_logits.float())
                logits = torch.where(mask, clean + eps * noise_std, zero)
            if self.top_k is None:
                weights = masked_softmax(logits, mask, dim=0)
                return GateOutput(weights, logits, weights)
            selected, threshold, has_threshold = _top_k_select(logits, mask, self.top_k)
            weights = masked_softmax(logits, selected, dim=0)
            if noise_std is None:
                load = selected.float()
            else:
                # where-guarded so that samples with too few experts (always selected) send no NaN gradients.
                z = torch.where(has_threshold, (clean - threshold) / noise_std.clamp_min(1e-6), zero)
                load = torch.where(has_threshold, _normal_cdf(z), torch.ones((), device=z.device))
                load = torch.where(mask, load, zero)
            return GateOutput(weights, logits, load)


def is_gate(module: nn.Module | None) -> bool:
    """Whether a module declares itself a gating network (attribute ``is_gate = True``; the class name is irrelevant).

    Args:
        module: any module, or None.

    Returns:
        bool.
    """
    return module is not None and bool(getattr(module, "is_gate", False))


def _run_gate(
    gate: nn.Module, mean: Tensor, log_var: Tensor, mask: Tensor, generator: torch.Generator | None
) -> GateOutput:
    """Call any gate module; a plain (K, B) tensor result is taken as the weights (load = weights, logits = 0)."""
    out = gate(mean, log_var, mask) if generator is None else gate(mean, log_var, mask, generator=generator)
    if isinstance(out, Tensor):
        if out.shape != mask.shape:
            raise ValueError(
                f"the gate returned weights of shape {tuple(out.shape)}, expected (experts, batch) = "
                f"{tuple(mask.shape)}; a gate maps (K, B, D) experts to (K, B) weights or a GateOutput."
            )
        weights = torch.where(mask, out.float(), torch.zeros((), device=out.device))
        total = weights.sum(dim=0, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), 0.0)
        return GateOutput(weights, torch.zeros_like(weights), weights)
    return GateOutput(out.weights.float(), out.logits.float(), out.load.float())


class HierarchicalModalityExperts(nn.Module):
    """HiME: the hierarchical modality experts fusion of LS-EMVAE, with ablation switches and the authors' variant.

    ``mode="paper"`` (default), following the paper:

    1. a shared expert = product of the present modality experts (plus N(0, I) when ``use_prior``);
    2. K = M + 1 experts, ``[modality experts..., shared expert]``, weighted per sample by a gate
       (``gate=True``: an :class:`ExpertGate`; or any gate module passed as ``gate``) or uniformly over the present
       ones (``gate=False``);
    3. the fused posterior is the moment-matched mixture (:class:`MixtureOfExperts`).

    A gate module passed as ``gate`` is any ``nn.Module`` with the signature
    ``forward(mean (K, B, D), log_var (K, B, D), mask (K, B) bool) -> GateOutput | Tensor (K, B)`` (it is also given
    ``generator=`` when ``forward`` gets one); a plain tensor is taken as the weights (then ``gate_load`` = the
    weights and ``gate_logits`` = 0). Its weights must be non-negative; absent experts are zeroed and each sample is
    renormalised by the mixture. It should set ``is_gate = True`` so that interpretation reports its weights as
    learned. With a gate, :class:`FusionOutput` carries ``gate_logits`` and ``gate_load`` for the balance losses.

    ``use_poe=False`` keeps K = M + 1 but marks the shared expert absent (weight 0, mask False);
    ``use_moe=False`` returns the shared PoE expert itself (weights one-hot on it; the gate is then unused and not
    built). Masking a modality equals removing it from the stack.

    ``mode="reference"`` reproduces the authors' published code path: with ``use_prior`` the prior N(0, I) is
    appended as expert M (13 experts for 12 leads); the stack is cut by position into ``num_groups`` contiguous
    groups of ``(M + 1) // num_groups`` experts (M // num_groups without the prior), the leftover experts (the prior
    for 12 leads) are never used; each group is fused by a product without an extra prior, and the output is the
    arithmetic mean of the group means and of the group log-variances (not a mixture, no gate). In this mode the
    returned experts are the K = ``num_groups`` group experts, ``weights`` is uniform over the groups with at least
    one present member (``expert_mask``), and ``use_poe``/``use_moe``/``gate`` are ignored. Because groups are
    positional, masking a lead is not the same as removing it in this mode (removal shifts the groups).

    Args:
        num_modalities: M, the number of modality experts.
        latent_dim: D.
        use_prior: include N(0, I) in the shared product (paper mode) / append it as an expert (reference mode).
        use_poe: include the shared PoE expert in the mixture.
        use_moe: fuse by the gated mixture; if False, return the shared PoE expert.
        gate: True builds an :class:`ExpertGate`; False gives uniform weights over present experts; a module is used
            as the gate (signature above).
        mode: "paper" or "reference".
        num_groups: number of positional groups in reference mode.
        gate_hidden_dim: hidden width of the gate's MLP (``gate=True``).
        gate_temperature: softmax temperature of the gate (``gate=True``).
        gate_noise: noisy gating in training mode (``gate=True``; see :class:`ExpertGate`).
        gate_top_k: keep the k largest gate logits per sample; None = dense (``gate=True``).
        gate_context: what the gate reads (``gate=True``): ``"expert"`` or ``"consensus"`` (each expert's
            disagreement with the other lead experts too; see :class:`ExpertGate`).
        generator: torch.Generator for the gate's noise when ``forward`` gets none.
    """

    def __init__(
        self,
        num_modalities: int,
        latent_dim: int,
        use_prior: bool = True,
        use_poe: bool = True,
        use_moe: bool = True,
        gate: bool | nn.Module = True,
        mode: str = "paper",
        num_groups: int = 4,
        gate_hidden_dim: int = 64,
        gate_temperature: float = 1.0,
        gate_noise: bool = False,
        gate_top_k: int | None = None,
        generator: torch.Generator | None = None,
        gate_context: str = "expert",
    ) -> None:
        super().__init__()
        if mode not in ("paper", "reference"):
            raise ValueError(f"mode must be 'paper' or 'reference', got {mode!r}.")
        if mode == "paper" and not use_poe and not use_moe:
            raise ValueError("use_poe=False and use_moe=False leave no fused posterior; enable at least one.")
        self.num_modalities = num_modalities
        self.latent_dim = latent_dim
        self.use_prior = use_prior
        self.use_poe = use_poe
        self.use_moe = use_moe
        self.mode = mode
        self.num_groups = num_groups
        self.gate = None
        if mode == "reference":
            num_stacked = num_modalities + int(use_prior)
            self.group_size = num_stacked // num_groups
            if self.group_size < 1:
                raise ValueError(
                    f"reference mode needs at least num_groups={num_groups} stacked experts, got {num_stacked}; "
                    "lower num_groups."
                )
            unused = list(range(self.group_size * num_groups, num_stacked))
            if any(i < num_modalities for i in unused):
                logger.warning("reference mode: modality experts %s fall outside every group and are unused", unused)
        elif use_moe and isinstance(gate, nn.Module):
            self.gate = gate
        elif use_moe and gate:
            self.gate = ExpertGate(
                latent_dim,
                num_modalities + 1,
                hidden_dim=gate_hidden_dim,
                temperature=gate_temperature,
                noise=gate_noise,
                top_k=gate_top_k,
                generator=generator,
                context=gate_context,
                context_pool=num_modalities,
            )

    def forward(
        self, mean: Tensor, log_var: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> FusionOutput:
        """Fuse the modality experts.

        Args:
            mean: (modalities, batch, latent) expert means.
            log_var: (modalities, batch, latent) expert log-variances.
            mask: (modalities, batch) bool, True = present; None means all present.
            generator: torch.Generator for the gate's noise in this call (noisy gates in training only).

        Returns:
            FusionOutput with K = M + 1 experts (paper mode) or K = num_groups (reference mode).
        """
        if mean.shape[0] != self.num_modalities:
            raise ValueError(
                f"expected {self.num_modalities} modality experts, got {mean.shape[0]}; mark missing modalities "
                "with the mask instead of dropping them from the stack."
            )
        if self.mode == "reference":
            return self._reference(mean, log_var, mask)
        with _float32_region(mean):
            mean, log_var, mask = _prepare(mean, log_var, mask)
            shared_mean, shared_log_var, _ = _poe(mean, log_var, mask, self.use_prior)
            shared_present = torch.ones_like(mask[0]) if self.use_prior else mask.any(dim=0)
            if not self.use_poe:
                shared_present = torch.zeros_like(shared_present)
            expert_mean = torch.cat([mean, shared_mean.unsqueeze(0)], dim=0)
            expert_log_var = torch.cat([log_var, shared_log_var.unsqueeze(0)], dim=0)
            expert_mask = torch.cat([mask, shared_present.unsqueeze(0)], dim=0)
            if not self.use_moe:
                weights = torch.zeros(expert_mask.shape, device=mean.device)
                weights[-1] = shared_present.float()
                return FusionOutput(shared_mean, shared_log_var, weights, expert_mean, expert_log_var, expert_mask)
        gate_logits = gate_load = None
        if self.gate is not None:
            routed = _run_gate(self.gate, expert_mean, expert_log_var, expert_mask, generator)
            weights, gate_logits, gate_load = routed
        else:
            weights = _uniform_weights(expert_mask)
        with _float32_region(mean):
            fused_mean, fused_log_var = _moment_match(expert_mean, expert_log_var, weights.float(), expert_mask)
        return FusionOutput(
            fused_mean, fused_log_var, weights, expert_mean, expert_log_var, expert_mask, gate_logits, gate_load
        )

    def _reference(self, mean: Tensor, log_var: Tensor, mask: Tensor | None) -> FusionOutput:
        """The authors' grouped path: positional groups, a product per group, average of means and log-variances."""
        with _float32_region(mean):
            mean, log_var, mask = _prepare(mean, log_var, mask)
            if self.use_prior:
                mean = torch.cat([mean, torch.zeros_like(mean[:1])], dim=0)
                log_var = torch.cat([log_var, torch.zeros_like(log_var[:1])], dim=0)
                mask = torch.cat([mask, torch.ones_like(mask[:1])], dim=0)
            size = self.group_size
            group_means, group_log_vars, group_masks = [], [], []
            for g in range(self.num_groups):
                part = slice(g * size, (g + 1) * size)
                g_mean, g_log_var, _ = _poe(mean[part], log_var[part], mask[part], use_prior=False)
                group_means.append(g_mean)
                group_log_vars.append(g_log_var)
                group_masks.append(mask[part].any(dim=0))
            expert_mean = torch.stack(group_means)
            expert_log_var = torch.stack(group_log_vars)
            expert_mask = torch.stack(group_masks)
            weights = _uniform_weights(expert_mask)
            w = weights.unsqueeze(-1)
            # A plain average of means and of log-variances (the authors' choice), over groups with a present member.
            fused_mean = (w * expert_mean).sum(dim=0)
            fused_log_var = bound_log_var((w * expert_log_var).sum(dim=0))
        return FusionOutput(fused_mean, fused_log_var, weights, expert_mean, expert_log_var, expert_mask)


class PoEFusion(nn.Module):
    """MVAE-style fusion: the fused posterior is the product of the present experts (and the prior).

    The K = M listed experts are the inputs. ``weights`` reports each expert's share of the total precision,
    averaged over the latent dimensions and renormalised over the present experts (the prior's share left out), so it
    sums to 1 over present experts and is 0 for absent ones; it is descriptive only.

    Args:
        use_prior: include N(0, I) in the product.
    """

    def __init__(self, use_prior: bool = True) -> None:
        super().__init__()
        self.use_prior = use_prior

    def forward(self, mean: Tensor, log_var: Tensor, mask: Tensor | None = None) -> FusionOutput:
        """Fuse by product.

        Args:
            mean: (experts, batch, latent); log_var: same shape; mask: (experts, batch) bool or None.

        Returns:
            FusionOutput with K = M.
        """
        with _float32_region(mean):
            mean, log_var, mask = _prepare(mean, log_var, mask)
            fused_mean, fused_log_var, share = _poe(mean, log_var, mask, self.use_prior)
            weights = _weights_from_share(share, mask)
        return FusionOutput(fused_mean, fused_log_var, weights, mean, log_var, mask)


class MeanFusion(nn.Module):
    """MMVAE-style averaging as in the authors' baseline: the fused mean and log-variance are the averages of the
    present experts' means and log-variances (uniform weights). A sample without a present expert gets N(0, I)."""

    def forward(self, mean: Tensor, log_var: Tensor, mask: Tensor | None = None) -> FusionOutput:
        """Average the present experts.

        Args:
            mean: (experts, batch, latent); log_var: same shape; mask: (experts, batch) bool or None.

        Returns:
            FusionOutput with K = M and uniform weights over present experts.
        """
        with _float32_region(mean):
            mean, log_var, mask = _prepare(mean, log_var, mask)
            weights = _uniform_weights(mask)
            w = weights.unsqueeze(-1)
            fused_mean = (w * mean).sum(dim=0)
            fused_log_var = (w * log_var).sum(dim=0)  # all-absent rows: zeros = N(0, I)
        return FusionOutput(fused_mean, fused_log_var, weights, mean, log_var, mask)


class SubsetPoEFusion(nn.Module):
    """MoPoE-VAE-style fusion: in training, the product over one random non-empty subset of the present experts.

    The MoPoE posterior (Sutter et al. 2021) is the uniform mixture, over the non-empty subsets s of the present
    experts, of the products ``PoE(s)``. Its single-sample estimate draws one subset per sample and call, uniformly
    among the ``2^n - 1`` non-empty subsets of the n present experts: each present expert joins with probability
    1/2 independently, and draws that come out empty are redrawn (rejection), which is exactly uniform over the
    non-empty subsets. (Drawing the subset size uniformly first and then the members is *not*: it gives the full
    set probability 1/n instead of 1/(2^n - 1).) With ``subset_size`` = s the subset is instead uniform among the
    subsets of size ``min(s, n)``. The fused posterior is the product of the chosen experts (with the prior when
    ``use_prior``). In eval mode the product of all present experts is used. ``expert_mask`` is the presence mask;
    ``weights`` are the precision shares of the chosen subset (0 outside it).

    Randomness comes from the ``generator`` passed to ``forward`` or, failing that, the one given at construction;
    with neither, torch's default generator is used (as dropout does).

    Args:
        use_prior: include N(0, I) in every product.
        subset_size: fixed subset size (capped at the number of present experts); None draws a subset uniformly
            among all non-empty subsets.
        generator: default torch.Generator for the subset draws.
    """

    def __init__(
        self, use_prior: bool = True, subset_size: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if subset_size is not None and subset_size < 1:
            raise ValueError(f"subset_size must be >= 1 or None, got {subset_size}.")
        self.use_prior = use_prior
        self.subset_size = subset_size
        self.generator = generator

    def sample_subset(self, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one random non-empty subset of the present experts per sample.

        Args:
            mask: (experts, batch) bool presence.
            generator: optional torch.Generator.

        Returns:
            (experts, batch) bool, a subset of ``mask``, non-empty wherever ``mask`` has a present expert: uniform
            over the non-empty subsets, or over the subsets of size ``min(subset_size, n)``.
        """
        generator = generator if generator is not None else self.generator
        device = generator.device if generator is not None else mask.device
        num_experts, batch = mask.shape
        if self.subset_size is None:
            has_any = mask.any(dim=0)
            chosen = mask & (torch.rand((num_experts, batch), generator=generator, device=device).to(mask.device) < 0.5)
            # Rejection: redraw the samples whose draw came out empty (probability 2^-n each; the loop ends with
            # probability 1, after 1 + 2^-n / (1 - 2^-n) rounds on average for the worst sample).
            empty = has_any & ~chosen.any(dim=0)
            while bool(empty.any()):
                redraw = torch.rand((num_experts, batch), generator=generator, device=device).to(mask.device) < 0.5
                chosen = torch.where(empty.unsqueeze(0), mask & redraw, chosen)
                empty = has_any & ~chosen.any(dim=0)
            return chosen
        scores = torch.rand((num_experts, batch), generator=generator, device=device).to(mask.device)
        count = mask.sum(dim=0)
        size = torch.minimum(torch.full_like(count, self.subset_size), count)
        # Rank the present experts by a random score (absent ones last) and keep the first `size`.
        scores = scores.masked_fill(~mask, 2.0)
        rank = scores.argsort(dim=0).argsort(dim=0)
        return mask & (rank < size.unsqueeze(0))

    def forward(
        self, mean: Tensor, log_var: Tensor, mask: Tensor | None = None, generator: torch.Generator | None = None
    ) -> FusionOutput:
        """Fuse a random subset (training) or all present experts (eval).

        Args:
            mean: (experts, batch, latent); log_var: same shape; mask: (experts, batch) bool or None.
            generator: optional torch.Generator for this call's draw.

        Returns:
            FusionOutput with K = M.
        """
        with _float32_region(mean):
            mean, log_var, mask = _prepare(mean, log_var, mask)
            chosen = self.sample_subset(mask, generator) if self.training else mask
            fused_mean, fused_log_var, share = _poe(mean, log_var, chosen, self.use_prior)
            weights = _weights_from_share(share, chosen)
        return FusionOutput(fused_mean, fused_log_var, weights, mean, log_var, mask)


def all_nonempty_subsets(num_experts: int) -> Tensor:
    """Every non-empty subset of ``num_experts`` experts, as rows of a membership matrix.

    Args:
        num_experts: M (at most 20: 2^M - 1 rows).

    Returns:
        (2^M - 1, M) bool; row r is the binary expansion of r + 1 (expert 0 = least significant bit).
    """
    if not 1 <= num_experts <= 20:
        raise ValueError(
            f"num_experts must be in 1..20 for an explicit subset list, got {num_experts}; "
            "for more experts sample subsets with SubsetPoEFusion.sample_subset."
        )
    codes = torch.arange(1, 2**num_experts).unsqueeze(1)
    bits = torch.tensor([1 << m for m in range(num_experts)]).unsqueeze(0)
    return (codes & bits) != 0


def subset_products(
    mean: Tensor, log_var: Tensor, mask: Tensor | None, subsets: Tensor, use_prior: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Product-of-experts posteriors of given expert subsets: the pieces of MVAE's and MoPoE's sub-ELBOs.

    For each subset s (a row of ``subsets``) and sample b, the product of the experts that are both in s and present
    in b (with N(0, I) when ``use_prior``). ``subsets = torch.eye(M, dtype=torch.bool)`` gives the unimodal
    posteriors ``q(z | x_m) ~ q_m(z) p(z)`` of MVAE (Wu and Goodman 2018); :func:`all_nonempty_subsets` gives the
    components of the MoPoE mixture (Sutter et al. 2021). A subset none of whose members is present in a sample is
    marked absent there (``subset_mask`` False, posterior N(0, I)): leave it out of the objective.

    Args:
        mean: (experts, batch, latent) expert means.
        log_var: (experts, batch, latent) expert log-variances.
        mask: (experts, batch) bool, True = present; None means all present.
        subsets: (S, experts) bool membership.
        use_prior: include N(0, I) in every product.

    Returns:
        mean (S, batch, latent), log_var (S, batch, latent), subset_mask (S, batch) bool, float32.
    """
    with _float32_region(mean):
        mean, log_var, mask = _prepare(mean, log_var, mask)
        num_experts, batch, latent = mean.shape
        subsets = subsets.to(device=mask.device, dtype=torch.bool)
        if subsets.dim() != 2 or subsets.shape[1] != num_experts:
            raise ValueError(
                f"subsets must be (S, experts) = (S, {num_experts}) bool, got {tuple(subsets.shape)}; "
                "e.g. torch.eye(num_experts, dtype=torch.bool) for the unimodal posteriors."
            )
        num_subsets = subsets.shape[0]
        member = subsets.T.unsqueeze(-1) & mask.unsqueeze(1)  # (M, S, B)
        flat = member.reshape(num_experts, num_subsets * batch)
        rep_mean = mean.unsqueeze(1).expand(num_experts, num_subsets, batch, latent).reshape(num_experts, -1, latent)
        rep_log_var = log_var.unsqueeze(1).expand_as(mean.unsqueeze(1).expand(-1, num_subsets, -1, -1))
        rep_log_var = rep_log_var.reshape(num_experts, -1, latent)
        sub_mean, sub_log_var, _ = _poe(rep_mean, rep_log_var, flat, use_prior)
        subset_mask = member.any(dim=0)
        return (
            sub_mean.reshape(num_subsets, batch, latent),
            sub_log_var.reshape(num_subsets, batch, latent),
            subset_mask,
        )
