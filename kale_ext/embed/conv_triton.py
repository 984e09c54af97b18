"""Fused Triton kernels for the lead encoders' convolution stack and the shared decoder's tail.

Two fused paths, each a ``torch.autograd.Function`` whose forward is one Triton kernel and whose backward is one
more, recomputing the intermediate activations on chip from the inputs (only the inputs are saved):

- :func:`encoder_conv_stack`: the three Conv1d + ReLU layers of
  :class:`~kale_ext.embed.signal_cnn.LeadwiseSignalVAEEncoder` (1 -> 16 -> 32 -> 64, kernel 3, stride 2, padding 1),
  same numbers and layout as its ``_features_conv``. A forward program computes one (tile of ``W`` output times,
  sample, lead); output time ``t`` of the last layer needs layer-2 outputs at ``2t + d`` (``d`` in -1..1), layer-1
  outputs at ``4t + e`` (``e`` in -3..3) and inputs at ``8t + o`` (``o`` in -7..7). Each shifted copy is computed
  directly as a (channels, W) tile, so nothing but the features leaves the chip and no register gather is needed
  (about 1.2x the layer MACs). Backward programs own (lead, run of (sample, tile) items), keep the weight gradients
  in registers over their run and write one partial sum each (reduced in torch); the input gradient of shift ``o``
  is written to a (L, B, 15, T/8) buffer and the shifts are summed in torch (deterministic, no atomics).
- :func:`decoder_tail` / :func:`decoder_tail_sse`: the last two transposed convolutions of
  :class:`~kale_ext.embed.signal_cnn.SharedLeadDecoder` in lead mode, from the per-sample first-layer output and the
  per-lead term; a forward program owns (tile of first-layer positions, sample) and loops over the leads.
  ``decoder_tail_sse`` returns the masked summed squared error against a target and never writes the
  reconstruction. Backward programs own (tile, run of samples): each computes the full gradient of its positions
  (the output gradient, or the recomputed residual, is read on a halo of 3 + 3 samples), sums the ``h1`` gradient
  over leads in registers and adds the ``lead`` gradient into a per-run partial buffer.

Matrix products run with ``tl.dot`` on bf16/fp16 operands when the inputs (or the autocast dtype) are bf16/fp16, and
on fp32 operands (TF32 following ``torch.backends.cudnn.allow_tf32`` unless ``allow_tf32`` is given) otherwise;
every sum accumulates in fp32, and the elementwise layers (the first conv, biases, ReLUs) run in fp32. The public
functions run eagerly inside ``torch.compile`` (a graph break around the kernels).

Triton is optional and imported on first use, never at import: triton picks its compiler or its CPU interpreter
(``TRITON_INTERPRET=1``, used by the tests, slow) when it is first imported, so that variable must be set before
anything imports triton. See ``tests/embed/test_conv_triton.py`` and ``benchmarks/triton_kernels.py``.
"""

import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import List  # noqa: UP035 - torch.library.custom_op schemas need typing.List

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# triton and triton.language are imported on first use (_ensure_built), not here: triton decides between its
# compiler and its CPU interpreter when its own library functions are decorated, i.e. when triton is first
# imported, so importing this module must not import it.
triton = None
tl = None


class _ConstexprPlaceholder:
    """Stands in for ``triton.language.constexpr`` in the kernel signatures until triton is imported."""


# The kernels annotate their compile-time arguments with this name; _ensure_built rebinds it to tl.constexpr (the
# Triton compiler resolves annotations through the module globals).
constexpr = _ConstexprPlaceholder


# Raw kernel functions, wrapped with triton.jit on first use (see _ensure_built).
_RAW_KERNELS: dict[str, object] = {}
_BUILT_MODE: list[bool | None] = [None]
_EAGER: dict[str, object] = {}

# Dot-product operand modes (constexpr MODE of the kernels).
_IEEE, _TF32, _BF16, _FP16, _BF16_EMULATED, _FP16_EMULATED = 0, 1, 2, 3, 4, 5


def _kernel(fn):
    _RAW_KERNELS[fn.__name__] = fn
    return fn


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    """Whether the Triton kernels of this module can run here.

    Returns:
        True when ``triton`` imports and either a CUDA device is available or ``TRITON_INTERPRET=1`` is set (the
        interpreter runs the kernels on CPU tensors, slowly: for tests only).
    """
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def _ensure_built() -> None:
    global triton, tl
    if triton is None:
        try:
            import triton
            import triton.language as tl
        except ImportError as err:
            raise RuntimeError(
                "triton is not installed; pip install triton (Linux with CUDA) or use conv_impl 'conv'"
            ) from err
    mode = _interpreting()
    if _BUILT_MODE[0] is mode:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if mode != isinstance(tl.sum, InterpretedFunction):
        raise RuntimeError(
            "TRITON_INTERPRET changed after triton was imported; set it (1 = CPU interpreter) in the environment "
            "before anything imports triton"
        )
    globals()["constexpr"] = tl.constexpr
    for name, fn in _RAW_KERNELS.items():
        fn.__annotations__ = {
            k: tl.constexpr if v is _ConstexprPlaceholder else v for k, v in fn.__annotations__.items()
        }
        globals()[name] = triton.jit(fn)
    _BUILT_MODE[0] = mode


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {t.device}); move the model to a GPU, set TRITON_INTERPRET=1 "
            "(CPU interpreter, tests only) or use conv_impl 'conv'"
        )


def _compute_dtype(t: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype if t.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _dot_mode(dtype: torch.dtype, allow_tf32: bool | None) -> int:
    interp = _interpreting()
    if dtype == torch.bfloat16:
        return _BF16_EMULATED if interp else _BF16  # the interpreter's tl.dot mishandles bf16 operands
    if dtype == torch.float16:
        return _FP16_EMULATED if interp else _FP16
    tf32 = torch.backends.cudnn.allow_tf32 if allow_tf32 is None else allow_tf32
    return _TF32 if tf32 and not interp else _IEEE


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_pow2(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 for the Triton kernels (got {value}); use 'conv'")


# ----------------------------------------------------------------------------------------------------------------
# Kernel bodies (Triton language). Only reached through the objects _ensure_built installs under the same names.
# ----------------------------------------------------------------------------------------------------------------
# fmt: off


@_kernel
def _mm(a, b, acc, MODE: constexpr):
    # acc + a @ b with fp32 accumulation; MODE picks the operand precision.
    if MODE == 0:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif MODE == 1:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif MODE == 2:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif MODE == 3:
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif MODE == 4:
        acc = tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32), acc, input_precision="ieee")
    return acc


@_kernel
def _enc_h1(x_row, t, E, T, T1, w1_0, w1_1, w1_2, b1):
    # Layer-1 output (C1, W) at positions 4t + E (ReLU applied, zero outside [0, T1)) and its three inputs.
    p = 4 * t + E
    q = 2 * p
    x0 = tl.load(x_row + q - 1, mask=(q - 1 >= 0) & (q - 1 < T), other=0.0).to(tl.float32)
    x1 = tl.load(x_row + q, mask=(q >= 0) & (q < T), other=0.0).to(tl.float32)
    x2 = tl.load(x_row + q + 1, mask=(q + 1 >= 0) & (q + 1 < T), other=0.0).to(tl.float32)
    a = b1[:, None] + w1_0[:, None] * x0[None, :] + w1_1[:, None] * x1[None, :] + w1_2[:, None] * x2[None, :]
    valid = (p >= 0) & (p < T1)
    h = tl.where(valid[None, :] & (a > 0), a, 0.0)
    return h, x0, x1, x2


@_kernel
def _enc_w2(w2_lead, k, C1: constexpr, C2: constexpr):
    # W2[:, :, k] as (C2, C1).
    o = tl.arange(0, C2)
    i = tl.arange(0, C1)
    return tl.load(w2_lead + (o[:, None] * C1 + i[None, :]) * 3 + k).to(tl.float32)


@_kernel
def _enc_w3(w3_lead, k, C2: constexpr, C3: constexpr):
    # W3[:, :, k] as (C3, C2).
    o = tl.arange(0, C3)
    i = tl.arange(0, C2)
    return tl.load(w3_lead + (o[:, None] * C2 + i[None, :]) * 3 + k).to(tl.float32)


