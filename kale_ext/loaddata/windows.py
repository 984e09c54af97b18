"""Fixed-length windows of lead signals: random crops for pre-training, every window of a record for features.

Windowed pre-training trains on a fresh random crop of every record at every step; features of a whole record are
computed from every window of it. Both live here so the loaders, the feature extractors and the benchmarks crop the
same way.

Shapes: ``x`` is ``(batch, leads, time)``; a window of length ``W`` starting at ``s`` is ``x[..., s : s + W]``.
"""

from __future__ import annotations

import torch


def check_window(window: int, length: int) -> int:
    """The window length to use for records of ``length`` samples (0 = the whole record).

    Args:
        window: requested window in samples; 0 means the whole record.
        length: samples per lead of the records.

    Returns:
        ``window`` when ``0 < window <= length``, ``length`` when ``window == 0``.

    Raises:
        ValueError: negative windows or windows longer than the records, with the fix named.
    """
    window, length = int(window), int(length)
    if window < 0:
        raise ValueError(f"window = {window} is not accepted; use 0 (whole records) or a positive number of samples")
    if window > length:
        raise ValueError(
            f"window = {window} samples is longer than the records ({length} samples); use PRETRAIN.WINDOW "
            f"<= {length} or 0 for whole records"
        )
    return window or length


def random_starts(
    batch: int, length: int, window: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Uniform random start of one window per sample, every start in ``[0, length - window]`` equally likely.

    Args:
        batch: number of samples.
        length: samples per lead of the records.
        window: window length (``<= length``).
        generator: optional torch generator (CPU) for reproducible draws.
        device: device of the returned tensor.

    Returns:
        (batch,) int64 starts.
    """
    high = int(length) - int(window) + 1
    starts = torch.randint(0, max(high, 1), (int(batch),), generator=generator)
    return starts.to(device) if device is not None else starts


def crop(x: torch.Tensor, starts: torch.Tensor, window: int) -> torch.Tensor:
    """One window per sample: ``out[b] = x[b, :, starts[b] : starts[b] + window]``.

    Args:
        x: (batch, leads, time) signals.
        starts: (batch,) int64 window starts.
        window: window length.

    Returns:
        (batch, leads, window) tensor (a gather: a copy, not a view).
    """
    if window == x.shape[-1]:
        return x
    offsets = torch.arange(window, device=x.device)
    index = (starts.to(x.device).view(-1, 1) + offsets.view(1, -1)).view(x.shape[0], 1, window)
    return torch.gather(x, 2, index.expand(x.shape[0], x.shape[1], window))


def random_crop(x: torch.Tensor, window: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh uniform random window of every sample (whole records when ``window`` is 0 or the full length)."""
    window = check_window(window, x.shape[-1])
    if window == x.shape[-1]:
        return x
    return crop(x, random_starts(x.shape[0], x.shape[-1], window, generator, x.device), window)


def window_starts(length: int, window: int, stride: int = 0) -> list[int]:
    """Starts of the windows that cover a record: every ``stride`` samples, the last one flush with the end.

    Args:
        length: samples per lead.
        window: window length (0 = the whole record: one window).
        stride: step between starts; 0 = ``window`` (non-overlapping tiles).

    Returns:
        Sorted distinct starts; together the windows cover every sample of the record.
    """
    window = check_window(window, length)
    stride = int(stride) or window
    if stride <= 0:
        raise ValueError(f"stride = {stride} is not accepted; use a positive number of samples or 0 (= window)")
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def all_windows(x: torch.Tensor, window: int, stride: int = 0) -> torch.Tensor:
    """Every window of every record, stacked window-major.

    Args:
        x: (batch, leads, time).
        window: window length (0 = whole records).
        stride: see :func:`window_starts`.

    Returns:
        (n_windows, batch, leads, window) tensor.
    """
    window = check_window(window, x.shape[-1])
    return torch.stack([x[..., s : s + window] for s in window_starts(x.shape[-1], window, stride)])
