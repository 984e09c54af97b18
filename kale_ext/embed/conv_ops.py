"""Convolution strategies shared by the lead encoders and decoders (same maths, different kernels).

The per-lead convolutions of :mod:`kale_ext.embed.signal_cnn` can run as grouped ``Conv1d`` (``"conv"``),
height-1 channels-last grouped ``Conv2d`` (``"conv2d"``), channels-last batched matrix products (``"matmul"``) or
dense channels-last ``Conv2d`` with block-diagonal weights (``"blockdiag"``: the grouped maths plus exact zeros, so
cuDNN's dense tensor-core kernels replace its grouped ones) or fused Triton kernels (``"triton"``,
:mod:`kale_ext.embed.conv_triton`: the encoder's three convolutions of every lead in one kernel, and the decoder's
last two transposed convolutions, each recomputing its activations on chip in the backward pass). ``"auto"`` picks
per device (``resolve_conv_impl``), using the fused kernels only where their self-check passed
(:mod:`kale_ext.embed.kernel_check`).
Every strategy shares the parameters and the state dict; ``tests/embed/test_signal_cnn.py`` checks they agree.
The strategy is chosen by ``MODEL.CONV_IMPL`` in the example's configuration.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kale_ext.embed.conv_triton import triton_available
from kale_ext.embed.kernel_check import forced_conv_impl, triton_verified

CONV_IMPLS = ("auto", "conv", "conv2d", "matmul", "blockdiag", "triton")


def conv_output_length(length: int, num_layers: int = 3) -> int:
    """Length after ``num_layers`` Conv1d layers with kernel 3, stride 2, padding 1 (``ceil`` halving each).

    Args:
        length: input length T.
        num_layers: number of stride-2 layers.

    Returns:
        ``ceil(T / 2**num_layers)``.
    """
    for _ in range(num_layers):
        length = (length - 1) // 2 + 1
    return length


def uniform_init_(tensor: Tensor, fan_in: int) -> Tensor:
    """Fill ``tensor`` in place from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and return it."""
    # Same distribution as PyTorch's default Conv/Linear initialisation (kaiming_uniform with a = sqrt(5)).
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


def resolve_conv_impl(conv_impl: str, device: torch.device) -> str:
    """The implementation that ``conv_impl`` stands for on ``device``.

    ``"auto"`` is ``"triton"`` on CUDA when Triton is installed and the fused kernels passed their self-check on this
    device and these versions (:func:`kale_ext.embed.kernel_check.triton_verified`: run once, cached in memory and
    on disk; a failure logs one warning naming why), else ``"blockdiag"`` on CUDA (dense tensor-core kernels: 1.5x
    the grouped form uncompiled and 2.2x with ``torch.compile`` on an H200, see docs/models.md) and ``"conv"``
    elsewhere (grouped kernels are the fastest on CPU). The environment variable ``KALE_EXT_CONV_IMPL`` (a concrete
    name) overrides what ``"auto"`` stands for. Every other value stands for itself: ``"triton"`` forces the kernels
    without the check. All implementations share the parameters and the maths.

    Args:
        conv_impl: one of ``CONV_IMPLS``.
        device: device of the input.

    Returns:
        a concrete implementation name (never ``"auto"``).
    """
    if conv_impl != "auto":
        return conv_impl
    forced = forced_conv_impl()
    if forced is not None:
        return forced
    if device.type == "cuda":
        return "triton" if triton_available() and triton_verified(device) else "blockdiag"
    return "conv"


def check_conv_impl(conv_impl: str) -> None:
    """Raise ``ValueError`` naming the accepted values when ``conv_impl`` is not one of ``CONV_IMPLS``."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")