@_kernel
def _enc_h2(
    x_row, t, D, T, T1, T2, w1_0, w1_1, w1_2, b1, w2_lead, b2, C1: constexpr, C2: constexpr, W: constexpr,
    MODE: constexpr,
):
    # Layer-2 output (C2, W) at positions 2t + D (ReLU applied, zero outside [0, T2)).
    acc = tl.zeros((C2, W), dtype=tl.float32) + b2[:, None]
    for k in tl.static_range(3):
        h1, x0, x1, x2 = _enc_h1(x_row, t, 2 * D + k - 1, T, T1, w1_0, w1_1, w1_2, b1)
        acc = _mm(_enc_w2(w2_lead, k, C1, C2), h1, acc, MODE)
    q = 2 * t + D
    valid = (q >= 0) & (q < T2)
    return tl.where(valid[None, :] & (acc > 0), acc, 0.0)


@_kernel
def _enc_fwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr, B, L, T, T1, T2, T3,
    C1: constexpr, C2: constexpr, C3: constexpr, W: constexpr, MODE: constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    lead = tl.program_id(2)
    t = tile * W + tl.arange(0, W)
    x_row = x_ptr + (b.to(tl.int64) * L + lead) * T
    c1 = tl.arange(0, C1)
    c2 = tl.arange(0, C2)
    c3 = tl.arange(0, C3)
    w1_0 = tl.load(w1_ptr + lead * C1 * 3 + c1 * 3 + 0).to(tl.float32)
    w1_1 = tl.load(w1_ptr + lead * C1 * 3 + c1 * 3 + 1).to(tl.float32)
    w1_2 = tl.load(w1_ptr + lead * C1 * 3 + c1 * 3 + 2).to(tl.float32)
    b1 = tl.load(b1_ptr + lead * C1 + c1).to(tl.float32)
    b2 = tl.load(b2_ptr + lead * C2 + c2).to(tl.float32)
    b3 = tl.load(b3_ptr + lead * C3 + c3).to(tl.float32)
    w2_lead = w2_ptr + lead * (C2 * C1 * 3)
    w3_lead = w3_ptr + lead * (C3 * C2 * 3)
    acc = tl.zeros((C3, W), dtype=tl.float32) + b3[:, None]
    for d in tl.static_range(3):
        h2 = _enc_h2(x_row, t, d - 1, T, T1, T2, w1_0, w1_1, w1_2, b1, w2_lead, b2, C1, C2, W, MODE)
        acc = _mm(_enc_w3(w3_lead, d, C2, C3), h2, acc, MODE)
    h3 = tl.maximum(acc, 0.0)
    out = out_ptr + ((lead.to(tl.int64) * B + b) * C3 + c3[:, None]) * T3 + t[None, :]
    tl.store(out, h3.to(out_ptr.dtype.element_ty), mask=(t < T3)[None, :])


@_kernel
def _enc_l1_back(x_row, t, E, T, T1, w1_0, w1_1, w1_2, b1, g1, dw1_0, dw1_1, dw1_2, db1):
    # Backward through layer 1 at positions 4t + E given the gradient g1 (C1, W) of its output: accumulates the
    # weight/bias grads and returns the input-grad contributions q_k at x positions 8t + 2E + k - 1.
    h1, x0, x1, x2 = _enc_h1(x_row, t, E, T, T1, w1_0, w1_1, w1_2, b1)
    c1 = tl.where(h1 > 0, g1, 0.0)
    db1 += tl.sum(c1, axis=1)
    dw1_0 += tl.sum(c1 * x0[None, :], axis=1)
    dw1_1 += tl.sum(c1 * x1[None, :], axis=1)
    dw1_2 += tl.sum(c1 * x2[None, :], axis=1)
    q0 = tl.sum(w1_0[:, None] * c1, axis=0)
    q1 = tl.sum(w1_1[:, None] * c1, axis=0)
    q2 = tl.sum(w1_2[:, None] * c1, axis=0)
    return h1, q0, q1, q2, dw1_0, dw1_1, dw1_2, db1


