"""Pretext and capacity objectives of the comparison models: ST-MEM's masked-patch MSE and beta-VAE's capacity term.

- :func:`masked_patch_mse` (ST-MEM, Na et al., ICLR 2024; per-patch target normalisation as in masked autoencoders)
  is implemented in :mod:`kale_ext.embed.st_mem`, because the model computes its own loss and the embed stage may
  not import predict; it is re-exported here so that every objective can be found in this stage.
- :func:`capacity_kl` and :func:`capacity_schedule`: the controlled-capacity objective of Burgess et al.,
  "Understanding disentangling in beta-VAE" (2018): ``recon + gamma * |KL - C|`` with the target capacity ``C``
  (nats) raised linearly during training, so the posterior's information grows gradually instead of being pushed
  to zero by a large beta.

Settings:

- :data:`BURGESS_DSPRITES`: the values Burgess et al. report for dSprites: gamma = 1000, C raised linearly from 0 to
  25 nats over 100,000 iterations. There the reconstruction is a log-likelihood summed over 64 x 64 = 4096 pixels.
- :func:`ecg_capacity_settings`: our starting point for ECG, not a published value. It assumes the reconstruction
  term sums the per-lead MSE averaged over time (``multimodal_elbo(recon_reduction="mean")``), which divides a
  per-sample sum by T. Keeping Burgess's weight per data dimension (1000 / 4096, about 0.25) after that division
  gives ``gamma = 0.25 * leads`` (3 for 12 leads, 1.5 for 6). ``C_max = 50`` nats: about 5 nats per generative factor
  as in dSprites (25 nats for 5 factors), for the roughly 10 factors of an ECG (heart rate, P/QRS/T axes and
  amplitudes, intervals, noise). C is raised over the first half of training. Tune both on the validation
  reconstruction.

All objectives run in float32 and depend on torch alone.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from kale_ext.embed.st_mem import masked_patch_mse

__all__ = [
    "BURGESS_DSPRITES",
    "CapacitySettings",
    "capacity_kl",
    "capacity_schedule",
    "ecg_capacity_settings",
    "masked_patch_mse",
]


class CapacitySettings(NamedTuple):
    """Hyper-parameters of the capacity objective.

    Attributes:
        gamma: weight of ``|KL - C|``.
        c_max: final capacity C (nats).
        warmup_steps: steps over which C rises linearly from ``c_min`` to ``c_max``.
        c_min: initial capacity (nats).
    """

    gamma: float
    c_max: float
    warmup_steps: int
    c_min: float = 0.0


BURGESS_DSPRITES = CapacitySettings(gamma=1000.0, c_max=25.0, warmup_steps=100_000)


def ecg_capacity_settings(total_steps: int, leads: int = 12) -> CapacitySettings:
    """Our starting capacity settings for multi-lead ECG (see the module docstring for the reasoning).

    Args:
        total_steps: optimiser steps of the whole pre-training run; C rises over the first half.
        leads: number of leads summed in the reconstruction term.

    Returns:
        ``CapacitySettings(gamma=0.25 * leads, c_max=50.0, warmup_steps=total_steps // 2)``.
    """
    if total_steps < 0 or leads < 1:
        raise ValueError(f"total_steps must be >= 0 and leads >= 1; got {total_steps} and {leads}.")
    return CapacitySettings(gamma=0.25 * leads, c_max=50.0, warmup_steps=int(total_steps) // 2)


def capacity_schedule(step: int, c_max: float, warmup_steps: int, c_min: float = 0.0) -> float:
    """Target capacity C at a step: linear from ``c_min`` at step 0 to ``c_max`` at ``warmup_steps``, then constant.

    Args:
        step: current optimiser step (negative steps count as 0).
        c_max: final capacity (nats).
        warmup_steps: length of the ramp; <= 0 means ``c_max`` from the start.
        c_min: initial capacity (nats).

    Returns:
        C in nats.
    """
    if warmup_steps <= 0:
        return float(c_max)
    frac = min(max(step / warmup_steps, 0.0), 1.0)
    return float(c_min + (c_max - c_min) * frac)


def capacity_kl(kl: Tensor, capacity: float, gamma: float) -> Tensor:
    """Capacity term ``gamma * |KL - C|`` of Burgess et al. (2018), on the batch-mean KL.

    Args:
        kl: scalar batch-mean KL, or (batch,) per-sample KL (each summed over the latent dimensions), in nats;
            a vector is averaged over the batch first.
        capacity: target C in nats (e.g. from :func:`capacity_schedule`).
        gamma: weight.

    Returns:
        Scalar float32 tensor (add it to the reconstruction term in place of ``beta * KL``).
    """
    kl = kl.float()
    if kl.dim() > 1:
        raise ValueError(f"kl must be a scalar or (batch,) per-sample KL; got shape {tuple(kl.shape)}.")
    return gamma * (kl.mean() - capacity).abs()
