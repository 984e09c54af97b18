"""Throughput of the data engine: WFDB -> cache records/s per core, and cache -> DataLoader samples/s per worker.

Writes N synthetic 10 s, 500 Hz, 12-lead WFDB records (kale_ext.loaddata.synthetic) to a temporary folder, builds
the cache with one worker and with all cores, then reads the cache through ECGLeadDataset + DataLoader with 0, 1
and several workers. Prints a table and the ratio of each figure to its target (>= 100 records/s per core for the
cache, >= 20,000 samples/s per loader worker). Run: ``python benchmarks/prepare_throughput.py [--small]``.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kale_ext.loaddata.ecg_dataset import ECGLeadDataset, batch_loader
from kale_ext.loaddata.synthetic import write_synthetic_cohort
from kale_ext.prepdata.ecg_cache import prepare_ecg_cache

CACHE_TARGET = 100.0  # records/s per core
LOADER_TARGET = 20000.0  # samples/s per loader worker


def _loader_rate(cache: Path, leads: str, workers: int, batch_size: int, min_samples: int, batched: bool) -> float:
    ds = ECGLeadDataset(cache, leads=leads)
    if batched:
        loader = batch_loader(ds, batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    else:
        loader = DataLoader(
            ds, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
        )
    for _ in loader:  # warm-up epoch: worker start-up and page cache
        break
    n, start = 0, time.perf_counter()
    while n < min_samples:
        for batch in loader:
            n += batch["signals"].shape[0]
    return n / (time.perf_counter() - start)


def _item_rate(cache: Path, leads: str, min_samples: int) -> float:
    ds = ECGLeadDataset(cache, leads=leads)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    n, start = 0, time.perf_counter()
    while n < min_samples:
        for i in order:
            ds[i]
        n += len(order)
    return n / (time.perf_counter() - start)


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="few records, quick run")
    parser.add_argument("--records", type=int, default=None, help="records to generate (default 2000, small 200)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cores for the parallel run")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    n_records = args.records or (200 if args.small else 2000)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        write_synthetic_cohort(tmp / "src", n_subjects=n_records, seed=0, fs=500.0, duration_s=10.0)
        print(f"generated {n_records} synthetic records in {time.perf_counter() - start:.1f} s")
        for workers in sorted({1, args.workers}):
            out = tmp / f"cache{workers}"
            start = time.perf_counter()
            report = prepare_ecg_cache(tmp / "src", out, num_workers=workers, progress=False, part_size=64)
            rate = report.n_input / (time.perf_counter() - start)
            per_core = rate / workers
            rows.append((f"WFDB -> cache, {workers} worker(s)", f"{rate:,.0f} rec/s", per_core, CACHE_TARGET))
        cache = tmp / f"cache{args.workers}"
        for leads in ("12L", "6L"):
            rate = _item_rate(cache, leads, min_samples=2 * n_records)
            rows.append((f"dataset[i] {leads}, no collate", f"{rate:,.0f} samples/s", rate, LOADER_TARGET))
            for batched in (False, True):
                for workers in sorted({0, 1, args.workers}):
                    rate = _loader_rate(cache, leads, workers, args.batch_size, 4 * n_records, batched)
                    per_worker = rate / max(workers, 1)
                    kind = "batch_loader" if batched else "DataLoader"
                    label = f"{kind} {leads}, {workers} worker(s)"
                    rows.append((label, f"{rate:,.0f} samples/s", per_worker, LOADER_TARGET))
    print(f"\n{'measurement':<34}{'total':>20}{'per core/worker':>18}{'target':>10}{'ratio':>8}")
    for label, total, per, target in rows:
        print(f"{label:<34}{total:>20}{per:>18,.0f}{target:>10,.0f}{per / target:>8.2f}")
    print(f"\n{os.cpu_count()} CPU cores; records: {n_records} x 12 leads x 5000 samples (float32 cache).")


if __name__ == "__main__":
    main()
