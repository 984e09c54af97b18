"""Tests of kale_ext.embed.conv_triton: the fused Triton kernels against float64 torch references.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before any kernel is
built); on a CUDA machine they are compiled and run on the GPU. Shapes are tiny (the interpreter is slow); the
module's tile width and program count are lowered in some cases so that several time tiles, several items per
program and idle items (past the batch) are all exercised.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Before any kernel is built: triton chooses compiler or interpreter when a function is decorated.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from kale_ext.embed import conv_triton as ct  # noqa: E402
from kale_ext.embed.signal_cnn import LeadwiseSignalVAEEncoder, SharedLeadDecoder  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not ct._interpreting() else "cpu")
REL_TOL = 1e-5


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's max abs value."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12))


@pytest.fixture
def small_launch(monkeypatch, request):
    """Lower the tile width and the program target of the launchers (param: (max_block, target_programs))."""
    max_block, target = request.param
    monkeypatch.setattr(ct, "_MAX_BLOCK", max_block)
    monkeypatch.setattr(ct, "_TARGET_PROGRAMS", target)
    return request.param


def _encoder_params(leads: int, dtype: torch.dtype, gen: torch.Generator):
    ws, bs, c_in = [], [], 1
    for c in (16, 32, 64):
        ws.append(torch.randn(leads, c, c_in, 3, dtype=dtype, generator=gen) / (3 * c_in) ** 0.5)
        bs.append(0.2 * torch.randn(leads, c, dtype=dtype, generator=gen))
        c_in = c
    return ws, bs


def _encoder_ref(x, ws, bs):
    leads = x.shape[1]
    h = x
    for w, b in zip(ws, bs):
        h = F.relu(F.conv1d(h, w.reshape(-1, w.shape[2], 3), b.reshape(-1), stride=2, padding=1, groups=leads))
    return h.reshape(h.shape[0], leads, -1).transpose(0, 1)


ENCODER_CASES = [
    # (batch, leads, T, (max_block, target_programs))
    (2, 3, 64, (64, 1024)),  # T a multiple of 8, one tile, three leads
    (3, 2, 203, (16, 2)),  # T not a multiple of 8, two tiles, several items per program, idle items
    (1, 2, 37, (64, 1024)),  # short odd T
]


@pytest.mark.parametrize(
    ("batch", "leads", "length", "small_launch"),
    ENCODER_CASES,
    indirect=["small_launch"],
    ids=[f"B{b}-L{n}-T{t}-blk{s[0]}" for b, n, t, s in ENCODER_CASES],
)
def test_encoder_conv_stack_matches_grouped_conv(batch, leads, length, small_launch):
    """Forward and the gradients of x, every weight and bias agree with float64 grouped conv1d to 1e-5."""
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(batch, leads, length, dtype=torch.float64, generator=gen)
    ws, bs = _encoder_params(leads, torch.float64, gen)
    ref_inputs = [t.clone().to(DEVICE).requires_grad_() for t in (x, *ws, *bs)]
    inputs = [t.float().to(DEVICE).requires_grad_() for t in (x, *ws, *bs)]
    ref = _encoder_ref(ref_inputs[0], ref_inputs[1:4], ref_inputs[4:7])
    out = ct.encoder_conv_stack(inputs[0], inputs[1:4], inputs[4:7], allow_tf32=False)
    assert out.shape == (leads, batch, 64 * -(-length // 8)) and out.dtype == torch.float32
    assert _rel_err(out, ref) < REL_TOL
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=gen).to(DEVICE)
    ref.backward(grad)
    out.backward(grad.float())
    names = ["x", "w1", "w2", "w3", "b1", "b2", "b3"]
    errors = {n: _rel_err(a.grad, r.grad) for n, a, r in zip(names, inputs, ref_inputs)}
    assert max(errors.values()) < REL_TOL, errors


def test_encoder_conv_stack_matches_leadwise_encoder():
    """Same features as LeadwiseSignalVAEEncoder's grouped-conv path, from the module's own parameters."""
    torch.manual_seed(3)
    enc = LeadwiseSignalVAEEncoder(3, 90, 8, conv_impl="conv").to(DEVICE)
    x = torch.randn(2, 3, 90, device=DEVICE)
    with torch.no_grad():
        out = ct.encoder_conv_stack(x, list(enc.conv_weights), list(enc.conv_biases), allow_tf32=False)
        enc.double()  # float64 reference (no TF32 on a GPU)
        ref = enc._features_conv(x.double(), list(enc.conv_weights), list(enc.conv_biases))
    assert out.shape == ref.shape == (3, 2, enc.flat_dim)
    assert _rel_err(out, ref) < REL_TOL


def test_encoder_conv_stack_without_x_grad():
    """Weights-only backward (x without grad) gives the same weight grads and leaves x.grad empty."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 50, generator=gen).to(DEVICE)
    ws, bs = _encoder_params(2, torch.float32, gen)
    ws = [w.to(DEVICE).requires_grad_() for w in ws]
    bs = [b.to(DEVICE).requires_grad_() for b in bs]
    ct.encoder_conv_stack(x, ws, bs, allow_tf32=False).square().sum().backward()
    got = [w.grad.clone() for w in ws]
    ref_ws = [w.detach().double().requires_grad_() for w in ws]
    _encoder_ref(x.double(), ref_ws, [b.detach().double() for b in bs]).square().sum().backward()
    assert x.grad is None
    assert max(_rel_err(g, r.grad) for g, r in zip(got, ref_ws)) < REL_TOL