@_kernel
def _enc_bwd_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, gout_ptr, gx_ptr,
    pw1_ptr, pb1_ptr, pw2_ptr, pb2_ptr, pw3_ptr, pb3_ptr,
    B, L, T, T1, T2, T3, n_tiles, S,
    C1: constexpr, C2: constexpr, C3: constexpr, W: constexpr, ITEMS: constexpr,
    NEED_GX: constexpr, MODE: constexpr,
):
    lead = tl.program_id(0)
    split = tl.program_id(1)
    c1 = tl.arange(0, C1)
    c2 = tl.arange(0, C2)
    c3 = tl.arange(0, C3)
    w1_0 = tl.load(w1_ptr + lead * C1 * 3 + c1 * 3 + 0).to(tl.float32)
    w1_1 = tl.load(w1_ptr + lead * C1 * 3 + c1 * 3 + 1).to(tl.float32)
    w1_2 = tl.load(w1_ptr + lead * C1 * 3 + c1 * 3 + 2).to(tl.float32)
    b1 = tl.load(b1_ptr + lead * C1 + c1).to(tl.float32)
    b2 = tl.load(b2_ptr + lead * C2 + c2).to(tl.float32)
    b3 = tl.load(b3_ptr + lead * C3 + c3).to(tl.float32)
    w2_lead = w2_ptr + lead * (C2 * C1 * 3)
    w3_lead = w3_ptr + lead * (C3 * C2 * 3)
    dw1_0 = tl.zeros((C1,), dtype=tl.float32)
    dw1_1 = tl.zeros((C1,), dtype=tl.float32)
    dw1_2 = tl.zeros((C1,), dtype=tl.float32)
    db1 = tl.zeros((C1,), dtype=tl.float32)
    dw2_0 = tl.zeros((C2, C1), dtype=tl.float32)
    dw2_1 = tl.zeros((C2, C1), dtype=tl.float32)
    dw2_2 = tl.zeros((C2, C1), dtype=tl.float32)
    db2 = tl.zeros((C2,), dtype=tl.float32)
    dw3_0 = tl.zeros((C3, C2), dtype=tl.float32)
    dw3_1 = tl.zeros((C3, C2), dtype=tl.float32)
    dw3_2 = tl.zeros((C3, C2), dtype=tl.float32)
    db3 = tl.zeros((C3,), dtype=tl.float32)
    zero2 = tl.zeros((C2, W), dtype=tl.float32)
    zero1 = tl.zeros((C1, W), dtype=tl.float32)
    for i in range(ITEMS):
        item = split * ITEMS + i
        live = item < B * n_tiles
        b = tl.minimum(item // n_tiles, B - 1)
        tile = item % n_tiles
        t = tile * W + tl.arange(0, W)
        tv = (t < T3) & live
        x_row = x_ptr + (b.to(tl.int64) * L + lead) * T
        # Forward recomputation of layers 2 and 3.
        h2m = _enc_h2(x_row, t, -1, T, T1, T2, w1_0, w1_1, w1_2, b1, w2_lead, b2, C1, C2, W, MODE)
        h20 = _enc_h2(x_row, t, 0, T, T1, T2, w1_0, w1_1, w1_2, b1, w2_lead, b2, C1, C2, W, MODE)
        h2p = _enc_h2(x_row, t, 1, T, T1, T2, w1_0, w1_1, w1_2, b1, w2_lead, b2, C1, C2, W, MODE)
        w3_0 = _enc_w3(w3_lead, 0, C2, C3)
        w3_1 = _enc_w3(w3_lead, 1, C2, C3)
        w3_2 = _enc_w3(w3_lead, 2, C2, C3)
        a3 = tl.zeros((C3, W), dtype=tl.float32) + b3[:, None]
        a3 = _mm(w3_0, h2m, a3, MODE)
        a3 = _mm(w3_1, h20, a3, MODE)
        a3 = _mm(w3_2, h2p, a3, MODE)
        g_ptr = gout_ptr + ((lead.to(tl.int64) * B + b) * C3 + c3[:, None]) * T3 + t[None, :]
        g = tl.load(g_ptr, mask=tv[None, :], other=0.0).to(tl.float32)
        ga3 = tl.where(a3 > 0, g, 0.0)
        # Layer 3.
        db3 += tl.sum(ga3, axis=1)
        dw3_0 = _mm(ga3, tl.trans(h2m), dw3_0, MODE)
        dw3_1 = _mm(ga3, tl.trans(h20), dw3_1, MODE)
        dw3_2 = _mm(ga3, tl.trans(h2p), dw3_2, MODE)
        c2m = tl.where(h2m > 0, _mm(tl.trans(w3_0), ga3, zero2, MODE), 0.0)
        c20 = tl.where(h20 > 0, _mm(tl.trans(w3_1), ga3, zero2, MODE), 0.0)
        c2p = tl.where(h2p > 0, _mm(tl.trans(w3_2), ga3, zero2, MODE), 0.0)
        # Layer 2: output 2t + D reads layer-1 outputs 4t + 2D + k - 1 through W2[:, :, k].
        db2 += tl.sum(c2m + c20 + c2p, axis=1)
        w2t_0 = tl.trans(_enc_w2(w2_lead, 0, C1, C2))
        w2t_1 = tl.trans(_enc_w2(w2_lead, 1, C1, C2))
        w2t_2 = tl.trans(_enc_w2(w2_lead, 2, C1, C2))
        # E = -3: (D=-1, k=0)
        g1 = _mm(w2t_0, c2m, zero1, MODE)
        h1, q0, q1, q2, dw1_0, dw1_1, dw1_2, db1 = _enc_l1_back(
            x_row, t, -3, T, T1, w1_0, w1_1, w1_2, b1, g1, dw1_0, dw1_1, dw1_2, db1
        )
        dw2_0 = _mm(c2m, tl.trans(h1), dw2_0, MODE)
        gx_row = gx_ptr + (lead.to(tl.int64) * B + b) * 15 * T3 + t
        if NEED_GX:
            tl.store(gx_row + 0 * T3, q0, mask=tv)  # o = -7
            tl.store(gx_row + 1 * T3, q1, mask=tv)  # o = -6
        pend = q2
        # E = -2: (D=-1, k=1)
        g1 = _mm(w2t_1, c2m, zero1, MODE)
        h1, q0, q1, q2, dw1_0, dw1_1, dw1_2, db1 = _enc_l1_back(
            x_row, t, -2, T, T1, w1_0, w1_1, w1_2, b1, g1, dw1_0, dw1_1, dw1_2, db1
        )
        dw2_1 = _mm(c2m, tl.trans(h1), dw2_1, MODE)
        if NEED_GX:
            tl.store(gx_row + 2 * T3, pend + q0, mask=tv)  # o = -5
            tl.store(gx_row + 3 * T3, q1, mask=tv)  # o = -4
        pend = q2
        # E = -1: (D=-1, k=2) and (D=0, k=0)
        g1 = _mm(w2t_2, c2m, zero1, MODE)
        g1 = _mm(w2t_0, c20, g1, MODE)
        h1, q0, q1, q2, dw1_0, dw1_1, dw1_2, db1 = _enc_l1_back(
            x_row, t, -1, T, T1, w1_0, w1_1, w1_2, b1, g1, dw1_0, dw1_1, dw1_2, db1
        )
        h1t = tl.trans(h1)
        dw2_2 = _mm(c2m, h1t, dw2_2, MODE)
        dw2_0 = _mm(c20, h1t, dw2_0, MODE)
        if NEED_GX:
            tl.store(gx_row + 4 * T3, pend + q0, mask=tv)  # o = -3
            tl.store(gx_row + 5 * T3, q1, mask=tv)  # o = -2
        pend = q2
        # E = 0: (D=0, k=1)
        g1 = _mm(w2t_1, c20, zero1, MODE)
        h1, q0, q1, q2, dw1_0, dw1_1, dw1_2, db1 = _enc_l1_back(
            x_row, t, 0, T, T1, w1_0, w1_1, w1_2, b1, g1, dw1_0, dw1_1, dw1_2, db1
        )
        dw2_1 = _mm(c20, tl.trans(h1), dw2_1, MODE)
        if NEED_GX:
            tl.store(gx_row + 6 * T3, pend + q0, mask=tv)  # o = -1
            tl.store(gx_row + 7 * T3, q1, mask=tv)  # o = 0
        pend = q2
        # E = 1: (D=0, k=2) and (D=1, k=0)
        g1 = _mm(w2t_2, c20, zero1, MODE)
        g1 = _mm(w2t_0, c2p, g1, MODE)
        h1, q0, q1, q2, dw1_0, dw1_1, dw1_2, db1 = _enc_l1_back(
            x_row, t, 1, T, T1, w1_0, w1_1, w1_2, b1, g1, dw1_0, dw1_1, dw1_2, db1
        )
        h1t = tl.trans(h1)
        dw2_2 = _mm(c20, h1t, dw2_2, MODE)
        dw2_0 = _mm(c2p, h1t, dw2_0, MODE)
        if NEED_GX:
            tl.store(gx_row + 8 * T3, pend + q0, mask=tv)  # o = 1
            tl.store(gx_row + 9 * T3, q1, mask=tv)  # o = 2
        pend = q2
        # E = 2: (D=1, k=1)
        g1 = _mm(w2t_1, c2p, zero1, MODE)
        h1, q0, q1, q2, dw1_0, dw1_1, dw1_2, db1 = _enc_l1_back(
            x_row, t, 2, T, T1, w1_0, w1_1, w1_2, b1, g1, dw1_0, dw1_1, dw1_2, db1
        )
        dw2_1 = _mm(c2p, tl.trans(h1), dw2_1, MODE)
        if NEED_GX:
            tl.store(gx_row + 10 * T3, pend + q0, mask=tv)  # o = 3
            tl.store(gx_row + 11 * T3, q1, mask=tv)  # o = 4
        pend = q2
        # E = 3: (D=1, k=2)
        g1 = _mm(w2t_2, c2p, zero1, MODE)
        h1, q0, q1, q2, dw1_0, dw1_1, dw1_2, db1 = _enc_l1_back(
            x_row, t, 3, T, T1, w1_0, w1_1, w1_2, b1, g1, dw1_0, dw1_1, dw1_2, db1
        )
        dw2_2 = _mm(c2p, tl.trans(h1), dw2_2, MODE)
        if NEED_GX:
            tl.store(gx_row + 12 * T3, pend + q0, mask=tv)  # o = 5
            tl.store(gx_row + 13 * T3, q1, mask=tv)  # o = 6
            tl.store(gx_row + 14 * T3, q2, mask=tv)  # o = 7
    # Per-program partial sums of the weight grads, reduced in torch.
    part = lead * S + split
    tl.store(pw1_ptr + (part * 3 + 0) * C1 + c1, dw1_0)
    tl.store(pw1_ptr + (part * 3 + 1) * C1 + c1, dw1_1)
    tl.store(pw1_ptr + (part * 3 + 2) * C1 + c1, dw1_2)
    tl.store(pb1_ptr + part * C1 + c1, db1)
    m21 = c2[:, None] * C1 + c1[None, :]
    tl.store(pw2_ptr + (part * 3 + 0) * (C2 * C1) + m21, dw2_0)
    tl.store(pw2_ptr + (part * 3 + 1) * (C2 * C1) + m21, dw2_1)
    tl.store(pw2_ptr + (part * 3 + 2) * (C2 * C1) + m21, dw2_2)
    tl.store(pb2_ptr + part * C2 + c2, db2)
    m32 = c3[:, None] * C2 + c2[None, :]
    tl.store(pw3_ptr + (part * 3 + 0) * (C3 * C2) + m32, dw3_0)
    tl.store(pw3_ptr + (part * 3 + 1) * (C3 * C2) + m32, dw3_1)
    tl.store(pw3_ptr + (part * 3 + 2) * (C3 * C2) + m32, dw3_2)
    tl.store(pb3_ptr + part * C3 + c3, db3)


@_kernel
def _dec_u(h1_row, lead_row, m, S, T1, C1: constexpr):
    # u = relu(h1 + lead) at positions m + S as (C1, W), zero outside [0, T1).
    p = m + S
    c = tl.arange(0, C1)
    ok = ((p >= 0) & (p < T1))[None, :]
    off = c[:, None] * T1 + p[None, :]
    a = tl.load(h1_row + off, mask=ok, other=0.0).to(tl.float32) + tl.load(lead_row + off, mask=ok, other=0.0).to(
        tl.float32
    )
    return tl.where(ok & (a > 0), a, 0.0)


@_kernel
def _dec_h1(h1_row, m, S, T1, C1: constexpr):
    # h1 (C1, W) at positions m + S, zero outside [0, T1).
    p = m + S
    c = tl.arange(0, C1)
    ok = ((p >= 0) & (p < T1))[None, :]
    return tl.load(h1_row + c[:, None] * T1 + p[None, :], mask=ok, other=0.0).to(tl.float32)


@_kernel
def _dec_u2(h1s, lead_row, m, S, T1, C1: constexpr):
    # As _dec_u with the h1 tile already loaded.
    p = m + S
    c = tl.arange(0, C1)
    ok = ((p >= 0) & (p < T1))[None, :]
    a = h1s + tl.load(lead_row + c[:, None] * T1 + p[None, :], mask=ok, other=0.0).to(tl.float32)
    return tl.where(ok & (a > 0), a, 0.0)


@_kernel
def _dec_w2(w2_ptr, k, C1: constexpr, C2: constexpr):
    # ConvTranspose weight w2[:, :, k] (layout (C1, C2, 4)) as (C2, C1).
    o = tl.arange(0, C2)
    i = tl.arange(0, C1)
    return tl.load(w2_ptr + (i[None, :] * C2 + o[:, None]) * 4 + k).to(tl.float32)


@_kernel
def _dec_v(ua, ub, wa, wb, b2, m, S, T1, C2: constexpr, W: constexpr, MODE: constexpr):
    # Layer-2 output (C2, W) after ReLU: b2 + wa @ ua + wb @ ub, zero where the phase position m + S is outside
    # [0, T1) (the even output 2(m+S) and the odd output 2(m+S)+1 exist exactly for those m + S).
    acc = tl.zeros((C2, W), dtype=tl.float32) + b2[:, None]
    acc = _mm(wa, ua, acc, MODE)
    acc = _mm(wb, ub, acc, MODE)
    p = m + S
    ok = ((p >= 0) & (p < T1))[None, :]
    return tl.where(ok & (acc > 0), acc, 0.0)


@_kernel
def _dec_out(va, vb, wa, wb, b3):
    # One output phase (W,): b3 + wa . va + wb . vb over channels.
    return tl.sum(wa[:, None] * va + wb[:, None] * vb, axis=0) + b3


@_kernel
def _dec_fwd_kernel(
    h1_ptr, lead_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, out_ptr, tgt_ptr, mask_ptr, sse_ptr,
    B, T1, T, TC, n_tiles,
    L: constexpr, C1: constexpr, C2: constexpr, W: constexpr, SSE: constexpr, MODE: constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    m = tile * W + tl.arange(0, W)
    c2 = tl.arange(0, C2)
    h1_row = h1_ptr + b.to(tl.int64) * C1 * T1
    hm = _dec_h1(h1_row, m, -1, T1, C1)
    h0 = _dec_h1(h1_row, m, 0, T1, C1)
    hp = _dec_h1(h1_row, m, 1, T1, C1)
    w2_0 = _dec_w2(w2_ptr, 0, C1, C2)
    w2_1 = _dec_w2(w2_ptr, 1, C1, C2)
    w2_2 = _dec_w2(w2_ptr, 2, C1, C2)
    w2_3 = _dec_w2(w2_ptr, 3, C1, C2)
    b2 = tl.load(b2_ptr + c2).to(tl.float32)
    w3_0 = tl.load(w3_ptr + c2 * 4 + 0).to(tl.float32)
    w3_1 = tl.load(w3_ptr + c2 * 4 + 1).to(tl.float32)
    w3_2 = tl.load(w3_ptr + c2 * 4 + 2).to(tl.float32)
    w3_3 = tl.load(w3_ptr + c2 * 4 + 3).to(tl.float32)
    b3 = tl.load(b3_ptr).to(tl.float32)
    for lead in range(L):
        lead_row = lead_ptr + lead * C1 * T1
        um = _dec_u2(hm, lead_row, m, -1, T1, C1)
        u0 = _dec_u2(h0, lead_row, m, 0, T1, C1)
        up = _dec_u2(hp, lead_row, m, 1, T1, C1)
        # Even layer-2 outputs v[2j] = W1 u[j] + W3 u[j-1]; odd v[2j+1] = W2 u[j] + W0 u[j+1].
        e0 = _dec_v(u0, um, w2_1, w2_3, b2, m, 0, T1, C2, W, MODE)
        o0 = _dec_v(u0, up, w2_2, w2_0, b2, m, 0, T1, C2, W, MODE)
        om = _dec_v(um, u0, w2_2, w2_0, b2, m, -1, T1, C2, W, MODE)
        ep = _dec_v(up, u0, w2_1, w2_3, b2, m, 1, T1, C2, W, MODE)
        # Output 4m + r.
        y0 = _dec_out(e0, om, w3_1, w3_3, b3)
        y1 = _dec_out(e0, o0, w3_2, w3_0, b3)
        y2 = _dec_out(o0, e0, w3_1, w3_3, b3)
        y3 = _dec_out(o0, ep, w3_2, w3_0, b3)
        row = (b.to(tl.int64) * L + lead) * T
        pos = 4 * m
        if SSE:
            present = tl.load(mask_ptr + b * L + lead) != 0
            k0 = (pos < TC) & present
            k1 = (pos + 1 < TC) & present
            k2 = (pos + 2 < TC) & present
            k3 = (pos + 3 < TC) & present
            d0 = tl.where(k0, y0 - tl.load(tgt_ptr + row + pos, mask=k0, other=0.0).to(tl.float32), 0.0)
            d1 = tl.where(k1, y1 - tl.load(tgt_ptr + row + pos + 1, mask=k1, other=0.0).to(tl.float32), 0.0)
            d2 = tl.where(k2, y2 - tl.load(tgt_ptr + row + pos + 2, mask=k2, other=0.0).to(tl.float32), 0.0)
            d3 = tl.where(k3, y3 - tl.load(tgt_ptr + row + pos + 3, mask=k3, other=0.0).to(tl.float32), 0.0)
            part = tl.sum(d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3, axis=0)
            tl.store(sse_ptr + (b * L + lead) * n_tiles + tile, part)
        else:
            ty = out_ptr.dtype.element_ty
            tl.store(out_ptr + row + pos, y0.to(ty), mask=pos < TC)
            tl.store(out_ptr + row + pos + 1, y1.to(ty), mask=pos + 1 < TC)
            tl.store(out_ptr + row + pos + 2, y2.to(ty), mask=pos + 2 < TC)
            tl.store(out_ptr + row + pos + 3, y3.to(ty), mask=pos + 3 < TC)


@_kernel
def _dec_grad_at(gout_ptr, tgt_ptr, row, pos, TC, ok, y, scale, SSE: constexpr):
    # Gradient of the loss w.r.t. output sample pos (W,): loaded, or 2 * scale * (y - target) for the SSE.
    k = ok & (pos >= 0) & (pos < TC)
    if SSE:
        tgt = tl.load(tgt_ptr + row + pos, mask=k, other=0.0).to(tl.float32)
        g = tl.where(k, 2.0 * scale * (y - tgt), 0.0)
    else:
        g = tl.load(gout_ptr + row + pos, mask=k, other=0.0).to(tl.float32)
    return g


@_kernel
def _dec_bwd_kernel(
    h1_ptr, lead_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, gout_ptr, tgt_ptr, mask_ptr, gsse_ptr,
    gh1_ptr, glead_ptr, pw2_ptr, pb2_ptr, pw3_ptr, pb3_ptr,
    B, T1, T, TC, n_tiles,
    L: constexpr, C1: constexpr, C2: constexpr, W: constexpr, BCH: constexpr, SSE: constexpr,
    MODE: constexpr,
):
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    m = tile * W + tl.arange(0, W)
    mv = m < T1
    c1 = tl.arange(0, C1)
    c2 = tl.arange(0, C2)
    w2_0 = _dec_w2(w2_ptr, 0, C1, C2)
    w2_1 = _dec_w2(w2_ptr, 1, C1, C2)
    w2_2 = _dec_w2(w2_ptr, 2, C1, C2)
    w2_3 = _dec_w2(w2_ptr, 3, C1, C2)
    b2 = tl.load(b2_ptr + c2).to(tl.float32)
    w3_0 = tl.load(w3_ptr + c2 * 4 + 0).to(tl.float32)
    w3_1 = tl.load(w3_ptr + c2 * 4 + 1).to(tl.float32)
    w3_2 = tl.load(w3_ptr + c2 * 4 + 2).to(tl.float32)
    w3_3 = tl.load(w3_ptr + c2 * 4 + 3).to(tl.float32)
    b3 = tl.load(b3_ptr).to(tl.float32)
    dw2_0 = tl.zeros((C1, C2), dtype=tl.float32)
    dw2_1 = tl.zeros((C1, C2), dtype=tl.float32)
    dw2_2 = tl.zeros((C1, C2), dtype=tl.float32)
    dw2_3 = tl.zeros((C1, C2), dtype=tl.float32)
    db2 = tl.zeros((C2,), dtype=tl.float32)
    dw3_0 = tl.zeros((C2,), dtype=tl.float32)
    dw3_1 = tl.zeros((C2,), dtype=tl.float32)
    dw3_2 = tl.zeros((C2,), dtype=tl.float32)
    dw3_3 = tl.zeros((C2,), dtype=tl.float32)
    db3 = tl.zeros((W,), dtype=tl.float32)
    zero1 = tl.zeros((C1, W), dtype=tl.float32)
    w2t_0 = tl.trans(w2_0)
    w2t_1 = tl.trans(w2_1)
    w2t_2 = tl.trans(w2_2)
    w2t_3 = tl.trans(w2_3)
    for i in range(BCH):
        b_raw = chunk * BCH + i
        live = b_raw < B
        b = tl.minimum(b_raw, B - 1)
        h1_row = h1_ptr + b.to(tl.int64) * C1 * T1
        hm = _dec_h1(h1_row, m, -1, T1, C1)
        h0 = _dec_h1(h1_row, m, 0, T1, C1)
        hp = _dec_h1(h1_row, m, 1, T1, C1)
        if SSE:
            hm2 = _dec_h1(h1_row, m, -2, T1, C1)
            hp2 = _dec_h1(h1_row, m, 2, T1, C1)
        gh1 = tl.zeros((C1, W), dtype=tl.float32)
        for lead in range(L):
            lead_row = lead_ptr + lead * C1 * T1
            um = _dec_u2(hm, lead_row, m, -1, T1, C1)
            u0 = _dec_u2(h0, lead_row, m, 0, T1, C1)
            up = _dec_u2(hp, lead_row, m, 1, T1, C1)
            e0 = _dec_v(u0, um, w2_1, w2_3, b2, m, 0, T1, C2, W, MODE)
            o0 = _dec_v(u0, up, w2_2, w2_0, b2, m, 0, T1, C2, W, MODE)
            om = _dec_v(um, u0, w2_2, w2_0, b2, m, -1, T1, C2, W, MODE)
            ep = _dec_v(up, u0, w2_1, w2_3, b2, m, 1, T1, C2, W, MODE)
            row = (b.to(tl.int64) * L + lead) * T
            pos = 4 * m
            scale = 0.0
            ok = live
            if SSE:
                ok = live & (tl.load(mask_ptr + b * L + lead) != 0)
                scale = tl.load(gsse_ptr + b * L + lead).to(tl.float32)
                um2 = _dec_u2(hm2, lead_row, m, -2, T1, C1)
                up2 = _dec_u2(hp2, lead_row, m, 2, T1, C1)
                emm = _dec_v(um, um2, w2_1, w2_3, b2, m, -1, T1, C2, W, MODE)
                opp = _dec_v(up, up2, w2_2, w2_0, b2, m, 1, T1, C2, W, MODE)
                ym3 = _dec_out(emm, om, w3_2, w3_0, b3)  # 4(m-1) + 1
                ym2 = _dec_out(om, emm, w3_1, w3_3, b3)  # 4(m-1) + 2
                ym1 = _dec_out(om, e0, w3_2, w3_0, b3)  # 4(m-1) + 3
                y0 = _dec_out(e0, om, w3_1, w3_3, b3)
                y1 = _dec_out(e0, o0, w3_2, w3_0, b3)
                y2 = _dec_out(o0, e0, w3_1, w3_3, b3)
                y3 = _dec_out(o0, ep, w3_2, w3_0, b3)
                y4 = _dec_out(ep, o0, w3_1, w3_3, b3)  # 4(m+1)
                y5 = _dec_out(ep, opp, w3_2, w3_0, b3)  # 4(m+1) + 1
                y6 = _dec_out(opp, ep, w3_1, w3_3, b3)  # 4(m+1) + 2
            else:
                ym3 = b3
                ym2 = b3
                ym1 = b3
                y0 = b3
                y1 = b3
                y2 = b3
                y3 = b3
                y4 = b3
                y5 = b3
                y6 = b3
            gm3 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos - 3, TC, ok, ym3, scale, SSE)
            gm2 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos - 2, TC, ok, ym2, scale, SSE)
            gm1 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos - 1, TC, ok, ym1, scale, SSE)
            g0 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos, TC, ok, y0, scale, SSE)
            g1 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos + 1, TC, ok, y1, scale, SSE)
            g2 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos + 2, TC, ok, y2, scale, SSE)
            g3 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos + 3, TC, ok, y3, scale, SSE)
            g4 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos + 4, TC, ok, y4, scale, SSE)
            g5 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos + 5, TC, ok, y5, scale, SSE)
            g6 = _dec_grad_at(gout_ptr, tgt_ptr, row, pos + 6, TC, ok, y6, scale, SSE)
            # Last layer, over the outputs 4m + r this program owns (masked gradients vanish beyond T1).
            db3 += g0 + g1 + g2 + g3
            dw3_1 += tl.sum(g0[None, :] * e0 + g2[None, :] * o0, axis=1)
            dw3_3 += tl.sum(g0[None, :] * om + g2[None, :] * e0, axis=1)
            dw3_2 += tl.sum(g1[None, :] * e0 + g3[None, :] * o0, axis=1)
            dw3_0 += tl.sum(g1[None, :] * o0 + g3[None, :] * ep, axis=1)
            # Full gradients of the layer-2 outputs v[2m-1], v[2m], v[2m+1], v[2m+2]:
            # v[p] feeds out[2p] (w1), out[2p+1] (w2), out[2p+2] (w3), out[2p-1] (w0).
            ce0 = (w3_1[:, None] * g0[None, :] + w3_2[:, None] * g1[None, :] + w3_3[:, None] * g2[None, :]
                   + w3_0[:, None] * gm1[None, :])
            co0 = (w3_1[:, None] * g2[None, :] + w3_2[:, None] * g3[None, :] + w3_3[:, None] * g4[None, :]
                   + w3_0[:, None] * g1[None, :])
            cep = (w3_1[:, None] * g4[None, :] + w3_2[:, None] * g5[None, :] + w3_3[:, None] * g6[None, :]
                   + w3_0[:, None] * g3[None, :])
            com = (w3_1[:, None] * gm2[None, :] + w3_2[:, None] * gm1[None, :] + w3_3[:, None] * g0[None, :]
                   + w3_0[:, None] * gm3[None, :])
            ce0 = tl.where(e0 > 0, ce0, 0.0)
            co0 = tl.where(o0 > 0, co0, 0.0)
            cep = tl.where(ep > 0, cep, 0.0)
            com = tl.where(om > 0, com, 0.0)
            db2 += tl.sum(ce0 + co0, axis=1)
            # v[2m] = W1^T u[m] + W3^T u[m-1]; v[2m+1] = W2^T u[m] + W0^T u[m+1]  (weights of the owned outputs).
            dw2_1 = _mm(u0, tl.trans(ce0), dw2_1, MODE)
            dw2_3 = _mm(um, tl.trans(ce0), dw2_3, MODE)
            dw2_2 = _mm(u0, tl.trans(co0), dw2_2, MODE)
            dw2_0 = _mm(up, tl.trans(co0), dw2_0, MODE)
            # u[m] feeds v[2m] (W1), v[2m+2] (W3), v[2m+1] (W2), v[2m-1] (W0).
            gu = _mm(w2t_1, ce0, zero1, MODE)
            gu = _mm(w2t_3, cep, gu, MODE)
            gu = _mm(w2t_2, co0, gu, MODE)
            gu = _mm(w2t_0, com, gu, MODE)
            gu = tl.where(u0 > 0, gu, 0.0)
            gh1 += gu
            gl_ptr = glead_ptr + ((chunk * L + lead) * C1 + c1[:, None]) * T1 + m[None, :]
            tl.atomic_add(gl_ptr, gu, mask=mv[None, :] & live)
        gh_ptr = gh1_ptr + (b.to(tl.int64) * C1 + c1[:, None]) * T1 + m[None, :]
        tl.store(gh_ptr, gh1, mask=mv[None, :] & live)
    part = chunk * n_tiles + tile
    m12 = c1[:, None] * C2 + c2[None, :]
    tl.store(pw2_ptr + (part * 4 + 0) * (C1 * C2) + m12, dw2_0)
    tl.store(pw2_ptr + (part * 4 + 1) * (C1 * C2) + m12, dw2_1)
    tl.store(pw2_ptr + (part * 4 + 2) * (C1 * C2) + m12, dw2_2)
    tl.store(pw2_ptr + (part * 4 + 3) * (C1 * C2) + m12, dw2_3)
    tl.store(pb2_ptr + part * C2 + c2, db2)
    tl.store(pw3_ptr + (part * 4 + 0) * C2 + c2, dw3_0)
    tl.store(pw3_ptr + (part * 4 + 1) * C2 + c2, dw3_1)
    tl.store(pw3_ptr + (part * 4 + 2) * C2 + c2, dw3_2)
    tl.store(pw3_ptr + (part * 4 + 3) * C2 + c2, dw3_3)
    tl.store(pb3_ptr + part, tl.sum(db3, axis=0))
