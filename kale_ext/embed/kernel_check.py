"""Self-check of the fused Triton kernels before ``conv_impl="auto"`` trusts them on a device.

``auto`` would pick the fused kernels of :mod:`kale_ext.embed.conv_triton` on every CUDA device with Triton, yet a
miscompiled or wrong kernel would silently become every user's default. So the first time ``auto`` would choose
them on a device, :func:`triton_verdict` runs each fused function (encoder stack, decoder tail, decoder tail SSE)
forward and backward on a small batch whose length is a multiple of no tile or stride, in float32 (IEEE products)
and under bfloat16 autocast, and compares the outputs and every gradient with float64 torch on the CPU. The verdict
is cached in memory and on disk, keyed by the device (name, compute capability), the torch, triton and kale_ext
versions and a digest of the kernel source; on a mismatch or an exception ``auto`` falls back to the torch path
(``"blockdiag"``, the measured best on CUDA) with one warning naming why.

Forcing: ``conv_impl="triton"`` (``MODEL.CONV_IMPL triton``) uses the kernels without the check; ``"blockdiag"``,
``"conv"``, ``"conv2d"``, ``"matmul"`` force a torch path. The environment variable ``KALE_EXT_CONV_IMPL`` (one
of those names) overrides what ``auto`` stands for, without editing a configuration. ``KALE_EXT_CACHE_DIR`` names
the verdict folder (default ``$XDG_CACHE_HOME/kale_ext``, else ``~/.cache/kale_ext``); an unwritable folder only
means the check reruns in the next process. Delete ``triton_check.json`` there to rerun a check.

Under the CPU interpreter (``TRITON_INTERPRET=1``, tests) the check runs on CPU tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kale_ext.embed import conv_triton

logger = logging.getLogger(__name__)

ENV_CONV_IMPL = "KALE_EXT_CONV_IMPL"
ENV_CACHE_DIR = "KALE_EXT_CACHE_DIR"
CACHE_FILE = "triton_check.json"
KERNEL_NAMES = ("encoder_conv_stack", "decoder_tail", "decoder_tail_sse")
# Largest accepted norm of the error relative to the norm of the float64 reference, per compute dtype. float32 runs
# with IEEE products: a correct kernel is within ~2e-7, so 1e-4 catches any logic error (indexing, halos, masks).
# bfloat16 rounds every product operand, intermediate activations included: correct kernels reach ~0.10 on the
# SSE gradients (measured under the interpreter; the SSE kernel agrees with decoder_tail + torch's SSE to 0.3%),
# so 0.2 only catches a broken low-precision path (garbage, NaN, a wrong operand mode).
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 0.2}

# Check shapes: batch 3, 2 leads, T = 45 (odd; ceil(T/8) = 6 is no power of two), decoder T1 = 12 (crop 48 -> 45).
_BATCH, _LEADS, _LENGTH, _T1 = 3, 2, 45, 12


@dataclass(frozen=True)
class KernelVerdict:
    """The outcome of one self-check of the fused kernels on one device.

    Attributes:
        ok: True when every kernel matched torch within ``TOLERANCES`` and raised nothing.
        reason: why the check failed ("" when ``ok``): the kernel, dtype, tensor and error, or the exception.
        key: device and versions the verdict holds for (see :func:`verdict_key`).
        errors: relative error per ``"<kernel> <dtype> <tensor>"`` that was compared.
    """

    ok: bool
    reason: str
    key: str
    errors: dict[str, float] = field(default_factory=dict)


_VERDICTS: dict[str, KernelVerdict] = {}
# The same verdicts by (device type, index): one dict lookup on the hot path of every forward.
_BY_DEVICE: dict[tuple[str, int | None], bool] = {}
_WARNED: set[str] = set()


def _check_device(device: torch.device) -> torch.device:
    # Where the check's tensors live: the device itself, or the CPU under the interpreter.
    if conv_triton._interpreting() or device.type != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def _source_digest() -> str:
    try:
        return hashlib.sha256(Path(conv_triton.__file__).read_bytes()).hexdigest()[:12]
    except OSError:
        return "unknown"


def verdict_key(device: torch.device) -> str:
    """The cache key of a verdict: device name and capability, torch, triton and kale_ext versions, kernel digest.

    Args:
        device: the device ``auto`` would run the kernels on.

    Returns:
        a string such as ``"NVIDIA H100 80GB HBM3|sm_90|torch 2.6.0|triton 3.2.0|kale_ext 0.1.0|src 1a2b..."``.
    """
    import kale_ext

    run = _check_device(device)
    if run.type == "cuda":
        major, minor = torch.cuda.get_device_capability(run)
        name, capability = torch.cuda.get_device_name(run), f"sm_{major}{minor}"
    else:
        name, capability = "triton-interpreter", "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return "|".join(
        (name, capability, f"torch {torch.__version__}", f"triton {triton_version}",
         f"kale_ext {kale_ext.__version__}", f"src {_source_digest()}")
    )  # fmt: skip


def cache_dir() -> Path:
    """The folder of the on-disk verdicts: ``$KALE_EXT_CACHE_DIR``, else ``$XDG_CACHE_HOME/kale_ext``, else
    ``~/.cache/kale_ext``."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kale_ext"


