"""Tests of kale_ext.embed.kernel_check: the self-check that guards ``conv_impl="auto"``'s use of the Triton kernels.

Without a GPU the real kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before any kernel is
built) and the check runs on CPU tensors; injected kernels (a wrong result, an exception) stand in for a broken
compiler. Every test points the verdict cache at its own folder and clears the in-memory verdicts.
"""

import json
import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is built (see test_conv_triton.py)

pytest.importorskip("triton")

from kale_ext.embed import conv_triton as ct  # noqa: E402
from kale_ext.embed import kernel_check as kc  # noqa: E402
from kale_ext.embed.conv_ops import resolve_conv_impl  # noqa: E402

CUDA = torch.device("cuda")
_REAL_ENCODER = ct.encoder_conv_stack


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """A private verdict folder and no verdict in memory, before and after each test."""
    monkeypatch.setenv(kc.ENV_CACHE_DIR, str(tmp_path / "verdicts"))
    monkeypatch.delenv(kc.ENV_CONV_IMPL, raising=False)
    kc.clear_verdicts()
    yield tmp_path / "verdicts"
    kc.clear_verdicts()


def _wrong_encoder(x, conv_w, conv_b, allow_tf32=None):
    """The real kernel with a small error (1% on every feature): what a miscompiled kernel could return."""
    return _REAL_ENCODER(x, conv_w, conv_b, allow_tf32) * 1.01


def _raising_decoder(*args, **kwargs):
    raise RuntimeError("PTX compilation failed (injected)")


class _Counting:
    """Counts calls of check_triton_kernels and returns a fixed verdict (the real check is tested separately)."""

    def __init__(self, ok: bool):
        self.calls = 0
        self.ok = ok

    def __call__(self, device, kernels=None, dtypes=None):
        self.calls += 1
        return kc.KernelVerdict(self.ok, "" if self.ok else "injected mismatch", kc.verdict_key(device), {})


def test_real_kernels_pass_the_check():
    """The kernels of this checkout pass: float32 within 1e-4 of float64 torch, bf16 within its tolerance."""
    verdict = kc.check_triton_kernels(CUDA)
    assert verdict.ok, verdict.reason
    assert verdict.reason == ""
    fp32 = [e for k, e in verdict.errors.items() if " float32 " in k]
    bf16 = [e for k, e in verdict.errors.items() if " bfloat16 " in k]
    assert len(fp32) == len(bf16) == 8 + 7 + 7  # output + every input gradient of the three kernels
    assert max(fp32) < 1e-5 and max(bf16) < kc.TOLERANCES[torch.bfloat16]


def test_wrong_kernel_fails_and_auto_falls_back_with_one_warning(monkeypatch, caplog):
    """A kernel 1% off is caught; auto then picks 'blockdiag' and warns once, naming the kernel and the error."""
    verdict = kc.check_triton_kernels(CUDA, {"encoder_conv_stack": _wrong_encoder}, dtypes=(torch.float32,))
    assert not verdict.ok
    assert verdict.reason.startswith("encoder_conv_stack (float32) output differs")
    monkeypatch.setattr(ct, "encoder_conv_stack", _wrong_encoder)  # the check reads the module's functions
    with caplog.at_level(logging.WARNING, logger=kc.__name__):
        assert resolve_conv_impl("auto", CUDA) == "blockdiag"
        kc._BY_DEVICE.clear()  # force the slower path again: the verdict is in memory, no second warning
        assert resolve_conv_impl("auto", CUDA) == "blockdiag"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "encoder_conv_stack (float32) output differs" in warnings[0].getMessage()
    assert "MODEL.CONV_IMPL triton" in warnings[0].getMessage()


def test_raising_kernel_fails_the_check_and_auto_falls_back(monkeypatch):
    """An exception in a kernel (e.g. a compiler error) is a failed verdict naming it, never an exception."""
    verdict = kc.check_triton_kernels(CUDA, {"decoder_tail": _raising_decoder}, dtypes=(torch.float32,))
    assert not verdict.ok
    assert verdict.reason == "decoder_tail (float32) raised RuntimeError: PTX compilation failed (injected)"
    monkeypatch.setattr(ct, "decoder_tail", _raising_decoder)
    assert resolve_conv_impl("auto", CUDA) == "blockdiag"


def test_nan_output_fails_the_check():
    """NaN from a kernel is a mismatch (the comparison is written so that NaN fails it)."""
    verdict = kc.check_triton_kernels(
        CUDA, {"decoder_tail_sse": lambda h1, *a, **k: h1[:, 0, :2] * float("nan")}, dtypes=(torch.float32,)
    )
    assert not verdict.ok and "decoder_tail_sse (float32) output" in verdict.reason