# fmt: on


# ----------------------------------------------------------------------------------------------------------------
# Launchers and autograd functions.
# ----------------------------------------------------------------------------------------------------------------

# Programs a backward launch aims for (enough to fill a large GPU; per-program partial sums stay small), and the
# widest time tile. Read at each call: the tests lower them to reach several tiles and items at tiny sizes.
_TARGET_PROGRAMS = 1024
_MAX_BLOCK = 64
# (widest time tile, num_warps) per kernel. Chosen from ptxas' register report for sm_90 (see
# benchmarks/triton_kernels.py --compile-check): the forwards fit without spills at 64 x 8 warps (130-174 registers);
# the backwards hold their weight-gradient accumulators for the whole loop and use 255 registers at tile 16, with
# small spills (encoder 164 B bf16 / 524 B TF32, decoder SSE 88-192 B, decoder tail none).
_LAUNCH = {"enc_fwd": (64, 8), "enc_bwd": (16, 8), "dec_fwd": (64, 8), "dec_bwd": (16, 4)}


def _halve(n: int) -> int:
    return (n - 1) // 2 + 1


def _block(length: int, cap: int) -> int:
    return min(cap, _MAX_BLOCK, max(16, _next_pow2(length)))


def _enc_shapes(x: Tensor, conv_w: Sequence[Tensor], conv_b: Sequence[Tensor]) -> tuple[int, ...]:
    if len(conv_w) != 3 or len(conv_b) != 3:
        raise ValueError(f"the fused encoder stack has exactly 3 layers; got {len(conv_w)} weights; use 'conv'")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, leads, time); got shape {tuple(x.shape)}")
    batch, leads, length = x.shape
    c_in = 1
    for i, (w, b) in enumerate(zip(conv_w, conv_b)):
        if w.dim() != 4 or w.shape[0] != leads or w.shape[2] != c_in or w.shape[3] != 3:
            raise ValueError(
                f"conv_w[{i}] must be (leads={leads}, C_out, C_in={c_in}, 3); got {tuple(w.shape)}; pass the "
                "encoder's conv_weights (index_select the leads of x first)"
            )
        if b.shape != (leads, w.shape[1]):
            raise ValueError(f"conv_b[{i}] must be {(leads, w.shape[1])}; got {tuple(b.shape)}")
        _check_pow2(f"conv_w[{i}] output channels", w.shape[1])
        c_in = w.shape[1]
    return batch, leads, length, conv_w[0].shape[1], conv_w[1].shape[1], conv_w[2].shape[1]


