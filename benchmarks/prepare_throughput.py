"""Throughput of the data engine: WFDB -> cache records/s per core, and cache -> DataLoader samples/s per worker.

Writes N synthetic 10 s, 500 Hz, 12-lead WFDB records (kale_ext.loaddata.synthetic) to a temporary folder, builds
the cache with one worker and with all cores, then reads the cache through ECGLeadDataset + DataLoader with 0, 1
and several workers. Prints a table and the ratio of each figure to its target (>= 100 records/s per core for the
cache, >= 20,000 samples/s per loader worker).

Assembly memory: part files for two cache sizes (default 500 and 4,000 records of 12 x 500 samples; ``--small``: 200
and 1,600) are written directly (no WFDB), then a fresh process runs the cache builder's assembly and reports its
peak resident memory (``VmHWM`` of ``/proc/self/status``, reset before the assembly). The ratio of the peaks of the
two sizes should stay within 10% (constant memory). The same parts are also assembled the old way, through a
writable ``np.lib.format.open_memmap``, whose peak grows with the cache size: the contrast shows that the
measurement can see growth. The last line is a JSON summary.

Run: ``python benchmarks/prepare_throughput.py [--small] [--assembly-only]``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kale_ext.loaddata.leads import CANONICAL_LEADS
from kale_ext.loaddata.wfdb_sources import RecordRef
from kale_ext.prepdata.ecg_cache import BASE_COLUMNS, PRESENT_COLUMNS, QC_COLUMNS, prepare_ecg_cache
from kale_ext.prepdata.ecg_transforms import PreprocessSpec

CACHE_TARGET = 100.0  # records/s per core
LOADER_TARGET = 20000.0  # samples/s per loader worker
RSS_RATIO_TARGET = 1.10  # peak RSS of assembly, large cache / small cache
ASSEMBLY_T = 500
ASSEMBLY_PART_SIZE = 100


def _fake_refs(root: Path, n: int) -> list[RecordRef]:
    return [RecordRef(f"r{i:06d}", str(root / "none" / f"r{i:06d}"), f"s{i:06d}", f"r{i:06d}") for i in range(n)]


def _spec() -> PreprocessSpec:
    return PreprocessSpec(target_fs=500.0, target_length=ASSEMBLY_T)


def _write_parts(root: Path, n: int) -> Path:
    """Register the work with the builder (no part processed), then write every part's files directly."""
    out = root / "cache"
    refs = _fake_refs(root, n)
    prepare_ecg_cache(refs, out, spec=_spec(), num_workers=0, progress=False, max_parts=0, part_size=ASSEMBLY_PART_SIZE)
    rng = np.random.default_rng(0)
    for part, start in enumerate(range(0, n, ASSEMBLY_PART_SIZE)):
        chunk = refs[start : start + ASSEMBLY_PART_SIZE]
        stem = out / "parts" / f"part_{part:06d}"
        data = rng.standard_normal((len(chunk), len(CANONICAL_LEADS), ASSEMBLY_T), dtype=np.float32)
        np.save(f"{stem}.npy", data)
        index = pd.DataFrame(
            [[r.record_id, r.subject_id, r.source_path] + [1] * len(PRESENT_COLUMNS) for r in chunk],
            columns=BASE_COLUMNS + PRESENT_COLUMNS,
        )
        index.to_csv(f"{stem}.index.csv", index=False)
        pd.DataFrame([[r.record_id, "ok", "", "", ""] for r in chunk], columns=QC_COLUMNS).to_csv(
            f"{stem}.qc.csv", index=False
        )
        Path(f"{stem}.done").write_text("")
    return out


