"""Pre-training throughput: the authors' per-lead loop against the batched LSEMVAE, in one process.

One full pre-training step = forward, negative ELBO + alignment loss, backward, AdamW step; bf16 autocast on a GPU,
float32 on the CPU. Variants:

- ``loop``: 12 ``kale.embed.signal_cnn.SignalVAEEncoder`` modules called one after another, the authors' grouped
  fusion (HiME ``mode="reference"``) and a decoder without lead input called once per lead (as the authors' code).
- ``lsemvae:<impl>``: :class:`kale_ext.embed.lsemvae.LSEMVAE` (gated HiME, lead-conditioned shared decoder: 12
  real decodes) with ``conv_impl`` ``conv`` (grouped Conv1d / ConvTranspose1d), ``conv2d`` (height-1
  channels-last Conv2d), ``matmul`` (channels-last batched matmuls) or ``blockdiag`` (dense channels-last Conv2d with
  block-diagonal weights; what ``auto``, the model default, picks on CUDA).
- ``identical:<impl>``: LSEMVAE's batched encoders with the authors' identical decoder (decoded once).

Prints samples/s per variant, the ratio of each to ``loop``, peak GPU memory, and a final JSON line. Warm-up steps
are excluded from timing; CUDA is synchronised around the timed steps. A variant that fails (e.g. a compiler error)
is reported and the others still run. Needs pykale (the ``loop`` variant uses its encoder). Measured figures and
their reading: docs/models.md.

``--end-to-end CACHE`` times the pipeline's own training step instead: batches from a cache through
``kale_ext.loaddata.batch_stream.BatchStream`` (float16 kept float16 up to the device; resident on the GPU when it
fits), ``PretrainModule(model, ELBOObjective())``'s loss (the default objective: Gaussian likelihood, alignment,
gate balance), backward and the (fused on GPU) AdamW step, loader included. ``--make-cache N`` writes a float16
synthetic cache of N records first. Every variant is timed ``--repeats`` times (>= 3); the median and the spread
(min-max) are printed, and the compile time (the first, untimed steps) separately. Ratios are printed only like for
like (eager against eager, compiled against compiled), and the useful-FLOP utilisation against ``--peak-tflops``
(FLOPs of one step counted by ``torch.utils.flop_counter``, so zeros multiplied by the block-diagonal form are not
counted as useful only when ``--useful-flops-from`` names the variant whose count is the useful work).

``--window W`` times every variant twice in the same process: on whole records (samples/s) and on a fresh random
window of ``W`` samples per record and step (windows/s; ``kale_ext.loaddata.windows.random_crop``, on the device,
timed with the step; the models are built for length ``W``), as windowed pre-training does. Each result carries
``input`` (record or window), ``length``, ``samples_per_s``, ``windows_per_s`` (one window per sample and step)
and ``timepoints_per_s``; ratios against the loop are taken on the same input.

Usage::

    python benchmarks/pretrain_throughput.py                     # paper size, batch 1024, default variants
    python benchmarks/pretrain_throughput.py --compile            # torch.compile every model
    python benchmarks/pretrain_throughput.py --small              # tiny size on the CPU (used by the tests)
    python benchmarks/pretrain_throughput.py --window 2500        # whole records and 2500-sample windows
    python benchmarks/pretrain_throughput.py --end-to-end cache/ --make-cache 16384 --variants loop,lsemvae:triton
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kale_ext.embed.fusion import HierarchicalModalityExperts  # noqa: E402
from kale_ext.embed.lsemvae import LSEMVAE  # noqa: E402
from kale_ext.embed.signal_cnn import SharedLeadDecoder  # noqa: E402
from kale_ext.loaddata.windows import check_window, random_crop  # noqa: E402
from kale_ext.predict.losses import alignment_loss, multimodal_elbo  # noqa: E402


class PerLeadLoopVAE(nn.Module):
    """The authors' execution pattern: one PyKale encoder per lead in a loop, one decoder called once per lead."""

    def __init__(self, num_leads: int, input_dim: int, latent_dim: int) -> None:
        super().__init__()
        from kale.embed.signal_cnn import SignalVAEEncoder

        self.encoders = nn.ModuleList(
            SignalVAEEncoder(input_dim=input_dim, latent_dim=latent_dim) for _ in range(num_leads)
        )
        self.fusion = HierarchicalModalityExperts(num_leads, latent_dim, mode="reference")
        self.decoder = SharedLeadDecoder(1, input_dim, latent_dim, mode="identical")

    def forward(self, x: torch.Tensor):
        """x: (B, L, T) -> (recon (B, L, T), FusionOutput)."""
        outs = [enc(x[:, i : i + 1]) for i, enc in enumerate(self.encoders)]
        mean = torch.stack([m.float() for m, _ in outs])
        log_var = torch.stack([v.float() for _, v in outs])
        fused = self.fusion(mean, log_var)
        z = fused.mean + torch.exp(0.5 * fused.log_var) * torch.randn_like(fused.mean)
        recon = torch.cat([self.decoder(z) for _ in self.encoders], dim=1)
        return recon, fused