def _enc_forward(x, w1, b1, w2, b2, w3, b3, mode, out_dtype):
    """Launch the fused forward (see encoder_conv_stack)."""
    batch, leads, length = x.shape
    c1, c2, c3 = w1.shape[1], w2.shape[1], w3.shape[1]
    t1 = _halve(length)
    t2 = _halve(t1)
    t3 = _halve(t2)
    out = torch.empty(leads, batch, c3 * t3, dtype=out_dtype, device=x.device)
    cap, warps = _LAUNCH["enc_fwd"]
    block = _block(t3, cap)
    grid = (_cdiv(t3, block), batch, leads)
    _enc_fwd_kernel[grid](
        x, w1, b1, w2, b2, w3, b3, out, batch, leads, length, t1, t2, t3,
        C1=c1, C2=c2, C3=c3, W=block, MODE=mode, num_warps=warps,
    )  # fmt: skip
    return out


def _enc_backward(grad_out, x, w1, b1, w2, b2, w3, b3, mode, need_gx):
    """Recompute the activations on chip and return the gradients (gx is empty when not needed)."""
    batch, leads, length = x.shape
    c1, c2, c3 = w1.shape[1], w2.shape[1], w3.shape[1]
    t1 = _halve(length)
    t2 = _halve(t1)
    t3 = _halve(t2)
    cap, warps = _LAUNCH["enc_bwd"]
    block = _block(t3, cap)
    n_tiles = _cdiv(t3, block)
    items = batch * n_tiles
    items_per_program = _next_pow2(_cdiv(items * leads, _TARGET_PROGRAMS))
    splits = _cdiv(items, items_per_program)
    f32 = dict(dtype=torch.float32, device=x.device)
    gx_buf = torch.empty(leads, batch, 15, t3, **f32) if need_gx else torch.empty(1, **f32)
    pw1 = torch.empty(leads, splits, 3, c1, **f32)
    pb1 = torch.empty(leads, splits, c1, **f32)
    pw2 = torch.empty(leads, splits, 3, c2, c1, **f32)
    pb2 = torch.empty(leads, splits, c2, **f32)
    pw3 = torch.empty(leads, splits, 3, c3, c2, **f32)
    pb3 = torch.empty(leads, splits, c3, **f32)
    _enc_bwd_kernel[(leads, splits)](
        x, w1, b1, w2, b2, w3, b3, grad_out.contiguous(), gx_buf, pw1, pb1, pw2, pb2, pw3, pb3,
        batch, leads, length, t1, t2, t3, n_tiles, splits,
        C1=c1, C2=c2, C3=c3, W=block, ITEMS=items_per_program, NEED_GX=need_gx, MODE=mode, num_warps=warps,
    )  # fmt: skip
    gx = x.new_empty(0)
    if need_gx:
        # Slot o + 7 holds the gradient of x[8t + o], o in -7..7: x[8t + r] = slot(r)[t] + slot(r - 8)[t + 1].
        gx8 = gx_buf[:, :, 7:15].clone()
        gx8[:, :, 1:, :-1] += gx_buf[:, :, 0:7, 1:]
        gx = gx8.transpose(2, 3).reshape(leads, batch, 8 * t3)[..., :length].transpose(0, 1).to(x.dtype)
    gw1 = pw1.sum(1).transpose(1, 2).unsqueeze(2).to(w1.dtype)
    gw2 = pw2.sum(1).permute(0, 2, 3, 1).to(w2.dtype)
    gw3 = pw3.sum(1).permute(0, 2, 3, 1).to(w3.dtype)
    return gx, gw1, pb1.sum(1).to(b1.dtype), gw2, pb2.sum(1).to(b2.dtype), gw3, pb3.sum(1).to(b3.dtype)