def _vm(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _assembly_child(root: Path, n: int, mode: str) -> dict:
    """Run in a fresh process: assemble the parts under ``root`` and measure the peak resident memory."""
    out = root / "cache"
    stems = sorted(str(p)[: -len(".done")] for p in (out / "parts").glob("part_*.done"))
    refs = _fake_refs(root, n)
    reset = _reset_peak()
    before_rss, before_peak = _vm("VmRSS"), _vm("VmHWM")
    start = time.perf_counter()
    if mode == "sequential":
        report = prepare_ecg_cache(refs, out, spec=_spec(), num_workers=0, progress=False, part_size=ASSEMBLY_PART_SIZE)
        assert report.complete and report.n_written == n, report
        target = out / "signals.npy"
    else:  # the former assembly: a writable memory map of the whole file
        target = out / "memmap.npy"
        store = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32, shape=(n, 12, ASSEMBLY_T))
        row = 0
        for stem in stems:
            part = np.load(f"{stem}.npy", mmap_mode="r")
            store[row : row + len(part)] = part
            row += len(part)
        store.flush()
        del store
    elapsed = time.perf_counter() - start
    return {
        "mode": mode,
        "records": n,
        "bytes": target.stat().st_size,
        "peak_rss": _vm("VmHWM"),
        "rss_before": before_rss,
        "peak_before": before_peak,
        "peak_reset": reset,
        "seconds": elapsed,
    }


def assembly_memory(sizes: tuple[int, int]) -> dict:
    """Peak RSS of assembly at two cache sizes, sequential (the builder) and memory-mapped (the former way)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sequential", "memmap"):
            for n in sizes:
                root = Path(tmp) / f"{mode}_{n}"
                _write_parts(root, n)
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                cmd = [sys.executable, __file__, "--assembly-child", str(root), str(n), mode]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(f"assembly child failed: {proc.stderr[-2000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    by = {(r["mode"], r["records"]): r for r in results}
    ratios = {
        mode: by[(mode, sizes[1])]["peak_rss"] / by[(mode, sizes[0])]["peak_rss"] for mode in ("sequential", "memmap")
    }
    return {"sizes": list(sizes), "T": ASSEMBLY_T, "results": results, "ratio": ratios, "target": RSS_RATIO_TARGET}


def _print_assembly(summary: dict) -> None:
    mib = 1 << 20
    print(f"\n{'assembly':<12}{'records':>9}{'cache MiB':>11}{'peak RSS MiB':>14}{'growth MiB':>12}{'s':>7}")
    for r in summary["results"]:
        growth = (r["peak_rss"] - r["rss_before"]) / mib
        print(
            f"{r['mode']:<12}{r['records']:>9,}{r['bytes'] / mib:>11.1f}{r['peak_rss'] / mib:>14.1f}"
            f"{growth:>12.1f}{r['seconds']:>7.2f}"
        )
    small, large = summary["sizes"]
    for mode, ratio in summary["ratio"].items():
        verdict = "within" if ratio <= summary["target"] else "above"
        print(f"peak RSS ratio {large:,} / {small:,} records, {mode}: {ratio:.3f} ({verdict} {summary['target']:.2f})")


def _loader_rate(cache: Path, leads: str, workers: int, batch_size: int, min_samples: int, batched: bool) -> float:
    from torch.utils.data import DataLoader  # torch only where the loaders are timed: the memory child stays lean

    from kale_ext.loaddata.ecg_dataset import ECGLeadDataset, batch_loader

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
    import torch

    from kale_ext.loaddata.ecg_dataset import ECGLeadDataset

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
    if len(sys.argv) == 5 and sys.argv[1] == "--assembly-child":
        print(json.dumps(_assembly_child(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="few records, quick run")
    parser.add_argument("--assembly-only", action="store_true", help="only the assembly memory measurement")
    parser.add_argument("--records", type=int, default=None, help="records to generate (default 2000, small 200)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cores for the parallel run")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    n_records = args.records or (200 if args.small else 2000)
    summary = assembly_memory((200, 1600) if args.small else (500, 4000))
    _print_assembly(summary)
    if args.assembly_only:
        print(json.dumps({"assembly": summary}))
        return
    import torch

    from kale_ext.loaddata.synthetic import write_synthetic_cohort

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
    print(json.dumps({"assembly": summary, "throughput": [[r[0], r[2], r[3]] for r in rows]}))


if __name__ == "__main__":
    main()
