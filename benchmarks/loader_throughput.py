"""Throughput of BatchStream against the per-item DataLoader path: 12-lead samples/s from a cache, in one process.

Measures ``kale_ext.loaddata.batch_stream.BatchStream`` in its resident and streaming modes against
``torch.utils.data.DataLoader(ECGLeadDataset, batch_size=256, shuffle=True)`` (the pre-training path of today, in the
main process) and ``batch_loader`` (whole-batch reads, same process), for a float16 and a float32 cache. Every figure
is the median of ``--repeats`` timed epochs (after one warm-up epoch), with the min-max spread; ratios are to the
DataLoader of the same cache and to the target of 20,000 samples/s.

Run: ``python benchmarks/loader_throughput.py CACHE`` (an existing cache; its own dtype), or
``python benchmarks/loader_throughput.py --synthetic N`` (writes temporary float16 and float32 caches of N records x
12 leads x T samples in the cache layout), ``--small`` for a quick run (< 30 s). The last line is a JSON summary.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from kale_ext.loaddata.batch_stream import BatchStream
from kale_ext.loaddata.ecg_dataset import ECGLeadDataset, batch_loader
from kale_ext.loaddata.leads import CANONICAL_LEADS

TARGET = 20000.0  # 12-lead samples/s in one process


def write_synthetic_cache(out_dir: Path, n: int, length: int, dtype: str, seed: int = 0) -> Path:
    """Write ``signals.npy`` (n, 12, length), ``index.csv`` and ``spec.json`` as ``prepare_ecg_cache`` lays them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    store = np.lib.format.open_memmap(out_dir / "signals.npy", mode="w+", dtype=np.dtype(dtype), shape=(n, 12, length))
    present = rng.random((n, 12)) > 0.02
    step = max(1, 2**26 // (12 * length))
    for a in range(0, n, step):
        b = min(a + step, n)
        block = rng.standard_normal((b - a, 12, length), dtype=np.float32)
        block[~present[a:b]] = 0
        store[a:b] = block
    store.flush()
    del store
    index = pd.DataFrame(
        {
            "record_id": [f"rec{i:07d}" for i in range(n)],
            "subject_id": [f"sub{i // 2:07d}" for i in range(n)],
            "source_path": [""] * n,
        }
    )
    for j, name in enumerate(CANONICAL_LEADS):
        index[f"present_{name}"] = present[:, j].astype(int)
    index.to_csv(out_dir / "index.csv", index=False)
    meta = {
        "format_version": 1,
        "lead_names": list(CANONICAL_LEADS),
        "fingerprint": f"synthetic-{length}",
        "dtype": dtype,
        "shape": [n, 12, length],
        "n_written": n,
    }
    (out_dir / "spec.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def _timed(make_iter, min_samples: int, repeats: int) -> list[float]:
    """Samples/s of ``repeats`` timed passes (each >= min_samples, whole batches) after one warm-up pass."""
    rates = []
    for r in range(repeats + 1):
        n, start = 0, time.perf_counter()
        while n < min_samples:
            for batch in make_iter(r):
                n += batch["signals"].shape[0]
                if n >= min_samples:
                    break
        if r > 0:  # pass 0 warms the page cache, the mapping and the buffers
            rates.append(n / (time.perf_counter() - start))
    return rates


def _stream_iter(stream: BatchStream):
    def make(r: int):
        stream.set_epoch(r)
        return iter(stream)

    return make


def _summary(label: str, ds: ECGLeadDataset, rates: list[float]) -> dict:
    return {
        "loader": label,
        "cache_dtype": str(ds.signal_dtype).replace("torch.", ""),
        "length": ds.num_samples,
        "records": len(ds),
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "repeats": len(rates),
    }


def run(cache: Path, args: argparse.Namespace) -> list[dict]:
    """All measurements of one cache: the DataLoader baselines and BatchStream resident / streaming."""
    ds = ECGLeadDataset(cache, leads="12L")
    n = len(ds)
    bs = args.batch_size
    results = []
    # Baselines read fewer samples: they are slow, and their rate does not depend on how many.
    base_samples = min(n, args.baseline_samples)
    loader = DataLoader(ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0))
    results.append(_summary("DataLoader (per item)", ds, _timed(lambda r: iter(loader), base_samples, args.repeats)))
    fast = batch_loader(ds, bs, shuffle=True, seed=0)
    results.append(_summary("batch_loader", ds, _timed(lambda r: iter(fast), base_samples, args.repeats)))
    for resident in (True, False):
        start = time.perf_counter()
        stream = BatchStream(ds, batch_size=bs, seed=0, resident=resident, num_threads=args.threads)
        setup = time.perf_counter() - start
        label = "BatchStream resident" if resident else f"BatchStream streaming ({args.threads} threads)"
        row = _summary(label, ds, _timed(_stream_iter(stream), min(n, args.stream_samples), args.repeats))
        row["setup_s"] = setup
        results.append(row)
        del stream
    base = results[0]["median"]
    for row in results:
        row["ratio_vs_dataloader"] = row["median"] / base
        row["ratio_vs_target"] = row["median"] / TARGET
    return results


def main() -> None:
    """Parse the arguments, build the synthetic caches if asked, measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", nargs="?", type=Path, help="an existing cache folder (signals.npy, index.csv, ...)")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N", help="write temporary caches of N records")
    parser.add_argument("--length", type=int, default=5000, help="samples per lead of the synthetic caches")
    parser.add_argument("--small", action="store_true", help="quick run: 512 synthetic records, 3 repeats")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per figure (>= 3)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="reader threads of the streaming mode")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (gathers, collation)")
    parser.add_argument("--no-float32", action="store_true", help="synthetic: skip the float32 cache")
    args = parser.parse_args()
    if args.small and args.cache is None and args.synthetic is None:
        args.synthetic = 512
    if (args.cache is None) == (args.synthetic is None):
        parser.error("give either a CACHE folder or --synthetic N (or --small)")
    args.repeats = max(args.repeats, 3)
    args.baseline_samples = args.batch_size if args.small else 8 * args.batch_size
    args.stream_samples = 4 * args.batch_size if args.small else 10**9  # streams: whole epochs
    # One intra-op thread: the readers are Python threads, and on a shared, loaded machine several OpenMP threads
    # spin against each other (torch.stack and index_select then run up to 50x slower).
    torch.set_num_threads(args.torch_threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic is not None:
            dtypes = ["float16"] if args.no_float32 else ["float16", "float32"]
            caches = []
            for dtype in dtypes:
                start = time.perf_counter()
                caches.append(write_synthetic_cache(Path(tmp) / dtype, args.synthetic, args.length, dtype))
                elapsed = time.perf_counter() - start
                print(f"wrote a synthetic {dtype} cache of {args.synthetic} records in {elapsed:.1f} s")
        else:
            caches = [args.cache]
        for cache in caches:
            results += run(cache, args)
    header = f"{'loader':<34}{'cache':>9}{'median samples/s':>18}{'spread (min-max)':>22}"
    print(f"\n{header}{'vs DataLoader':>15}{'vs 20k':>8}")
    for r in results:
        spread = f"{r['min']:,.0f}-{r['max']:,.0f}"
        print(
            f"{r['loader']:<34}{r['cache_dtype']:>9}{r['median']:>18,.0f}{spread:>22}"
            f"{r['ratio_vs_dataloader']:>15.2f}{r['ratio_vs_target']:>8.2f}"
        )
    for r in results:
        if r["loader"].startswith("BatchStream"):
            print(f"ratio {r['loader']} {r['cache_dtype']} / DataLoader: {r['ratio_vs_dataloader']:.2f}")
    lengths = sorted({r["length"] for r in results})
    print(
        f"\n{os.cpu_count()} CPU cores, batch {args.batch_size}, {args.repeats} repeats, T = {lengths}, "
        f"torch threads {torch.get_num_threads()}."
    )
    print(json.dumps({"target": TARGET, "results": results}))


if __name__ == "__main__":
    main()