class _LSEMVAEStep(nn.Module):
    """Adapter giving LSEMVAE the same (recon, fusion) output as the loop model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        """x: (B, L, T) -> (recon, FusionOutput)."""
        out = self.model(x, sample=True)
        return out.recon, out.fusion


def build(variant: str, leads: int, input_dim: int, latent_dim: int) -> nn.Module:
    """Build the model of a variant name (``loop``, ``lsemvae:<impl>``, ``identical:<impl>``)."""
    kind, _, impl = variant.partition(":")
    names = [f"L{i}" for i in range(leads)]
    if kind == "loop":
        if input_dim % 8:
            raise ValueError(
                f"the loop uses PyKale's SignalVAEEncoder, which needs a length that is a multiple of 8 (got "
                f"{input_dim}); use --window {input_dim - input_dim % 8 or 8} "
                f"or --input-dim {input_dim + 8 - input_dim % 8}"
            )
        return PerLeadLoopVAE(leads, input_dim, latent_dim)
    if kind == "lsemvae":
        return _LSEMVAEStep(LSEMVAE(names, input_dim, latent_dim, conv_impl=impl or "conv"))
    if kind == "identical":
        return _LSEMVAEStep(LSEMVAE(names, input_dim, latent_dim, decoder_mode="identical", conv_impl=impl or "conv"))
    raise SystemExit(f"unknown variant {variant!r}; use loop, lsemvae:conv, lsemvae:matmul, identical:conv, ...")


def run_variant(variant: str, args: argparse.Namespace, device: torch.device, window: int = 0) -> dict:
    """Time ``args.steps`` training steps of one variant after ``args.warmup`` untimed ones.

    With ``window`` > 0 the model is built for that length and every step trains on a fresh random window of each
    record (``kale_ext.loaddata.windows.random_crop``, timed with the step), as windowed pre-training does.
    """
    torch.manual_seed(0)
    length = check_window(window, args.input_dim)
    with torch.device(device):
        model = build(variant, args.leads, length, args.latent_dim)
    params = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model) if args.compile else model
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    x = torch.randn(args.batch, args.leads, args.input_dim, device=device)
    use_autocast = device.type == "cuda" and not args.fp32

    def step() -> torch.Tensor:
        optimiser.zero_grad(set_to_none=True)
        xw = random_crop(x, length)  # x itself for whole records
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            recon, fused = step_model(xw)
        terms = multimodal_elbo(recon, xw, fused.mean, fused.log_var, beta=1.0)
        loss = terms.total + alignment_loss(fused.expert_mean, fused.mean, fused.expert_mask)
        loss.backward()
        optimiser.step()
        return loss

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {
        "variant": variant,
        **_input_fields(args, length, args.batch * args.steps / elapsed),
        "step_ms": 1000 * elapsed / args.steps,
        "peak_gib": peak,
        "parameters": params,
        "loss": float(loss.detach()),
    }
    if args.profile:
        _profile(step, device)
    return result


def _flops_per_sample(step, batch: int) -> float:
    """FLOPs of one training step (forward + backward) divided by the batch, counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / batch


def _input_fields(args: argparse.Namespace, length: int, samples_per_s: float) -> dict:
    """Rate fields of a result: records (or windows) per second and the input they were measured on.

    A sample is one record drawn into a batch; a window is what the model sees of it (the whole record, or one
    random crop per record and step). ``timepoints_per_s`` (samples/s x length) compares whole records and windows.
    """
    windowed = length < args.input_dim
    return {
        "input": "window" if windowed else "record",
        "length": length,
        "samples_per_s": samples_per_s,
        "windows_per_s": samples_per_s,  # one window (a crop, or the whole record) per sample and step
        "timepoints_per_s": samples_per_s * length,
    }