def block_diagonal(weight: Tensor) -> Tensor:
    """Per-lead convolution weights as one dense weight with the lead blocks on its diagonal.

    Args:
        weight: (L, C_out, C_in, k) per-lead weights (or (C_in, C_out, k) shared transposed-conv weights, see
            ``_block_diagonal_transposed``).

    Returns:
        (L * C_out, L * C_in, k): block (l, l) is ``weight[l]``, every other block is exactly zero, so a dense
        convolution with it computes the L grouped convolutions (the zeros add exact zeros). Dense convolutions with
        a few hundred channels run on the tensor cores without the grouped-convolution kernels' overheads.
    """
    leads, c_out, c_in, k = weight.shape
    eye = torch.eye(leads, dtype=weight.dtype, device=weight.device)
    return torch.einsum("lm,loik->lomik", eye, weight).reshape(leads * c_out, leads * c_in, k)


def block_diagonal_transposed(weight: Tensor, leads: int) -> Tensor:
    """A shared transposed-conv weight (C_in, C_out, k) repeated on the diagonal: (L * C_in, L * C_out, k)."""
    c_in, c_out, k = weight.shape
    eye = torch.eye(leads, dtype=weight.dtype, device=weight.device)
    return torch.einsum("lm,iok->limok", eye, weight).reshape(leads * c_in, leads * c_out, k)


def strided_conv_matmul(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Kernel-3, stride-2, padding-1 convolution per group as one batched matmul, channels-last.

    Args:
        x: (G, N, T, C_in) channels-last input.
        weight: (G, C_out, C_in, 3) in ``Conv1d`` layout.
        bias: (G, C_out).

    Returns:
        (G, N, ceil(T / 2), C_out).
    """
    groups, n, length, c_in = x.shape
    out_len = (length - 1) // 2 + 1
    # Pad one sample in front (padding=1) and enough at the back for the last window.
    x = F.pad(x, (0, 0, 1, 2 * out_len - length))
    windows = x.unfold(2, 3, 2).reshape(groups, n * out_len, c_in * 3)  # index c * 3 + k
    w = weight.permute(0, 2, 3, 1).reshape(groups, c_in * 3, -1)
    out = torch.baddbmm(bias.unsqueeze(1).to(windows.dtype), windows, w.to(windows.dtype))
    return out.view(groups, n, out_len, -1)


def transposed_conv_matmul(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``ConvTranspose1d`` with kernel 4, stride 2, padding 1 as one matmul, channels-last.

    Output sample ``2m`` receives ``x[m] W1 + x[m-1] W3`` and sample ``2m+1`` receives ``x[m] W2 + x[m+1] W0``,
    so one matmul of the windows ``[x[m-1], x[m], x[m+1]]`` with a (3 C_in, 2 C_out) matrix gives both phases.

    Args:
        x: (N, T, C_in).
        weight: (C_in, C_out, 4) in ``ConvTranspose1d`` layout.
        bias: (C_out,).

    Returns:
        (N, 2 T, C_out).
    """
    n, length, c_in = x.shape
    c_out = weight.shape[1]
    windows = F.pad(x, (0, 0, 1, 1)).unfold(1, 3, 1).reshape(n * length, c_in * 3)  # index c * 3 + j
    zero = torch.zeros_like(weight[:, :, 0])
    even = torch.stack([weight[:, :, 3], weight[:, :, 1], zero], dim=1)  # (C_in, 3, C_out)
    odd = torch.stack([zero, weight[:, :, 2], weight[:, :, 0]], dim=1)
    w = torch.stack([even, odd], dim=2).reshape(c_in * 3, 2 * c_out)
    out = torch.addmm(bias.repeat(2).to(windows.dtype), windows, w.to(windows.dtype))
    return out.view(n, 2 * length, c_out)


def fit_length(out: Tensor, length: int) -> Tensor:
    """Crop or zero-pad the last dimension of ``out`` to exactly ``length`` samples.

    Decoders produce ``2**k * ceil(T / 2**k)`` samples; this is the one place that turns them into ``T``.

    Args:
        out: (..., T') tensor.
        length: target length T.

    Returns:
        (..., T) tensor (a view when cropping).
    """
    if out.shape[-1] >= length:
        return out[..., :length]
    return F.pad(out, (0, length - out.shape[-1]))