def _read_disk() -> dict:
    try:
        data = json.loads((cache_dir() / CACHE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_disk(verdict: KernelVerdict) -> None:
    # Best effort: an unwritable or read-only cache only means the check reruns in the next process.
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        data = _read_disk()
        data[verdict.key] = asdict(verdict)
        tmp = folder / f"{CACHE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(folder / CACHE_FILE)
    except OSError as error:
        logger.debug("could not write the Triton self-check verdict to %s: %s", cache_dir(), error)


def _rel_err(got: Tensor | None, ref: Tensor) -> float:
    if got is None:
        return float("inf")
    ref = ref.detach().double().cpu()
    got = got.detach().double().cpu()
    if got.shape != ref.shape:
        return float("inf")
    # Norm-wise relative error: robust to the few ReLUs whose sign bf16 rounding flips, large for any wrong kernel.
    return float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12))


def _encoder_reference(x: Tensor, ws: Sequence[Tensor], bs: Sequence[Tensor]) -> Tensor:
    leads, h = x.shape[1], x
    for w, b in zip(ws, bs):
        h = F.relu(F.conv1d(h, w.reshape(-1, w.shape[2], 3), b.reshape(-1), stride=2, padding=1, groups=leads))
    return h.reshape(h.shape[0], leads, -1).transpose(0, 1)


def _decoder_reference(h1, lead, w2, b2, w3, b3, length: int) -> Tensor:
    batch, leads = h1.shape[0], lead.shape[0]
    u = F.relu(h1[:, None] + lead[None]).flatten(0, 1)
    v = F.relu(F.conv_transpose1d(u, w2, b2, stride=2, padding=1))
    out = F.conv_transpose1d(v, w3, b3, stride=2, padding=1).reshape(batch, leads, -1)
    return out[..., :length] if out.shape[-1] >= length else F.pad(out, (0, length - out.shape[-1]))


def _inputs(gen: torch.Generator) -> dict[str, list[Tensor]]:
    # float64 CPU tensors; rounded to float32 once so the reference sees the kernel's exact inputs.
    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, dtype=torch.float64, generator=gen)).float().double()

    enc, c_in = [rnd(_BATCH, _LEADS, _LENGTH)], 1
    for c in (16, 32, 64):
        enc += [rnd(_LEADS, c, c_in, 3, scale=(3 * c_in) ** -0.5), rnd(_LEADS, c, scale=0.2)]
        c_in = c
    dec = [rnd(_BATCH, 32, _T1), rnd(_LEADS, 32, _T1, scale=0.5), rnd(32, 16, 4, scale=1 / 8), rnd(16, scale=0.1),
           rnd(16, 1, 4, scale=0.25), rnd(1, scale=0.1)]  # fmt: skip
    target = rnd(_BATCH, _LEADS, _LENGTH)
    mask = torch.ones(_BATCH, _LEADS, dtype=torch.bool)
    mask[0, 1] = False
    target[~mask] = float("nan")  # absent leads may hold NaN; a correct kernel never reads them
    return {"encoder": enc, "decoder": dec, "target": [target], "mask": [mask]}