def encoder_conv_stack(
    x: Tensor, conv_w: Sequence[Tensor], conv_b: Sequence[Tensor], allow_tf32: bool | None = None
) -> Tensor:
    """The lead encoders' three Conv1d + ReLU layers as one fused Triton kernel (forward and backward).

    Same maths and output layout as ``LeadwiseSignalVAEEncoder._features_conv``: per lead ``l`` three convolutions
    (kernel 3, stride 2, padding 1) with ``conv_w[i][l]``, ``conv_b[i][l]``, ReLU after each, flattened
    channel-major. Differentiable in ``x`` and every weight and bias; the backward recomputes the activations.

    Args:
        x: (B, L, T) signals, float32, bfloat16 or float16, any T >= 1.
        conv_w: three weights (L, C1, 1, 3), (L, C2, C1, 3), (L, C3, C2, 3); C1, C2, C3 powers of two >= 16
            (the paper: 16, 32, 64).
        conv_b: three biases (L, C1), (L, C2), (L, C3).
        allow_tf32: for float32 inputs, whether the matrix products may use TF32 (None: follow
            ``torch.backends.cudnn.allow_tf32``, as ``F.conv1d`` does). Ignored for bf16/fp16.

    Returns:
        (L, B, C3 * ceil(T / 8)) features, index ``c * ceil(T / 8) + t`` per lead; dtype float32, or the autocast
        dtype / the input's half dtype.
    """
    return _encoder_conv_stack_impl(x, conv_w, conv_b, allow_tf32)