def run_end_to_end(variant: str, args: argparse.Namespace, device: torch.device, window: int = 0) -> dict:
    """The pipeline's training step from a cache, loader included, repeated ``args.repeats`` times.

    With ``window`` > 0 each batch (whole records from the loader, resident on the GPU when they fit) is cropped to
    a fresh random window per record on the device before the step (timed with it).
    """
    import numpy as np

    from kale_ext.loaddata.batch_stream import BatchStream
    from kale_ext.loaddata.ecg_dataset import ECGLeadDataset
    from kale_ext.pipeline.pretrain import PretrainModule
    from kale_ext.predict.objectives import ELBOObjective

    leads = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")[: args.leads]
    dataset = ECGLeadDataset(args.end_to_end, leads=leads)
    args.input_dim = dataset.num_samples if hasattr(dataset, "num_samples") else args.input_dim
    length = check_window(window, args.input_dim)
    torch.manual_seed(0)
    kind, _, impl = variant.partition(":")
    with torch.device(device):
        if kind == "loop":
            model = build(variant, args.leads, length, args.latent_dim)
        elif kind in ("lsemvae", "identical"):
            mode = "identical" if kind == "identical" else "lead"
            model = LSEMVAE(leads, length, args.latent_dim, decoder_mode=mode, conv_impl=impl or "auto")
        else:
            raise SystemExit(f"unknown variant {variant!r}; use loop, lsemvae:<impl>, identical:<impl>")
    loop = isinstance(model, PerLeadLoopVAE)
    module = (
        None if loop else PretrainModule(model, ELBOObjective(beta_warmup_epochs=0), leads=leads, compile=args.compile)
    )
    forward = torch.compile(model) if (args.compile and loop) else model
    params = list(model.parameters())
    fused = device.type == "cuda" and not args.no_fused
    optimiser = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5, fused=fused or None)
    stream = BatchStream(dataset, np.arange(len(dataset)), args.batch, seed=0, device=device,
                         resident=args.resident, num_threads=args.threads)  # fmt: skip
    use_autocast = device.type == "cuda" and not args.fp32

    def step(batch) -> torch.Tensor:
        optimiser.zero_grad(set_to_none=True)
        if length < args.input_dim:
            batch = {**batch, "signals": random_crop(batch["signals"], length)}
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            if loop:
                x = batch["signals"].float()
                recon, fused_out = forward(x)
                terms = multimodal_elbo(recon.float(), x, fused_out.mean, fused_out.log_var, beta=1.0)
                loss = terms.total + alignment_loss(fused_out.expert_mean, fused_out.mean, fused_out.expert_mask)
            else:
                loss = module.compute_losses(batch, sample=True)["loss"]
        loss.backward()
        optimiser.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    batches = iter(_forever(stream))
    start = time.perf_counter()
    for _ in range(args.warmup):
        step(next(batches))
    sync()
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step(next(batches))
        sync()
        rates.append(args.batch * args.steps / (time.perf_counter() - start))
    flops = _flops_per_sample(lambda: step(next(batches)), args.batch) if args.count_flops else None
    rates_sorted = sorted(rates)
    return {
        "variant": variant,
        **_input_fields(args, length, rates_sorted[len(rates) // 2]),
        "spread": [rates_sorted[0], rates_sorted[-1]],
        "repeats": rates,
        "warmup_s": warmup_s,
        "resident": stream.resident,
        "cache_dtype": str(dataset.signal_dtype),
        "flops_per_sample": flops,
        "parameters": sum(p.numel() for p in params),
        "loss": float(loss.detach()),
    }


def _forever(stream):
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        yield from stream
        epoch += 1


def _profile(step, device: torch.device, rows: int = 15) -> None:
    """Print the kernels that take the most time over two steps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            print(averages.table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)
            return
        except (AttributeError, KeyError, ValueError):
            continue


def main(argv: list[str] | None = None) -> dict:
    """Parse options, run the variants, print the table and a final JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on the GPU")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of each variant")
    parser.add_argument("--small", action="store_true", help="tiny sizes on the CPU (a smoke run for the tests)")
    parser.add_argument("--end-to-end", type=Path, default=None, metavar="CACHE",
                        help="time the pipeline's training step from this cache, loader included")  # fmt: skip
    parser.add_argument("--make-cache", type=int, default=0, metavar="N",
                        help="with --end-to-end: first write a float16 synthetic cache of N records there")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median and spread)")
    parser.add_argument("--resident", default="auto", help="BatchStream residency: auto, yes, no")
    parser.add_argument("--threads", type=int, default=2, help="BatchStream reading threads")
    parser.add_argument("--no-fused", action="store_true", help="unfused AdamW on the GPU")
    parser.add_argument("--count-flops", action="store_true", help="count FLOPs of one step (utilisation)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100/H200: 989)")
    parser.add_argument("--useful-flops-from", default="lsemvae:conv", help="variant whose FLOPs are the useful work")
    parser.add_argument("--leads", type=int, default=12)
    parser.add_argument("--input-dim", type=int, default=5000, help="samples per lead of the records")
    parser.add_argument("--window", type=int, default=0,
                        help="also time every variant on a fresh random window of this many samples per record and "
                        "step (windowed pre-training); 0 = whole records only")  # fmt: skip
    parser.add_argument("--latent-dim", type=int, default=256)
    parser.add_argument(
        "--variants",
        default="loop,lsemvae:conv,lsemvae:blockdiag,lsemvae:conv2d,lsemvae:matmul,identical:conv,identical:blockdiag",
        help="comma list: loop, lsemvae:<impl>, identical:<impl>; impl = conv, conv2d, matmul, blockdiag or auto",
    )
    args = parser.parse_args(argv)
    if args.small:
        args.batch, args.input_dim, args.latent_dim = min(args.batch, 8), 64, 8
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.device = "cpu" if args.device == "auto" else args.device
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
        f"torch={torch.__version__} batch={args.batch} T={args.input_dim} D={args.latent_dim} leads={args.leads} "
        f"compile={args.compile} autocast={'bf16' if device.type == 'cuda' and not args.fp32 else 'off'}",
        flush=True,
    )
    if args.end_to_end is not None and args.make_cache:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from loader_throughput import write_synthetic_cache

        write_synthetic_cache(args.end_to_end, args.make_cache, args.input_dim, "float16")
        print(f"wrote a float16 synthetic cache of {args.make_cache} records in {args.end_to_end}", flush=True)
    args.resident = {"yes": True, "no": False}.get(str(args.resident), "auto")
    args.repeats = max(int(args.repeats), 1)
    runner = run_end_to_end if args.end_to_end is not None else run_variant
    results = []
    windows = [0] + ([args.window] if args.window and args.window < args.input_dim else [])
    for window in windows:
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            label = f"{variant}@{window}" if window else variant
            try:
                res = runner(variant, args, device, window)
            except Exception as error:  # one failing variant (e.g. a compiler bug) must not lose the others' figures
                print(f"{label:>16}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
                results.append({"variant": variant, "input": "window" if window else "record",
                                "error": f"{type(error).__name__}: {error}"[:500]})  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            results.append(res)
            if window:
                per_s = res["samples_per_s"]
                rate = f"{res['windows_per_s']:10.1f} windows/s (windows of {window}, {per_s:.1f} samples/s)"
            else:
                rate = f"{res['samples_per_s']:10.1f} samples/s (records of {res['length']} = windows/s)"
            if "spread" in res:
                lo, hi = res["spread"]
                print(
                    f"{label:>16}: {rate} median of {args.repeats} (spread {lo:.1f}-{hi:.1f}); warm-up/compile "
                    f"{res['warmup_s']:.1f} s; cache {res['cache_dtype']}, resident={res['resident']}; "
                    f"params {res['parameters']:,}",
                    flush=True,
                )
            else:
                print(
                    f"{label:>16}: {rate}  {res['step_ms']:9.2f} ms/step  "
                    f"peak {'-' if res['peak_gib'] is None else format(res['peak_gib'], '.2f')} GiB  "
                    f"params {res['parameters']:,}",
                    flush=True,
                )
    for kind in ("record", "window"):  # ratios like for like: the loop on the same input
        rows = [r for r in results if r.get("input") == kind and "error" not in r]
        base = next((r for r in rows if r["variant"] == "loop"), None)
        for res in rows if base is not None else []:
            res["ratio_vs_loop"] = res["samples_per_s"] / base["samples_per_s"]
            if res is not base:
                suffix = f" (windows of {res['length']})" if kind == "window" else ""
                print(f"ratio {res['variant']} / loop = {res['ratio_vs_loop']:.2f}x{suffix}", flush=True)
    for res in (r for r in results if "error" not in r and r.get("flops_per_sample")):
        useful = next(
            (r.get("flops_per_sample") for r in results
             if r["variant"] == args.useful_flops_from and r.get("input") == res["input"]),
            None,
        )  # fmt: skip
        work = useful or res["flops_per_sample"]
        res["useful_tflops"] = res["samples_per_s"] * work / 1e12
        res["utilisation"] = res["useful_tflops"] / args.peak_tflops
        print(
            f"{res['variant']:>16}: {res['flops_per_sample'] / 1e9:.2f} GFLOP/sample executed, useful "
            f"{work / 1e9:.2f} GFLOP/sample -> {res['useful_tflops']:.1f} TFLOP/s = {100 * res['utilisation']:.1f}% "
            f"of {args.peak_tflops:g} peak",
            flush=True,
        )
    mode = "compiled" if args.compile else "eager"
    print(f"all ratios above are {mode} against {mode} (one process, same data path)", flush=True)
    summary = {"device": str(device), "torch": torch.__version__, "batch": args.batch, "compile": args.compile,
               "end_to_end": str(args.end_to_end) if args.end_to_end else None, "input_dim": args.input_dim,
               "window": windows[-1], "results": results}  # fmt: skip
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
