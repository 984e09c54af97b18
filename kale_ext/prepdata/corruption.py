"""Lead corruption for training: one lead of a record made bad the way real leads go bad.

Used as a pre-training augmentation (``PretrainModule(augment=...)``) on the model's input only, with the clean
signals kept as the reconstruction target: to reconstruct a corrupted lead the model has to rely on the clean
leads, which gives a learned gate a reason to turn a bad lead down. Works on whole batches on their device, with
a ``torch.Generator`` (or torch's global generator), and on z-scored signals (amplitudes are in units of a lead's
standard deviation).

Kinds (chosen uniformly among those enabled, one lead per corrupted record, chosen uniformly among its present
leads):

- ``"noise"``: a burst of white Gaussian noise (std ``noise_std``) over a random window of 10-50 % of the record,
  as from electrode motion or muscle;
- ``"flat"``: the lead replaced by a flat line at 0 (a lead off, a saturated amplifier after z-scoring);
- ``"wander"``: a sinusoidal baseline wander of amplitude ``wander_amplitude`` x U(0.5, 1) and 0.5-3 cycles per
  record with a random phase (breathing, sweat);
- ``"invert"``: the lead multiplied by -1 (swapped electrodes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

CORRUPTION_KINDS = ("noise", "flat", "wander", "invert")


class Corruption(NamedTuple):
    """What :func:`corrupt_leads` did.

    Attributes:
        signals: (B, L, T) the signals with the corrupted leads replaced (a new tensor; the input is not changed).
        corrupted: (B, L) bool, True for the lead that was corrupted (at most one per record).
        kind: (B,) long, the index in ``kinds`` of the corruption applied, -1 for records left clean.
    """

    signals: Tensor
    corrupted: Tensor
    kind: Tensor


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform draws on ``device`` from ``generator`` (drawn on the generator's device, then moved)."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard normal draws on ``device`` from ``generator``."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


def _check(prob: float, kinds: Sequence[str]) -> tuple[str, ...]:
    """The kinds as a tuple, after checking them and the probability (errors name the config keys)."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in CORRUPTION_KINDS]
    if not kinds or unknown:
        raise ValueError(
            f"corruption kinds {list(kinds)} are not accepted; use a non-empty subset of {CORRUPTION_KINDS} "
            "(PRETRAIN.CORRUPT_KINDS)"
        )
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"the corruption probability must be in [0, 1], got {prob} (PRETRAIN.CORRUPT_PROB)")
    return kinds


def corrupt_leads(
    signals: Tensor,
    mask: Tensor | None = None,
    prob: float = 0.5,
    kinds: Sequence[str] = CORRUPTION_KINDS,
    generator: torch.Generator | None = None,
    noise_std: float = 1.0,
    wander_amplitude: float = 2.0,
) -> Corruption:
    """Corrupt one present lead in each record with probability ``prob``.

    Args:
        signals: (B, L, T) float signals (z-scored per lead).
        mask: (B, L) bool, True = present; absent leads are never chosen. None means all present.
        prob: probability that a record gets one corrupted lead.
        kinds: the enabled kinds, a non-empty subset of :data:`CORRUPTION_KINDS`.
        generator: torch.Generator for every draw (default: torch's global generator).
        noise_std: standard deviation of the noise bursts.
        wander_amplitude: largest amplitude of the baseline wander.

    Returns:
        :class:`Corruption` (the new signals, which lead was corrupted, which kind).
    """
    kinds = _check(prob, kinds)
    if signals.dim() != 3:
        raise ValueError(f"signals must be (batch, leads, time), got {tuple(signals.shape)}")
    batch, leads, length = signals.shape
    device = signals.device
    if mask is None:
        mask = torch.ones(batch, leads, dtype=torch.bool, device=device)
    draws = _rand((batch, leads + 7), generator, device)  # every uniform draw of the call at once
    score, u = draws[:, :leads], draws[:, leads:]
    apply = (u[:, 0] < prob) & mask.any(dim=1)
    lead = torch.where(mask, score, torch.full_like(score, -1.0)).argmax(dim=1)  # uniform over present leads
    chosen = torch.nn.functional.one_hot(lead, leads).bool() & apply.unsqueeze(1)
    kind_pos = (u[:, 1] * len(kinds)).long().clamp_max(len(kinds) - 1)  # index into ``kinds``
    kind_id = torch.as_tensor([CORRUPTION_KINDS.index(k) for k in kinds], device=device)[kind_pos]  # into ALL kinds
    signal = signals.float().gather(1, lead.view(batch, 1, 1).expand(batch, 1, length)).squeeze(1)  # (B, T)
    t = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(0) / length  # (1, T) in [0, 1)
    # noise burst over [start, start + width)
    width = 0.1 + 0.4 * u[:, 2:3]
    start = (1.0 - width) * u[:, 3:4]
    window = (t >= start) & (t < start + width)
    noisy = signal + noise_std * _randn((batch, length), generator, device) * window.float()
    # baseline wander
    amplitude = wander_amplitude * (0.5 + 0.5 * u[:, 4:5])
    cycles = 0.5 + 2.5 * u[:, 5:6]
    wander = signal + amplitude * torch.sin(2.0 * math.pi * (cycles * t + u[:, 6:7]))
    candidates = torch.stack([noisy, torch.zeros_like(signal), wander, -signal])  # CORRUPTION_KINDS order
    bad = candidates.gather(0, kind_id.view(1, batch, 1).expand(1, batch, length)).squeeze(0)  # (B, T)
    out = torch.where(chosen.unsqueeze(-1), bad.unsqueeze(1).to(signals.dtype), signals)
    return Corruption(out, chosen, torch.where(apply, kind_pos, torch.full_like(kind_pos, -1)))


class LeadCorruption:
    """A training-batch augmentation: ``LeadCorruption(prob)(signals, mask) -> signals`` (see :func:`corrupt_leads`).

    Args:
        prob: probability that a record gets one corrupted lead (0 = the signals are returned unchanged).
        kinds: the enabled kinds (subset of :data:`CORRUPTION_KINDS`).
        generator: torch.Generator for the draws; None uses torch's global generator (which the pre-training loop
            reseeds per step, so a resumed run draws the same corruptions).
        noise_std: standard deviation of the noise bursts.
        wander_amplitude: largest amplitude of the baseline wander.
    """

    def __init__(
        self,
        prob: float = 0.5,
        kinds: Sequence[str] = CORRUPTION_KINDS,
        generator: torch.Generator | None = None,
        noise_std: float = 1.0,
        wander_amplitude: float = 2.0,
    ) -> None:
        self.kinds = _check(prob, kinds)  # at construction, not mid-run
        self.prob = float(prob)
        self.generator = generator
        self.noise_std = float(noise_std)
        self.wander_amplitude = float(wander_amplitude)

    def __call__(self, signals: Tensor, mask: Tensor | None = None) -> Tensor:
        """The signals with one lead corrupted in a share ``prob`` of the records."""
        if self.prob == 0:
            return signals
        return corrupt_leads(
            signals, mask, self.prob, self.kinds, self.generator, self.noise_std, self.wander_amplitude
        ).signals