def _encoder_conv_stack_impl(
    x: Tensor, conv_w: Sequence[Tensor], conv_b: Sequence[Tensor], allow_tf32: bool | None = None
) -> Tensor:
    _enc_shapes(x, conv_w, conv_b)
    _check_device(x)
    _ensure_built()
    dtype = _compute_dtype(x)
    mode = _dot_mode(dtype, allow_tf32)
    params = [p.contiguous() for pair in zip(conv_w, conv_b) for p in pair]
    return _custom_ops()["encoder"](x.contiguous(), *params, mode, dtype)


_OPS: dict = {}


def _custom_ops() -> dict:
    """The kernels as ``torch.library`` custom operators (made at the first call, like the kernels).

    As custom operators with fake (shape) implementations and registered backward passes, ``torch.compile`` traces
    through them without a graph break (the kernels run as opaque calls inside the compiled graph).
    """
    if _OPS:
        return _OPS
    from torch.library import custom_op

    @custom_op("kale_ext::triton_encoder_stack", mutates_args=())
    def encoder(
        x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor, mode: int,
        out_dtype: torch.dtype,
    ) -> Tensor:  # fmt: skip
        _ensure_built()
        return _enc_forward(x, w1, b1, w2, b2, w3, b3, mode, out_dtype)

    @encoder.register_fake
    def _(x, w1, b1, w2, b2, w3, b3, mode, out_dtype):
        batch, leads, length = x.shape
        return x.new_empty((leads, batch, w3.shape[1] * _halve(_halve(_halve(length)))), dtype=out_dtype)

    @custom_op("kale_ext::triton_encoder_stack_backward", mutates_args=())
    def encoder_backward(
        grad: Tensor,
        x: Tensor,
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
        w3: Tensor,
        b3: Tensor,
        mode: int,
        need_gx: bool,
    ) -> List[Tensor]:  # noqa: UP006  # fmt: skip - torch.library needs typing.List
        _ensure_built()
        return list(_enc_backward(grad.contiguous(), x, w1, b1, w2, b2, w3, b3, mode, need_gx))

    @encoder_backward.register_fake
    def _(grad, x, w1, b1, w2, b2, w3, b3, mode, need_gx):
        gx = torch.empty_like(x) if need_gx else x.new_empty(0)
        return [gx, *(torch.empty_like(p) for p in (w1, b1, w2, b2, w3, b3))]

    def encoder_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7])
        ctx.mode = inputs[7]

    def encoder_grad(ctx, grad):
        x, *params = ctx.saved_tensors
        need_gx = bool(ctx.needs_input_grad[0])
        gx, *grads = encoder_backward(grad, x, *params, ctx.mode, need_gx)
        return (gx if need_gx else None, *grads, None, None)

    encoder.register_autograd(encoder_grad, setup_context=encoder_setup)

    @custom_op("kale_ext::triton_decoder_tail", mutates_args=())
    def decoder(
        h1: Tensor, lead: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor, length: int, mode: int,
        out_dtype: torch.dtype,
    ) -> Tensor:  # fmt: skip
        _ensure_built()
        batch, leads, t1 = h1.shape[0], lead.shape[0], h1.shape[2]
        alloc = torch.zeros if length > 4 * t1 else torch.empty
        out = alloc(batch, leads, length, dtype=out_dtype, device=h1.device)
        _dec_forward(h1, lead, w2, b2, w3, b3, length, mode, out, None, None, None)
        return out

    @decoder.register_fake
    def _(h1, lead, w2, b2, w3, b3, length, mode, out_dtype):
        return h1.new_empty((h1.shape[0], lead.shape[0], length), dtype=out_dtype)

    @custom_op("kale_ext::triton_decoder_tail_backward", mutates_args=())
    def decoder_backward(
        grad: Tensor, h1: Tensor, lead: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor, length: int, mode: int
    ) -> List[Tensor]:  # noqa: UP006 - torch.library needs typing.List
        _ensure_built()
        return list(_dec_backward(h1, lead, w2, b2, w3, b3, length, mode, grad.contiguous(), None, None, None))

    @decoder_backward.register_fake
    def _(grad, h1, lead, w2, b2, w3, b3, length, mode):
        return [torch.empty_like(p) for p in (h1, lead, w2, b2, w3, b3)]

    def decoder_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.length, ctx.mode = inputs[6], inputs[7]

    def decoder_grad(ctx, grad):
        grads = decoder_backward(grad, *ctx.saved_tensors, ctx.length, ctx.mode)
        return (*grads, None, None, None)

    decoder.register_autograd(decoder_grad, setup_context=decoder_setup)
    _OPS.update(encoder=encoder, decoder=decoder)
    return _OPS


def _eager(fn):
    # Run fn eagerly inside torch.compile'd code (a graph break around the kernels). torch.compiler.disable imports
    # torch._dynamo, which imports triton, so the wrapper is made at the first call, not at import (see above).
    wrapped = _EAGER.get(fn.__name__)
    if wrapped is None:
        wrapped = _EAGER[fn.__name__] = torch.compiler.disable(fn)
    return wrapped


def _dec_shapes(h1: Tensor, lead: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor) -> tuple[int, ...]:
    if h1.dim() != 3 or lead.dim() != 3 or lead.shape[1:] != h1.shape[1:]:
        raise ValueError(
            f"h1 must be (batch, C1, T1) and lead (leads, C1, T1); got {tuple(h1.shape)} and {tuple(lead.shape)}"
        )
    c1, t1 = h1.shape[1], h1.shape[2]
    if w2.dim() != 3 or w2.shape[0] != c1 or w2.shape[2] != 4:
        raise ValueError(f"w2 must be (C1={c1}, C2, 4) (ConvTranspose1d layout); got {tuple(w2.shape)}")
    c2 = w2.shape[1]
    if b2.shape != (c2,) or w3.shape != (c2, 1, 4) or b3.shape != (1,):
        raise ValueError(
            f"expected b2 ({c2},), w3 ({c2}, 1, 4), b3 (1,); "
            f"got {tuple(b2.shape)}, {tuple(w3.shape)}, {tuple(b3.shape)}"
        )
    _check_pow2("C1", c1)
    _check_pow2("C2", c2)
    return h1.shape[0], lead.shape[0], c1, c2, t1


def _dec_forward(h1, lead, w2, b2, w3, b3, length, mode, out, target, mask, sse):
    batch, leads, c1, c2, t1 = h1.shape[0], lead.shape[0], h1.shape[1], w2.shape[1], h1.shape[2]
    cap, warps = _LAUNCH["dec_fwd"]
    block = _block(t1, cap)
    n_tiles = _cdiv(t1, block)
    dummy = h1
    _dec_fwd_kernel[(n_tiles, batch)](
        h1, lead, w2, b2, w3, b3, out if out is not None else dummy, target if target is not None else dummy,
        mask if mask is not None else dummy, sse if sse is not None else dummy,
        batch, t1, length, min(length, 4 * t1), n_tiles,
        L=leads, C1=c1, C2=c2, W=block, SSE=sse is not None, MODE=mode, num_warps=warps,
    )  # fmt: skip


