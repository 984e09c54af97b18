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
subset products as in Sutter et al.'s MoPoE-VAE; mixture averaging as in Shi et al.'s MMVAE.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import NamedTuple

import torch
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
    """

    mean: Tensor
    log_var: Tensor
    weights: Tensor
    expert_mean: Tensor
    expert_log_var: Tensor
    expert_mask: Tensor


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


class ExpertGate(nn.Module):
    """Per-sample gate over Gaussian experts, computed from the experts' own parameters.

    Design (the paper only cites Shazeer et al. 2017, so this is ours): each expert k is scored by a small MLP that
    is shared across experts and reads that expert's ``[mu_k, log sigma_k^2]`` (so the gate sees both where an expert
    puts the sample and how confident it is), plus a learned embedding of the expert's identity added to the hidden
    layer (so experts can be told apart and given different priors)::

        h_k = act(W_in [mu_k, log sigma_k^2] + e_k),   s_k = (w_out . h_k + b) / temperature

    The weights are a softmax of ``s_k`` over the experts present in that sample; absent experts get exactly 0 and
    a sample without any present expert gets all zeros. Because each score depends only on its own expert, the gate
    works unchanged for any subset of present experts (a missing lead simply drops out of the softmax), unlike a gate
    reading the concatenation of all experts, which would need placeholder inputs for missing ones.

    Shazeer et al.'s noisy top-k gating exists to route each input to a few experts and skip the others' compute,
    with noise to balance the load. Here every expert (one encoder per lead) is evaluated anyway and the mixture is
    over Gaussians, so a dense softmax gate is the right simplification: no top-k, no noise, no load-balancing loss.

    Args:
        latent_dim: D, the experts' latent size.
        num_experts: M, the number of experts (identity embeddings).
        hidden_dim: width of the shared MLP.
        temperature: divides the scores; > 1 flattens the weights, < 1 sharpens them.
        detach_inputs: stop gradients from the gate into the experts' parameters (default False).
    """

    def __init__(
        self,
        latent_dim: int,
        num_experts: int,
        hidden_dim: int = 64,
        temperature: float = 1.0,
        detach_inputs: bool = False,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}; use 1.0 for a plain softmax.")
        self.latent_dim = latent_dim
        self.num_experts = num_experts
        self.temperature = float(temperature)
        self.detach_inputs = detach_inputs
        self.input_layer = nn.Linear(2 * latent_dim, hidden_dim)
        self.expert_embedding = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.activation = nn.GELU()
        self.output_layer = nn.Linear(hidden_dim, 1)

    def forward(self, mean: Tensor, log_var: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compute the gate weights.

        Args:
            mean: (experts, batch, latent) expert means.
            log_var: (experts, batch, latent) expert log-variances.
            mask: (experts, batch) bool, True = present; None means all present.

        Returns:
            weights: (experts, batch) float32, summing to 1 over present experts, exactly 0 for absent ones.
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
        # The MLP may run in reduced precision under autocast; only the softmax needs float32.
        hidden = self.activation(self.input_layer(features) + self.expert_embedding.unsqueeze(1))
        scores = self.output_layer(hidden).squeeze(-1)
        with _float32_region(scores):
            return masked_softmax(scores.float() / self.temperature, mask, dim=0)


class HierarchicalModalityExperts(nn.Module):
    """HiME: the hierarchical modality experts fusion of LS-EMVAE, with ablation switches and the authors' variant.

    ``mode="paper"`` (default), following the paper:

    1. a shared expert = product of the present modality experts (plus N(0, I) when ``use_prior``);
    2. K = M + 1 experts, ``[modality experts..., shared expert]``, weighted per sample by an :class:`ExpertGate`
       (``gate=True``) or uniformly over the present ones (``gate=False``);
    3. the fused posterior is the moment-matched mixture (:class:`MixtureOfExperts`).

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
        gate: learn per-sample weights with :class:`ExpertGate`; if False, uniform over present experts.
        mode: "paper" or "reference".
        num_groups: number of positional groups in reference mode.
        gate_hidden_dim: hidden width of the gate's MLP.
        gate_temperature: softmax temperature of the gate.
    """

    def __init__(
        self,
        num_modalities: int,
        latent_dim: int,
        use_prior: bool = True,
        use_poe: bool = True,
        use_moe: bool = True,
        gate: bool = True,
        mode: str = "paper",
        num_groups: int = 4,
        gate_hidden_dim: int = 64,
        gate_temperature: float = 1.0,
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
        elif use_moe and gate:
            self.gate = ExpertGate(
                latent_dim, num_modalities + 1, hidden_dim=gate_hidden_dim, temperature=gate_temperature
            )

    def forward(self, mean: Tensor, log_var: Tensor, mask: Tensor | None = None) -> FusionOutput:
        """Fuse the modality experts.

        Args:
            mean: (modalities, batch, latent) expert means.
            log_var: (modalities, batch, latent) expert log-variances.
            mask: (modalities, batch) bool, True = present; None means all present.

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
        if self.gate is not None:
            weights = self.gate(expert_mean, expert_log_var, expert_mask)
        else:
            weights = _uniform_weights(expert_mask)
        with _float32_region(mean):
            fused_mean, fused_log_var = _moment_match(expert_mean, expert_log_var, weights.float(), expert_mask)
        return FusionOutput(fused_mean, fused_log_var, weights, expert_mean, expert_log_var, expert_mask)

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

    Per sample and per call, a subset size s is drawn uniformly from ``1..n`` (n = number of present experts; or
    ``min(subset_size, n)`` when ``subset_size`` is given), then s members uniformly without replacement; the fused
    posterior is their product (with the prior when ``use_prior``). This is the single-sample estimate of the
    MoPoE mixture over subsets. In eval mode the product of all present experts is used. ``expert_mask`` is the
    presence mask; ``weights`` are the precision shares of the chosen subset (0 outside it).

    Randomness comes from the ``generator`` passed to ``forward`` or, failing that, the one given at construction;
    with neither, torch's default generator is used (as dropout does).

    Args:
        use_prior: include N(0, I) in every product.
        subset_size: fixed subset size (capped at the number of present experts); None draws it uniformly.
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
            (experts, batch) bool, a subset of ``mask``, non-empty wherever ``mask`` has a present expert.
        """
        generator = generator if generator is not None else self.generator
        device = generator.device if generator is not None else mask.device
        num_experts, batch = mask.shape
        scores = torch.rand((num_experts, batch), generator=generator, device=device).to(mask.device)
        size_u = torch.rand((batch,), generator=generator, device=device).to(mask.device)
        count = mask.sum(dim=0)
        if self.subset_size is None:
            size = (size_u * count).floor().long() + 1
        else:
            size = torch.full_like(count, self.subset_size)
        size = torch.minimum(size, count)
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
