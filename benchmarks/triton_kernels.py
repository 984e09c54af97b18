"""Fused Triton kernels (kale_ext.embed.conv_triton) against the torch paths they replace: time and agreement.

For each length (``--input-dim``: whole records and pre-training windows of any length), batch size and dtype,
times forward + backward of

- the lead encoders' conv stack: ``encoder_conv_stack`` vs ``LeadwiseSignalVAEEncoder._features_conv`` (grouped
  Conv1d) and ``_features_blockdiag`` (what ``conv_impl="auto"`` picks on CUDA today);
- the shared decoder's tail (lead mode, last two transposed convolutions): ``decoder_tail`` vs the grouped-free
  ``conv_transpose1d`` path of ``SharedLeadDecoder`` and its block-diagonal path;
- the decoder tail plus masked summed squared error: ``decoder_tail_sse`` vs the torch tail followed by the SSE.

bf16 runs use ``torch.autocast`` (float32 signals and parameters, as in pre-training); fp32 runs keep TF32 on, as
benchmarks/pretrain_throughput.py does. Prints the median of ``--repeats`` timed repeats (after warm-up) in ms, the
ratio torch / triton (> 1: triton is faster), peak GPU memory, the max relative error of the triton outputs and
gradients against the grouped torch path, and a final JSON line. Exit status 1 when an error exceeds its tolerance.

Usage::

    python benchmarks/triton_kernels.py                  # paper size: 12 leads, T 5000, batch 256 and 1024
    python benchmarks/triton_kernels.py --input-dim 5000,2500,1000  # whole records and two window lengths
    python benchmarks/triton_kernels.py --small          # CPU, Triton interpreter, tiny sizes, float64 check
    python benchmarks/triton_kernels.py --compile-check  # no GPU needed: compile every kernel for sm_90 (ptxas)

``--compile-check`` runs Triton's real compiler down to a Hopper cubin on any machine (it needs no GPU) and prints
the registers and spill bytes ptxas reports per kernel, for the tile widths and warp counts the launchers use
(``conv_triton._LAUNCH``); exit status 1 if a kernel fails to compile.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--small" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kale_ext.embed import conv_triton  # noqa: E402
from kale_ext.embed.conv_ops import block_diagonal_transposed, conv_output_length, fit_length  # noqa: E402
from kale_ext.embed.signal_cnn import LeadwiseSignalVAEEncoder, SharedLeadDecoder  # noqa: E402

# Max relative error (max abs error / max abs reference) allowed per compute dtype against the grouped torch path.
TOLERANCE = {"fp64": 1e-5, "fp32": 2e-2, "bf16": 6e-2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> tuple[float, float | None]:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs, and the peak GiB of one run."""
    for _ in range(warmup):
        fn()
    _sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    return statistics.median(times), peak


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's max abs value."""
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12))


class EncoderCase:
    """The conv stack of a LeadwiseSignalVAEEncoder: inputs, parameters, the three implementations."""

    def __init__(self, batch: int, leads: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.enc = LeadwiseSignalVAEEncoder(leads, length, 8, conv_impl="conv").to(device=device, dtype=dtype)
        self.x = torch.randn(batch, leads, length, generator=gen, dtype=dtype).to(device).requires_grad_()
        self.params = [self.x, *self.enc.conv_weights, *self.enc.conv_biases]
        flat = self.enc.flat_dim
        self.grad = torch.randn(leads, batch, flat, generator=gen, dtype=dtype).to(device)

    def run(self, impl: str, autocast: bool) -> torch.Tensor:
        """Forward + backward with ``impl`` in torch, blockdiag or triton; returns the output."""
        for p in self.params:
            p.grad = None
        ws, bs = list(self.enc.conv_weights), list(self.enc.conv_biases)
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=autocast):
            if impl == "triton":
                out = conv_triton.encoder_conv_stack(self.x, ws, bs)
            elif impl == "blockdiag":
                out = self.enc._features_blockdiag(self.x, ws, bs)
            else:
                out = self.enc._features_conv(self.x, ws, bs)
        out.backward(self.grad.to(out.dtype))
        return out

    def grads(self) -> list[torch.Tensor]:
        """Current gradients of x, the weights and the biases."""
        return [p.grad.clone() for p in self.params]