def test_encoder_conv_stack_bf16_inputs():
    """bf16 signals give bf16 features close to the float32 result (bf16 operands, fp32 accumulation)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 64, generator=gen).to(DEVICE)
    ws, bs = _encoder_params(2, torch.float32, gen)
    ws = [w.to(DEVICE).requires_grad_() for w in ws]
    bs = [b.to(DEVICE) for b in bs]
    out = ct.encoder_conv_stack(x.bfloat16(), ws, bs)
    ref = _encoder_ref(x.double(), [w.detach().double() for w in ws], [b.double() for b in bs])
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) < 3e-2
    out.float().sum().backward()
    assert ws[2].grad.dtype == torch.float32 and torch.isfinite(ws[2].grad).all()


def _decoder_params(batch: int, leads: int, t1: int, dtype: torch.dtype, gen: torch.Generator):
    h1 = torch.randn(batch, 32, t1, dtype=dtype, generator=gen)
    lead = 0.5 * torch.randn(leads, 32, t1, dtype=dtype, generator=gen)
    w2 = torch.randn(32, 16, 4, dtype=dtype, generator=gen) / 8
    b2 = 0.1 * torch.randn(16, dtype=dtype, generator=gen)
    w3 = torch.randn(16, 1, 4, dtype=dtype, generator=gen) / 4
    b3 = 0.1 * torch.randn(1, dtype=dtype, generator=gen)
    return [h1, lead, w2, b2, w3, b3]


def _decoder_ref(h1, lead, w2, b2, w3, b3, length):
    batch, leads = h1.shape[0], lead.shape[0]
    u = F.relu(h1[:, None] + lead[None]).flatten(0, 1)
    v = F.relu(F.conv_transpose1d(u, w2, b2, stride=2, padding=1))
    out = F.conv_transpose1d(v, w3, b3, stride=2, padding=1).reshape(batch, leads, -1)
    return out[..., :length] if out.shape[-1] >= length else F.pad(out, (0, length - out.shape[-1]))


DECODER_CASES = [
    # (batch, leads, T, T1, (max_block, target_programs))
    (2, 3, 64, 16, (64, 1024)),  # T = 4 T1: no crop
    (3, 2, 203, 52, (16, 2)),  # crop 208 -> 203, four tiles, several samples per program, an idle one
    (2, 2, 70, 16, (64, 1024)),  # T > 4 T1: zero padding
]
PARAM_NAMES = ["h1", "lead", "w2", "b2", "w3", "b3"]


@pytest.mark.parametrize(
    ("batch", "leads", "length", "t1", "small_launch"),
    DECODER_CASES,
    indirect=["small_launch"],
    ids=[f"B{b}-L{n}-T{t}-T1{u}-blk{s[0]}" for b, n, t, u, s in DECODER_CASES],
)
def test_decoder_tail_matches_conv_transpose(batch, leads, length, t1, small_launch):
    """Reconstruction and the gradients of h1, lead, w2, b2, w3, b3 agree with float64 conv_transpose1d."""
    gen = torch.Generator().manual_seed(length)
    params = _decoder_params(batch, leads, t1, torch.float64, gen)
    ref_inputs = [p.clone().to(DEVICE).requires_grad_() for p in params]
    inputs = [p.float().to(DEVICE).requires_grad_() for p in params]
    ref = _decoder_ref(*ref_inputs, length)
    out = ct.decoder_tail(*inputs, length, allow_tf32=False)
    assert out.shape == (batch, leads, length)
    assert _rel_err(out, ref) < REL_TOL
    if length > 4 * t1:
        assert (out[..., 4 * t1 :] == 0).all()
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=gen).to(DEVICE)
    ref.backward(grad)
    out.backward(grad.float())
    errors = {n: _rel_err(a.grad, r.grad) for n, a, r in zip(PARAM_NAMES, inputs, ref_inputs)}
    assert max(errors.values()) < REL_TOL, errors


SSE_CASES = [(3, 2, 203, 52, (16, 2)), (2, 2, 70, 16, (64, 1024))]


@pytest.mark.parametrize(
    ("batch", "leads", "length", "t1", "small_launch"),
    SSE_CASES,
    indirect=["small_launch"],
    ids=[f"B{b}-L{n}-T{t}-T1{u}-blk{s[0]}" for b, n, t, u, s in SSE_CASES],
)
def test_decoder_tail_sse_matches_reference_with_mask(batch, leads, length, t1, small_launch):
    """Masked SSE and its gradients equal the float64 reference; absent leads (NaN targets) give 0 and no NaN."""
    gen = torch.Generator().manual_seed(length + 1)
    params = _decoder_params(batch, leads, t1, torch.float64, gen)
    target = torch.randn(batch, leads, length, dtype=torch.float64, generator=gen)
    mask = torch.ones(batch, leads, dtype=torch.bool)
    mask[0, 1] = False
    mask[-1, 0] = False
    target[~mask] = float("nan")
    ref_inputs = [p.clone().to(DEVICE).requires_grad_() for p in params]
    inputs = [p.float().to(DEVICE).requires_grad_() for p in params]
    target, mask = target.to(DEVICE), mask.to(DEVICE)
    recon = _decoder_ref(*ref_inputs, length)
    diff = torch.where(mask[..., None], recon - target, torch.zeros_like(recon))
    ref = diff.square().sum(-1)
    sse = ct.decoder_tail_sse(*inputs, target.float(), mask, allow_tf32=False)
    assert sse.shape == (batch, leads) and sse.dtype == torch.float32
    assert (sse[~mask] == 0).all()
    assert _rel_err(sse, ref) < REL_TOL
    grad = torch.rand(batch, leads, dtype=torch.float64, generator=gen).to(DEVICE)
    ref.backward(grad)
    sse.backward(grad.float())
    assert all(torch.isfinite(a.grad).all() for a in inputs)
    errors = {n: _rel_err(a.grad, r.grad) for n, a, r in zip(PARAM_NAMES, inputs, ref_inputs)}
    assert max(errors.values()) < REL_TOL, errors


def test_decoder_tail_matches_shared_lead_decoder():
    """decoder_tail on the first layer's outputs reproduces SharedLeadDecoder(mode='lead') exactly."""
    torch.manual_seed(11)
    dec = SharedLeadDecoder(3, 45, 8, mode="lead", conv_impl="conv").to(DEVICE)
    z = torch.randn(2, 8, device=DEVICE)
    with torch.no_grad():
        dec.double()  # float64 first layer and reference (no TF32 on a GPU); the kernel reads float32 copies
        ref = dec(z.double())
        h1 = dec._layer(0, dec._unflatten(dec.fc(z.double()), "conv"), "conv")
        lead = dec._layer(0, dec._unflatten(F.linear(dec.lead_embedding, dec.fc.weight), "conv"), "conv", bias=False)
        d2, d3 = dec.deconvs[1], dec.deconvs[2]
        params = [t.float() for t in (h1, lead, d2.weight, d2.bias, d3.weight, d3.bias)]
        out = ct.decoder_tail(*params, dec.output_dim, allow_tf32=False)
    assert out.shape == ref.shape == (2, 3, 45)
    assert _rel_err(out, ref) < REL_TOL