def test_verdict_is_cached_in_memory_and_on_disk(monkeypatch, fresh_cache):
    """The check runs once per key: the second call (and a new process, via the file) reuses the verdict."""
    counting = _Counting(ok=False)
    monkeypatch.setattr(kc, "check_triton_kernels", counting)
    assert resolve_conv_impl("auto", CUDA) == "blockdiag"
    assert resolve_conv_impl("auto", CUDA) == "blockdiag"
    assert kc.triton_verdict(CUDA).reason == "injected mismatch"
    assert counting.calls == 1
    stored = json.loads((fresh_cache / kc.CACHE_FILE).read_text())
    key = kc.verdict_key(CUDA)
    assert stored[key]["ok"] is False and stored[key]["reason"] == "injected mismatch"
    for part in (f"torch {torch.__version__}", "triton ", "kale_ext ", "src "):
        assert part in key
    kc.clear_verdicts()  # as a new process: memory empty, the file remains
    assert not kc.triton_verified(CUDA)
    assert counting.calls == 1
    (fresh_cache / kc.CACHE_FILE).unlink()
    kc.clear_verdicts()
    kc.triton_verified(CUDA)
    assert counting.calls == 2


def test_unwritable_cache_folder_is_not_an_error(monkeypatch, tmp_path):
    """A cache path that cannot be created (a file in the way) only means no file: the verdict still holds."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    monkeypatch.setenv(kc.ENV_CACHE_DIR, str(blocker / "sub"))
    counting = _Counting(ok=True)
    monkeypatch.setattr(kc, "check_triton_kernels", counting)
    assert kc.triton_verified(CUDA)
    assert kc.triton_verified(CUDA) and counting.calls == 1


def test_forcing_values_skip_the_check(monkeypatch):
    """'triton' uses the kernels without a check, a torch name uses torch; KALE_EXT_CONV_IMPL overrides auto."""
    counting = _Counting(ok=False)
    monkeypatch.setattr(kc, "check_triton_kernels", counting)
    assert resolve_conv_impl("triton", CUDA) == "triton"
    assert resolve_conv_impl("blockdiag", CUDA) == "blockdiag"
    assert resolve_conv_impl("conv", CUDA) == "conv"
    monkeypatch.setenv(kc.ENV_CONV_IMPL, "triton")
    assert resolve_conv_impl("auto", CUDA) == "triton"
    monkeypatch.setenv(kc.ENV_CONV_IMPL, "matmul")
    assert resolve_conv_impl("auto", CUDA) == "matmul"
    assert resolve_conv_impl("auto", torch.device("cpu")) == "matmul"
    assert counting.calls == 0
    monkeypatch.setenv(kc.ENV_CONV_IMPL, "fast")
    with pytest.raises(ValueError, match="KALE_EXT_CONV_IMPL"):
        resolve_conv_impl("auto", CUDA)
    monkeypatch.delenv(kc.ENV_CONV_IMPL)
    assert resolve_conv_impl("auto", CUDA) == "blockdiag" and counting.calls == 1


def test_passing_check_lets_auto_pick_triton_and_cpu_never_checks(monkeypatch):
    counting = _Counting(ok=True)
    monkeypatch.setattr(kc, "check_triton_kernels", counting)
    assert resolve_conv_impl("auto", torch.device("cpu")) == "conv"
    assert counting.calls == 0
    assert resolve_conv_impl("auto", CUDA) == "triton"
    assert counting.calls == 1


def test_check_runs_under_inference_mode_and_no_grad():
    """A first forward in evaluation (inference_mode / no_grad) still gets a true verdict: the check needs autograd."""
    with torch.inference_mode():
        verdict = kc.check_triton_kernels(CUDA, dtypes=(torch.float32,))
    assert verdict.ok, verdict.reason
    with torch.no_grad():
        assert resolve_conv_impl("auto", CUDA) == "triton"


def test_out_of_memory_is_not_written_to_disk(monkeypatch, fresh_cache):
    """An out-of-memory failure falls back for this process only; the next process checks again."""

    def oom(device, kernels=None, dtypes=None):
        reason = "encoder_conv_stack (float32) raised OutOfMemoryError: CUDA out of memory"
        return kc.KernelVerdict(False, reason, kc.verdict_key(device), {})

    monkeypatch.setattr(kc, "check_triton_kernels", oom)
    assert resolve_conv_impl("auto", CUDA) == "blockdiag"
    assert not (fresh_cache / kc.CACHE_FILE).exists()


def test_first_verdict_while_compiling_runs_the_check_once_outside_the_graph(monkeypatch):
    """auto inside a torch.compile'd forward: the check runs once (eagerly), later traces read the cached verdict."""
    import torch._dynamo

    counting = _Counting(ok=False)
    monkeypatch.setattr(kc, "check_triton_kernels", counting)

    def step(x):
        return x * 2 if resolve_conv_impl("auto", CUDA) == "triton" else x * 3

    compiled = torch.compile(step, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 3.0))
    assert counting.calls == 1
    explained = torch._dynamo.explain(step)(torch.ones(4))  # the verdict is cached: traced as a dict lookup
    assert explained.graph_break_count == 0, explained.break_reasons
    assert counting.calls == 1