class DecoderCase:
    """The lead-mode SharedLeadDecoder's last two layers: first-layer outputs, parameters, implementations."""

    def __init__(self, batch: int, leads: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        gen = torch.Generator(device="cpu").manual_seed(1)
        self.dec = SharedLeadDecoder(leads, length, 8, mode="lead", conv_impl="conv").to(device=device, dtype=dtype)
        t1 = 2 * conv_output_length(length)
        self.h1 = torch.randn(batch, 32, t1, generator=gen, dtype=dtype).to(device).requires_grad_()
        self.lead = (0.5 * torch.randn(leads, 32, t1, generator=gen, dtype=dtype)).to(device).requires_grad_()
        d2, d3 = self.dec.deconvs[1], self.dec.deconvs[2]
        self.weights = [d2.weight, d2.bias, d3.weight, d3.bias]
        self.params = [self.h1, self.lead, *self.weights]
        self.grad = torch.randn(batch, leads, length, generator=gen, dtype=dtype).to(device)
        self.target = torch.randn(batch, leads, length, generator=gen, dtype=dtype).to(device)
        self.mask = torch.rand(batch, leads, generator=gen).to(device) > 0.1
        self.grad_sse = torch.rand(batch, leads, generator=gen, dtype=dtype).to(device)

    def tail(self, impl: str) -> torch.Tensor:
        """Reconstruction (B, L, T) by ``impl`` (torch, blockdiag or triton)."""
        batch, leads, length = self.h1.shape[0], self.lead.shape[0], self.dec.output_dim
        if impl == "triton":
            return conv_triton.decoder_tail(self.h1, self.lead, *self.weights, length)
        lead = self.lead.to(self.h1.dtype)
        if impl == "blockdiag":
            h = (self.h1.unsqueeze(1) + lead.unsqueeze(0)).flatten(1, 2).unsqueeze(2)
            h = h.contiguous(memory_format=torch.channels_last)
            for i in (1, 2):
                deconv = self.dec.deconvs[i]
                w = block_diagonal_transposed(deconv.weight, leads).unsqueeze(2)
                h = F.conv_transpose2d(F.relu(h), w, deconv.bias.repeat(leads), stride=(1, 2), padding=(0, 1))
            return fit_length(h.reshape(batch, leads, -1), self.dec.output_dim)
        h = (self.h1.unsqueeze(1) + lead.unsqueeze(0)).flatten(0, 1)
        for i in (1, 2):
            h = self.dec._layer(i, F.relu(h), "conv")
        return fit_length(self.dec._flatten(h), self.dec.output_dim).view(batch, leads, length)

    def sse(self, impl: str) -> torch.Tensor:
        """Masked SSE (B, L) by ``impl``."""
        if impl == "triton":
            return conv_triton.decoder_tail_sse(self.h1, self.lead, *self.weights, self.target, self.mask)
        recon = self.tail(impl).float()
        diff = torch.where(self.mask[..., None], recon - self.target.float(), torch.zeros_like(recon))
        return diff.square().sum(-1)

    def run(self, impl: str, autocast: bool, loss: str) -> torch.Tensor:
        """Forward + backward of the tail (``loss="tail"``) or of the SSE (``"sse"``); returns the output."""
        for p in self.params:
            p.grad = None
        with torch.autocast(self.h1.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = self.tail(impl) if loss == "tail" else self.sse(impl)
        grad = self.grad if loss == "tail" else self.grad_sse
        out.backward(grad.to(out.dtype))
        return out

    def grads(self) -> list[torch.Tensor]:
        """Current gradients of h1, lead and the four parameters."""
        return [p.grad.clone() for p in self.params]


def with_grads(case, step, impl: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and gradients of one forward + backward of ``impl``."""
    out = step(impl).detach().clone()
    return out, case.grads()


def compare(reference: tuple[torch.Tensor, list[torch.Tensor]], got: tuple[torch.Tensor, list[torch.Tensor]]) -> float:
    """Max relative error of an output and its gradients against a reference (output, gradients)."""
    return max([rel_err(got[0], reference[0])] + [rel_err(g, r) for g, r in zip(got[1], reference[1])])


def compile_check(only: str = "") -> int:
    """Compile every kernel variant for sm_90 (fp32/TF32 and bf16 operands) and print ptxas' register report.

    Args:
        only: compile only the kernels whose name contains this string.

    Returns:
        exit status: 0 when every kernel compiled, 1 otherwise.
    """
    if conv_triton._interpreting():
        print("unset TRITON_INTERPRET for --compile-check (it needs the real compiler)", flush=True)
        return 2
    conv_triton._ensure_built()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import _path_to_binary
    from triton.compiler import ASTSource

    ptxas = _path_to_binary("ptxas")[0]
    launch = conv_triton._LAUNCH
    enc = {"C1": 16, "C2": 32, "C3": 64}
    dec = {"L": 12, "C1": 32, "C2": 16}
    failed = False
    for mode, half in ((conv_triton._TF32, "*fp32"), (conv_triton._BF16, "*bf16")):
        variants = [
            ("_enc_fwd_kernel", {**enc, "W": launch["enc_fwd"][0]}, launch["enc_fwd"][1], {"out_ptr": half}),
            ("_enc_bwd_kernel", {**enc, "W": launch["enc_bwd"][0], "ITEMS": 16, "NEED_GX": True}, launch["enc_bwd"][1],
             {"gout_ptr": half}),
            ("_dec_fwd_kernel", {**dec, "W": launch["dec_fwd"][0], "SSE": False}, launch["dec_fwd"][1],
             {"out_ptr": half}),
            ("_dec_fwd_kernel", {**dec, "W": launch["dec_fwd"][0], "SSE": True}, launch["dec_fwd"][1],
             {"mask_ptr": "*u8"}),
            ("_dec_bwd_kernel", {**dec, "W": launch["dec_bwd"][0], "BCH": 8, "SSE": False}, launch["dec_bwd"][1],
             {"gout_ptr": half}),
            ("_dec_bwd_kernel", {**dec, "W": launch["dec_bwd"][0], "BCH": 8, "SSE": True}, launch["dec_bwd"][1],
             {"mask_ptr": "*u8"}),
        ]  # fmt: skip
        for name, constants, warps, pointers in variants:
            if only not in name:
                continue
            fn = getattr(conv_triton, name)
            signature = {
                p.name: pointers.get(p.name, "*fp32") if p.name.endswith("_ptr") else "i32"
                for p in fn.params
                if not p.is_constexpr
            }
            constants = {**constants, "MODE": mode}
            start = time.perf_counter()
            try:
                kernel = triton.compile(
                    ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}
                )
            except Exception as error:  # report every kernel, then fail
                print(f"{name} {constants}: FAILED {type(error).__name__}: {error}", flush=True)
                failed = True
                continue
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                ptx.write(kernel.asm["ptx"])
                ptx.flush()
                report = subprocess.run(
                    [ptxas, "-v", "--gpu-name=sm_90a", ptx.name, "-o", os.devnull], capture_output=True, text=True
                ).stderr
            info = "; ".join(line.split(":", 1)[-1].strip() for line in report.splitlines() if "Used" in line)
            spill = "; ".join(line.strip() for line in report.splitlines() if "spill" in line)
            print(
                f"{name:>16} {constants} warps={warps}: {time.perf_counter() - start:5.1f} s  {info}  {spill}",
                flush=True,
            )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Parse options, time and check every kernel; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="256,1024", help="comma list of batch sizes")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list: fp32, bf16 (autocast)")
    parser.add_argument("--leads", type=int, default=12)
    parser.add_argument("--input-dim", default="5000",
                        help="comma list of samples per lead: whole records and/or pre-training windows, any length "
                        "(e.g. 5000,2500,1000)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported), at least 3")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="CPU, Triton interpreter, tiny sizes, float64 check")
    parser.add_argument("--compile-check", action="store_true", help="compile every kernel for sm_90 (no GPU needed)")
    parser.add_argument("--only", default="", help="with --compile-check: kernels whose name contains this")
    args = parser.parse_args(argv)
    if args.compile_check:
        return compile_check(args.only)
    args.repeats = max(3, args.repeats)
    if args.small:
        args.batch, args.leads, args.dtypes = "2", 2, "fp64"
        args.input_dim = "100" if args.input_dim == "5000" else args.input_dim  # keep lengths given explicitly
        args.warmup, args.repeats, args.device = 0, 3, "cpu"
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    elif not args.small:
        print("no CUDA device: use --small (the interpreter) on the CPU", flush=True)
        return 2
    if not conv_triton.triton_available():
        print("triton is not available here (pip install triton; CUDA or TRITON_INTERPRET=1)", flush=True)
        return 2
    import triton

    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
        f"torch={torch.__version__} triton={triton.__version__} interpret={conv_triton._interpreting()} "
        f"leads={args.leads} T={args.input_dim}",
        flush=True,
    )
    results, failed = [], False
    lengths = [int(t) for t in str(args.input_dim).split(",")]
    for length, batch, name in itertools.product(
        lengths, [int(b) for b in args.batch.split(",")], args.dtypes.split(",")
    ):
        autocast = name == "bf16"
        dtype = torch.float64 if name == "fp64" else torch.float32
        tol = TOLERANCE[name]
        cases = [
            ("encoder", EncoderCase(batch, args.leads, length, device, dtype), None),
            ("decoder_tail", DecoderCase(batch, args.leads, length, device, dtype), "tail"),
            ("decoder_tail_sse", DecoderCase(batch, args.leads, length, device, dtype), "sse"),
        ]
        for kernel, case, loss in cases:

            def step(impl, case=case, loss=loss, autocast=autocast):
                return case.run(impl, autocast) if loss is None else case.run(impl, autocast, loss)

            if dtype == torch.float64:  # the kernels run in fp32: check them against the float64 reference
                reference = with_grads(case, step, "conv")
                for p in case.params:
                    p.data = p.data.float()
            else:
                reference = with_grads(case, step, "conv")
            err_ref = compare(reference, with_grads(case, step, "triton"))
            row = {"kernel": kernel, "T": length, "batch": batch, "dtype": name, "max_rel_err": err_ref, "tol": tol}
            for impl in ("conv", "blockdiag", "triton"):
                try:
                    ms, peak = timed(lambda impl=impl, step=step: step(impl), device, args.repeats, args.warmup)
                except RuntimeError as error:  # e.g. out of memory: report, keep going
                    print(f"{kernel} {impl} batch={batch} {name}: FAILED {str(error).splitlines()[0][:160]}")
                    ms, peak = float("nan"), None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                row[f"{impl}_ms"], row[f"{impl}_peak_gib"] = ms, peak
            for impl in ("conv", "blockdiag"):
                row[f"ratio_{impl}_over_triton"] = row[f"{impl}_ms"] / row["triton_ms"]
            ok = err_ref <= tol
            failed |= not ok
            peaks = " ".join(
                f"{i}={row[f'{i}_peak_gib']:.2f}" for i in ("conv", "blockdiag", "triton") if row[f"{i}_peak_gib"]
            )
            print(
                f"{kernel:>16} T={length:5d} batch={batch:5d} {name}: conv {row['conv_ms']:9.2f} ms  blockdiag "
                f"{row['blockdiag_ms']:9.2f} ms  triton {row['triton_ms']:9.2f} ms  conv/triton "
                f"{row['ratio_conv_over_triton']:5.2f}x  "
                f"blockdiag/triton {row['ratio_blockdiag_over_triton']:5.2f}x"
                f"  max rel err {err_ref:.2e} ({'ok' if ok else 'MISMATCH'}, tol {tol:g})"
                + (f"  peak GiB {peaks}" if peaks else ""),
                flush=True,
            )
            results.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(json.dumps({"device": str(device), "results": results, "ok": not failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