def test_input_validation():
    """Wrong shapes are refused with a message naming the expected layout."""
    x = torch.zeros(1, 2, 16, device=DEVICE)
    ws, bs = _encoder_params(3, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="leads=2"):
        ct.encoder_conv_stack(x, ws, bs)
    params = _decoder_params(1, 2, 4, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="bool"):
        ct.decoder_tail_sse(*params, torch.zeros(1, 2, 16), torch.ones(1, 2))


def test_available_here():
    """triton_available() is True where these tests run (CUDA, or the interpreter switched on above)."""
    assert ct.triton_available()


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter switch")
def test_interpreter_switch_after_import():
    """TRITON_INTERPRET set after torch and this module were imported is honoured: triton is imported lazily."""
    code = (
        "import os, sys, torch\n"
        "import kale_ext.embed.conv_triton as ct\n"
        "assert 'triton' not in sys.modules and not ct.triton_available()\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "assert ct.triton_available()\n"
        "ws = [torch.rand(1, c, i, 3) for c, i in ((16, 1), (32, 16), (64, 32))]\n"
        "bs = [torch.rand(1, c) for c in (16, 32, 64)]\n"
        "out = ct.encoder_conv_stack(torch.rand(1, 1, 16), ws, bs)\n"
        "print(tuple(out.shape), float(out.sum()) > 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 1, 128) True"


def test_forward_kernels_compile_for_hopper():
    """The real Triton compiler (no GPU needed) builds the forward kernels for sm_90, fp32/TF32 and bf16 operands.

    The interpreter accepts code the compiler rejects; the backward kernels take longer to build and are covered by
    ``python benchmarks/triton_kernels.py --compile-check`` and the GPU run.
    """
    try:
        from triton.backends.nvidia.compiler import _path_to_binary

        _path_to_binary("ptxas")
    except Exception as error:  # noqa: BLE001 - any failure to find the bundled ptxas means: cannot check here
        pytest.skip(f"triton's ptxas is not available: {error}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "triton_kernels.py"), "--compile-check", "--only", "_fwd_"],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("registers") == 6, result.stdout


def test_imports_without_triton():
    """The module imports with triton missing; triton_available() is False and a call says what to do."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "sys.modules['triton.language'] = None\n"
        "import torch\n"
        "import kale_ext.embed.conv_triton as ct\n"
        "assert not ct.triton_available()\n"
        "try:\n"
        "    ct.decoder_tail(torch.zeros(1, 16, 4), torch.zeros(1, 16, 4), torch.zeros(16, 16, 4), torch.zeros(16),"
        " torch.zeros(16, 1, 4), torch.zeros(1), 16)\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    result = _run(code, {"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "conv_impl 'conv'" in result.stdout


def test_conv_impl_triton_modules_match_conv_with_the_same_state_dict():
    """conv_impl="triton" is a choice of kernels, not a model: same parameters, state dict, outputs and gradients."""
    torch.manual_seed(0)
    enc = LeadwiseSignalVAEEncoder(2, 37, 4, conv_impl="conv").to(DEVICE)
    dec = SharedLeadDecoder(2, 37, 4, mode="lead", conv_impl="conv").to(DEVICE)
    enc_t = LeadwiseSignalVAEEncoder(2, 37, 4, conv_impl="triton").to(DEVICE)
    dec_t = SharedLeadDecoder(2, 37, 4, mode="lead", conv_impl="triton").to(DEVICE)
    assert list(enc_t.state_dict()) == list(enc.state_dict()) and list(dec_t.state_dict()) == list(dec.state_dict())
    enc_t.load_state_dict(enc.state_dict())
    dec_t.load_state_dict(dec.state_dict())
    x = torch.randn(2, 2, 37, device=DEVICE)
    outs = []
    for e, d in ((enc, dec), (enc_t, dec_t)):
        mean, log_var = e(x)
        recon = d(mean[0])
        (recon.square().sum() + mean.sum() + log_var.sum()).backward()
        outs.append((mean, recon, [p.grad.clone() for p in [*e.parameters(), *d.parameters()]]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-4)
    for g_t, g in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(g_t, g, atol=1e-4, rtol=1e-4)


def test_auto_picks_triton_on_cuda_when_available_and_conv_on_cpu():
    from kale_ext.embed.conv_ops import resolve_conv_impl

    assert resolve_conv_impl("auto", torch.device("cpu")) == "conv"
    expected = "triton" if ct.triton_available() else "blockdiag"
    assert resolve_conv_impl("auto", torch.device("cuda")) == expected


def test_compiled_encoder_and_decoder_have_no_graph_break_at_the_kernels():
    """The kernels are torch.library custom operators: dynamo traces through them in one graph."""
    import torch._dynamo

    torch.manual_seed(0)
    enc = LeadwiseSignalVAEEncoder(2, 37, 4, conv_impl="triton").to(DEVICE)
    dec = SharedLeadDecoder(2, 37, 4, mode="lead", conv_impl="triton").to(DEVICE)

    def step(x):
        mean, log_var = enc(x)
        return dec(mean[0]).square().sum() + log_var.sum()

    explained = torch._dynamo.explain(step)(torch.randn(2, 2, 37, device=DEVICE))
    assert explained.graph_break_count == 0, explained.break_reasons


WINDOWS = [1, 9, 75, 130]  # not multiples of the strides (8) or of the tile widths (16, 64)


@pytest.mark.parametrize("window", WINDOWS)
def test_random_windows_through_the_fused_modules_match_torch(window):
    """Windowed pre-training: a random crop of any length runs through conv_impl="triton" as through "conv"."""
    from kale_ext.loaddata.windows import random_crop

    gen = torch.Generator().manual_seed(window)
    records = torch.randn(2, 2, 203, generator=gen)
    x = random_crop(records, window, generator=gen).to(DEVICE)
    assert x.shape == (2, 2, window)
    torch.manual_seed(window)
    enc = LeadwiseSignalVAEEncoder(2, window, 4, conv_impl="conv").to(DEVICE)
    dec = SharedLeadDecoder(2, window, 4, mode="lead", conv_impl="conv").to(DEVICE)
    enc_t = LeadwiseSignalVAEEncoder(2, window, 4, conv_impl="triton").to(DEVICE)
    dec_t = SharedLeadDecoder(2, window, 4, mode="lead", conv_impl="triton").to(DEVICE)
    enc_t.load_state_dict(enc.state_dict())
    dec_t.load_state_dict(dec.state_dict())
    results = []
    for e, d in ((enc, dec), (enc_t, dec_t)):
        mean, log_var = e(x)
        recon = d(mean[0])
        assert recon.shape == x.shape
        (recon.sub(x).square().sum() + log_var.sum()).backward()
        results.append((mean.detach(), recon.detach(), [p.grad.clone() for p in [*e.parameters(), *d.parameters()]]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)
    for g_t, g in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(g_t, g, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [9, 75])
def test_decoder_tail_sse_of_a_window_matches_reference(window):
    """The SSE kernel (target and mask of a crop) equals the reference for window lengths the tiles do not divide."""
    from kale_ext.loaddata.windows import random_crop

    gen = torch.Generator().manual_seed(window + 7)
    t1 = 2 * -(-window // 8)  # the decoder's first-layer length for this window
    params = _decoder_params(3, 2, t1, torch.float64, gen)
    target = random_crop(torch.randn(3, 2, 203, dtype=torch.float64, generator=gen), window, generator=gen)
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    ref_inputs = [p.clone().to(DEVICE).requires_grad_() for p in params]
    inputs = [p.float().to(DEVICE).requires_grad_() for p in params]
    target, mask = target.to(DEVICE), mask.to(DEVICE)
    recon = _decoder_ref(*ref_inputs, window)
    ref = torch.where(mask[..., None], recon - target, torch.zeros_like(recon)).square().sum(-1)
    sse = ct.decoder_tail_sse(*inputs, target.float(), mask, allow_tf32=False)
    assert _rel_err(sse, ref) < REL_TOL
    ref.sum().backward()
    sse.sum().backward()
    errors = {n: _rel_err(a.grad, r.grad) for n, a, r in zip(PARAM_NAMES, inputs, ref_inputs)}
    assert max(errors.values()) < REL_TOL, errors