def _forward(kernel: str, fn: Callable | None, ins: list[Tensor], data: dict, device: torch.device) -> Tensor:
    # One forward of ``kernel`` (the fused ``fn``, or the torch reference when ``fn`` is None) on ``ins``.
    target, mask = data["target"][0].to(device), data["mask"][0].to(device)
    if kernel == "encoder_conv_stack":
        if fn is None:
            return _encoder_reference(ins[0], ins[1::2], ins[2::2])
        return fn(ins[0], ins[1::2], ins[2::2], allow_tf32=False)
    if kernel == "decoder_tail":
        return _decoder_reference(*ins, _LENGTH) if fn is None else fn(*ins, _LENGTH, allow_tf32=False)
    if fn is not None:
        return fn(*ins, target.to(ins[0].dtype), mask, allow_tf32=False)
    recon = _decoder_reference(*ins, _LENGTH)
    return torch.where(mask[..., None], recon - target.to(recon.dtype), torch.zeros_like(recon)).square().sum(-1)


def _outputs_and_grads(kernel: str, fn, data: dict, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    # The output and the gradient of every input, for fixed positive output gradients (bias gradients are sums of
    # them and must not cancel to ~0, which would make relative errors meaningless).
    source = data["encoder"] if kernel == "encoder_conv_stack" else data["decoder"]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    ins = [t.detach().to(device=device, dtype=work).clone().requires_grad_() for t in source]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype not in (torch.float32, torch.float64)):
        out = _forward(kernel, fn, ins, data, device)
    grad = 0.5 + torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.backward(grad.float().to(device=device, dtype=out.dtype))
    return [out.detach(), *(t.grad for t in ins)]


def _run_one(kernel: str, fn: Callable, data: dict, dtype: torch.dtype, run: torch.device, errors: dict) -> str:
    """Compare one fused kernel at ``dtype`` with float64 torch; the reason of the first mismatch, or ""."""
    dtype_name = str(dtype).replace("torch.", "")
    names = ["output"] + [
        f"gradient of {n}"
        for n in (["x", "w1", "b1", "w2", "b2", "w3", "b3"] if kernel == "encoder_conv_stack" else
                  ["h1", "lead", "w2", "b2", "w3", "b3"])
    ]  # fmt: skip
    refs = _outputs_and_grads(kernel, None, data, torch.device("cpu"), torch.float64)
    got = _outputs_and_grads(kernel, fn, data, run, dtype)
    for name, g, r in zip(names, got, refs):
        tol = TOLERANCES[dtype]
        err = _rel_err(g, r)
        errors[f"{kernel} {dtype_name} {name}"] = err
        if not err <= tol:  # also catches NaN
            return (
                f"{kernel} ({dtype_name}) {name} differs from float64 torch by {err:.3g} (norm of the error / norm "
                f"of torch's; tolerance {tol:.3g})"
            )
    return ""


def check_triton_kernels(
    device: torch.device,
    kernels: Mapping[str, Callable] | None = None,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
) -> KernelVerdict:
    """Run the fused kernels forward and backward on a small batch and compare them with float64 torch (no cache).

    Args:
        device: the device to check (a CUDA device; CPU tensors under ``TRITON_INTERPRET=1``).
        kernels: replacements by name (``KERNEL_NAMES``) for the functions of :mod:`kale_ext.embed.conv_triton`
            (tests inject wrong or raising kernels); missing names use the real ones.
        dtypes: compute dtypes to check: float32 (IEEE products) and/or bfloat16 (autocast).

    Returns:
        KernelVerdict: ``ok`` False with the first mismatch or exception as ``reason``.
    """
    key = verdict_key(device)
    kernels = dict(kernels or {})
    run = _check_device(device)
    errors: dict[str, float] = {}
    # The first forward may come under no_grad or inference_mode (evaluation): the check needs autograd and
    # normal tensors, so its inputs are made outside inference mode too.
    with torch.inference_mode(False):
        data = _inputs(torch.Generator().manual_seed(0))
    for dtype in dtypes:
        for name in KERNEL_NAMES:
            fn = kernels.get(name) or getattr(conv_triton, name)
            try:
                with torch.inference_mode(False), torch.enable_grad():
                    reason = _run_one(name, fn, data, dtype, run, errors)
            except Exception as error:  # noqa: BLE001 - any failure of the kernels means: do not trust them here
                first = (str(error).strip().splitlines() or [""])[0][:300]
                reason = f"{name} ({str(dtype).replace('torch.', '')}) raised {type(error).__name__}: {first}"
            if reason:
                return KernelVerdict(False, reason, key, errors)
    return KernelVerdict(True, "", key, errors)