def _dec_backward(h1, lead, w2, b2, w3, b3, length, mode, grad_out, target, mask, grad_sse):
    batch, leads, c1, c2, t1 = h1.shape[0], lead.shape[0], h1.shape[1], w2.shape[1], h1.shape[2]
    cap, warps = _LAUNCH["dec_bwd"]
    block = _block(t1, cap)
    n_tiles = _cdiv(t1, block)
    chunks = max(1, min(batch, _cdiv(_TARGET_PROGRAMS, n_tiles)))
    per_chunk = _next_pow2(_cdiv(batch, chunks))
    chunks = _cdiv(batch, per_chunk)
    programs = chunks * n_tiles
    f32 = dict(dtype=torch.float32, device=h1.device)
    gh1 = torch.empty(batch, c1, t1, **f32)
    glead_part = torch.zeros(chunks, leads, c1, t1, **f32)
    pw2 = torch.empty(programs, 4, c1, c2, **f32)
    pb2 = torch.empty(programs, c2, **f32)
    pw3 = torch.empty(programs, 4, c2, **f32)
    pb3 = torch.empty(programs, **f32)
    sse = grad_sse is not None
    dummy = h1
    _dec_bwd_kernel[(n_tiles, chunks)](
        h1, lead, w2, b2, w3, b3, grad_out if grad_out is not None else dummy,
        target if sse else dummy, mask if sse else dummy, grad_sse if sse else dummy,
        gh1, glead_part, pw2, pb2, pw3, pb3,
        batch, t1, length, min(length, 4 * t1), n_tiles,
        L=leads, C1=c1, C2=c2, W=block, BCH=per_chunk, SSE=sse, MODE=mode, num_warps=warps,
    )  # fmt: skip
    gw2 = pw2.sum(0).permute(1, 2, 0).to(w2.dtype)
    gw3 = pw3.sum(0).t().unsqueeze(1).to(w3.dtype)
    return (
        gh1.to(h1.dtype),
        glead_part.sum(0).to(lead.dtype),
        gw2,
        pb2.sum(0).to(b2.dtype),
        gw3,
        pb3.sum().reshape(1).to(b3.dtype),
    )


class _DecoderTailSSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h1, lead, w2, b2, w3, b3, target, mask, mode):
        """Launch the fused forward (no reconstruction written); saves the inputs (see decoder_tail_sse)."""
        batch, leads, t1 = h1.shape[0], lead.shape[0], h1.shape[2]
        length = target.shape[2]
        block = _block(t1, _LAUNCH["dec_fwd"][0])
        partial = torch.empty(batch, leads, _cdiv(t1, block), dtype=torch.float32, device=h1.device)
        mask_u8 = mask.to(torch.uint8).contiguous()
        _dec_forward(h1, lead, w2, b2, w3, b3, length, mode, None, target, mask_u8, partial)
        sse = partial.sum(-1)
        if length > 4 * t1:  # zero-padded samples: the reconstruction is 0 there
            sse = sse + target[..., 4 * t1 :].float().square().sum(-1)
        ctx.save_for_backward(h1, lead, w2, b2, w3, b3, target, mask_u8)
        ctx.mode = mode
        return torch.where(mask, sse, torch.zeros_like(sse))

    @staticmethod
    def backward(ctx, grad_sse):
        """Recompute the reconstruction on chip and return the gradients of the inputs."""
        h1, lead, w2, b2, w3, b3, target, mask_u8 = ctx.saved_tensors
        grads = _dec_backward(
            h1, lead, w2, b2, w3, b3, target.shape[2], ctx.mode, None, target, mask_u8,
            grad_sse.float().contiguous(),
        )  # fmt: skip
        return (*grads, None, None, None)


def _dec_prepare(h1: Tensor, lead: Tensor, params: Sequence[Tensor], allow_tf32: bool | None):
    _check_device(h1)
    _ensure_built()
    dtype = _compute_dtype(h1)
    return dtype, _dot_mode(dtype, allow_tf32), [p.contiguous() for p in (h1, lead, *params)]


def decoder_tail(
    h1: Tensor,
    lead: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    output_dim: int,
    allow_tf32: bool | None = None,
) -> Tensor:
    """The last two transposed convolutions of the lead-mode ``SharedLeadDecoder``, fused (forward and backward).

    Per sample ``b`` and lead ``l``: ``u = relu(h1[b] + lead[l])``, ``v = relu(conv_transpose1d(u, w2, b2))``,
    ``out = conv_transpose1d(v, w3, b3)`` (kernel 4, stride 2, padding 1 each), cropped or zero-padded to
    ``output_dim`` samples. Differentiable in ``h1``, ``lead`` and the four parameters.

    Args:
        h1: (B, C1, T1) output of the first transposed convolution per sample, before its ReLU (C1 = 32 in the paper).
        lead: (L, C1, T1) the per-lead term (the first transposed convolution of ``W e_l``, without bias).
        w2: (C1, C2, 4) ``ConvTranspose1d`` weight; b2: (C2,).
        w3: (C2, 1, 4) ``ConvTranspose1d`` weight; b3: (1,).
        output_dim: samples per lead T (the decoder produces ``4 * T1``).
        allow_tf32: see :func:`encoder_conv_stack`.

    Returns:
        (B, L, T) reconstructions; float32, or the autocast dtype / the half dtype of ``h1``.
    """
    return _decoder_tail_impl(h1, lead, w2, b2, w3, b3, output_dim, allow_tf32)


def _decoder_tail_impl(
    h1: Tensor,
    lead: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    output_dim: int,
    allow_tf32: bool | None = None,
) -> Tensor:
    _dec_shapes(h1, lead, w2, b2, w3, b3)
    dtype, mode, args = _dec_prepare(h1, lead, (w2, b2, w3, b3), allow_tf32)
    return _custom_ops()["decoder"](*args, int(output_dim), mode, dtype)


def decoder_tail_sse(
    h1: Tensor,
    lead: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    target: Tensor,
    mask: Tensor,
    allow_tf32: bool | None = None,
) -> Tensor:
    """Summed squared error of :func:`decoder_tail`'s reconstruction, without writing the reconstruction.

    ``sse[b, l] = sum_t (decoder_tail(...)[b, l, t] - target[b, l, t]) ** 2`` where ``mask[b, l]`` is True, 0 where
    it is False (absent leads may hold NaN in ``target``: they are never read). The backward recomputes the
    reconstruction on chip. Differentiable in ``h1``, ``lead`` and the parameters; ``target`` gets no gradient.

    Args:
        h1: (B, C1, T1), lead: (L, C1, T1), w2: (C1, C2, 4), b2: (C2,), w3: (C2, 1, 4), b3: (1,): as in
            :func:`decoder_tail`.
        target: (B, L, T) signals; T is the output length.
        mask: (B, L) bool, True = lead present.
        allow_tf32: see :func:`encoder_conv_stack`.

    Returns:
        (B, L) float32 summed squared errors.
    """
    return _eager(_decoder_tail_sse_impl)(h1, lead, w2, b2, w3, b3, target, mask, allow_tf32)


def _decoder_tail_sse_impl(
    h1: Tensor,
    lead: Tensor,
    w2: Tensor,
    b2: Tensor,
    w3: Tensor,
    b3: Tensor,
    target: Tensor,
    mask: Tensor,
    allow_tf32: bool | None = None,
) -> Tensor:
    batch, leads, _, _, _ = _dec_shapes(h1, lead, w2, b2, w3, b3)
    if target.dim() != 3 or target.shape[:2] != (batch, leads):
        raise ValueError(f"target must be (batch={batch}, leads={leads}, T); got {tuple(target.shape)}")
    if mask.shape != (batch, leads) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {(batch, leads)}; got {mask.dtype} {tuple(mask.shape)}")
    if target.requires_grad:
        raise ValueError("decoder_tail_sse gives the target no gradient; pass target.detach()")
    dtype, mode, args = _dec_prepare(h1, lead, (w2, b2, w3, b3), allow_tf32)
    return _DecoderTailSSE.apply(*args, target.contiguous(), mask, mode)