def triton_verdict(device: torch.device, kernels: Mapping[str, Callable] | None = None) -> KernelVerdict:
    """The cached self-check verdict of the fused kernels on ``device``; runs the check once per key.

    Looks in memory, then in ``cache_dir() / "triton_check.json"``, else runs :func:`check_triton_kernels` and
    stores the verdict in both. A failed verdict is logged once per process as a warning naming why and what
    ``auto`` uses instead.

    Args:
        device: the device ``auto`` would run the kernels on.
        kernels: see :func:`check_triton_kernels` (a verdict already cached for the key is returned as it is).

    Returns:
        KernelVerdict.
    """
    key = verdict_key(device)
    verdict = _VERDICTS.get(key)
    if verdict is None:
        stored = _read_disk().get(key)
        if isinstance(stored, dict) and {"ok", "reason", "key"} <= set(stored):
            verdict = KernelVerdict(bool(stored["ok"]), str(stored["reason"]), key, dict(stored.get("errors", {})))
        else:
            verdict = check_triton_kernels(device, kernels)
            if "OutOfMemoryError" not in verdict.reason:  # a full GPU says nothing lasting about the kernels
                _write_disk(verdict)
        _VERDICTS[key] = verdict
    if not verdict.ok and key not in _WARNED:
        _WARNED.add(key)
        logger.warning(
            "conv_impl 'auto' does not use the fused Triton kernels on %s: their self-check failed (%s); using the "
            "torch path 'blockdiag'. Set MODEL.CONV_IMPL triton to force the kernels, or delete %s to rerun the "
            "check.",
            key.split("|")[0], verdict.reason, cache_dir() / CACHE_FILE,
        )  # fmt: skip
    return verdict


def triton_verified(device: torch.device) -> bool:
    """Whether ``auto`` may use the fused kernels on ``device`` (the cached :func:`triton_verdict`).

    Args:
        device: a CUDA device (or any device under ``TRITON_INTERPRET=1``).

    Returns:
        True when the self-check passed for this device and these versions.
    """
    slot = (device.type, device.index)
    ok = _BY_DEVICE.get(slot)  # a plain dict lookup: dynamo traces it without a graph break
    if ok is None:
        # The first call may come while torch.compile traces a forward: run the check outside the graph (one graph
        # break in that first trace; later traces find the cached verdict).
        check = torch.compiler.disable(_verify_slot) if torch.compiler.is_compiling() else _verify_slot
        ok = check(device)
    return ok


def _verify_slot(device: torch.device) -> bool:
    ok = _BY_DEVICE[(device.type, device.index)] = triton_verdict(device).ok
    return ok


def forced_conv_impl() -> str | None:
    """What ``KALE_EXT_CONV_IMPL`` makes ``auto`` stand for (None when unset or ``auto``).

    Returns:
        a concrete implementation name, or None.

    Raises:
        ValueError: an unknown name, with the accepted ones.
    """
    value = os.environ.get(ENV_CONV_IMPL, "").strip()
    if value in ("", "auto"):
        return None
    accepted = ("conv", "conv2d", "matmul", "blockdiag", "triton")
    if value not in accepted:
        raise ValueError(f"environment variable {ENV_CONV_IMPL}={value!r} is not one of {accepted}; unset it or fix it")
    return value


def clear_verdicts() -> None:
    """Forget the verdicts held in memory (the on-disk file is kept): the next call reads the disk or rechecks."""
    _VERDICTS.clear()
    _BY_DEVICE.clear()
    _WARNED.clear()
