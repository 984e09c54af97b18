"""Build a preprocessed, fingerprinted, memory-mapped ECG cache from WFDB records: resumable, parallel, shardable.

Cache layout (``out_dir``):

- ``signals.npy``: (N, 12, T) float32 or float16, canonical lead order ``I II III aVR aVL aVF V1..V6`` (absent leads
  are zeros and marked absent); open it with ``np.load(path, mmap_mode="r")``.
- ``index.csv``: one row per written record: ``record_id, subject_id, source_path, present_I .. present_V6`` (0/1),
  then the record's metadata columns (source table columns, header comments) in sorted order.
- ``qc.csv``: one row per input record: ``record_id, status (ok|skipped), reason``.
- ``spec.json``: lead names, the :class:`~kale_ext.prepdata.ecg_transforms.PreprocessSpec`, its fingerprint, the
  counts and the signal shape. It is written last: its presence marks a complete cache.

How the work is split: the input list is cut into *parts* of ``part_size`` records (part ids are global). Each part
is processed by one worker, which writes ``part_XXXXXX.npy``/``.index.csv``/``.qc.csv`` atomically and then a
``.done`` marker. A re-run skips parts with a marker, so an interrupted job continues where it stopped. With
``num_shards = K`` the parts are split into K contiguous blocks; shard ``i`` writes its parts to
``out_dir/shards/shard-i-of-K/`` and :func:`merge_shards` assembles them. Assembly streams the parts in id order
into the memory map, so the result is byte-identical whether the job ran in one go, resumed, or ran as shards, and
peak memory is bounded by one part per worker, not by N.

CLI: ``python -m kale_ext.prepdata.ecg_cache SOURCE OUT [--workers N] [--num-shards K --shard-index i] [--merge]``.
"""

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kale_ext.loaddata.leads import CANONICAL_LEADS, resolve_leads
from kale_ext.loaddata.wfdb_sources import RecordRef, list_records, read_record
from kale_ext.prepdata.ecg_transforms import PreprocessSpec, QualityError, preprocess_record
from kale_ext.utils.files import atomic_save_npy, atomic_write_text, canonical_json, short_hash

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BASE_COLUMNS = ["record_id", "subject_id", "source_path"]
PRESENT_COLUMNS = [f"present_{name}" for name in CANONICAL_LEADS]
QC_COLUMNS = ["record_id", "status", "reason"]
_WORK_FILE = "work.json"


@dataclass
class CacheReport:
    """What a prepare (or merge) call did.

    Attributes:
        out_dir: the cache folder.
        n_input: records in the input list (all shards).
        n_written: records written to ``signals.npy`` (0 until the cache is assembled).
        skipped: ``(record_id, reason)`` for every skipped record (complete once assembled).
        fingerprint: fingerprint of the preprocessing spec.
        complete: True when ``signals.npy``, ``index.csv``, ``qc.csv`` and ``spec.json`` are assembled.
        parts_done: parts finished (for this shard, when sharded).
        parts_total: parts to do (for this shard, when sharded).
        elapsed_s: wall time of this call.
    """

    out_dir: Path
    n_input: int
    n_written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fingerprint: str = ""
    complete: bool = False
    parts_done: int = 0
    parts_total: int = 0
    elapsed_s: float = 0.0

    @property
    def n_skipped(self) -> int:
        """Number of skipped records."""
        return len(self.skipped)


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def _part_stem(part_id: int) -> str:
    return f"part_{part_id:06d}"


def _process_part(task: tuple) -> tuple[int, int]:
    """Preprocess one part and write its files; returns ``(part_id, number of records)``."""
    part_id, refs, spec_dict, leads, dtype, parts_dir = task
    parts_dir = Path(parts_dir)
    stem = _part_stem(part_id)
    if (parts_dir / f"{stem}.done").exists():
        return part_id, len(refs)
    spec = PreprocessSpec.from_dict(spec_dict)
    arrays, index_rows, qc_rows = [], [], []
    for ref in refs:
        try:
            raw = read_record(ref.path)
            out = preprocess_record(raw.signals, raw.fs, raw.channel_names, spec, leads)
        except QualityError as err:
            qc_rows.append((ref.record_id, "skipped", err.describe()))
            continue
        except Exception as err:  # noqa: BLE001 - any reader/parser failure is a QC reason, never a crash
            qc_rows.append((ref.record_id, "skipped", _one_line(f"unreadable: {type(err).__name__}: {err}")))
            continue
        arrays.append(out.signals.astype(dtype))
        row = {"record_id": ref.record_id, "subject_id": ref.subject_id, "source_path": ref.source_path}
        row.update({col: int(m) for col, m in zip(PRESENT_COLUMNS, out.mask)})
        meta = {**raw.comments, **ref.metadata}
        row.update({k: _one_line(v, 1000) for k, v in meta.items() if k not in row})
        index_rows.append(row)
        qc_rows.append((ref.record_id, "ok", ""))
    shape = (0, len(CANONICAL_LEADS), spec.target_length)
    stack = np.stack(arrays) if arrays else np.zeros(shape, dtype=dtype)
    atomic_save_npy(parts_dir / f"{stem}.npy", stack)
    index = pd.DataFrame(index_rows, columns=None if index_rows else BASE_COLUMNS + PRESENT_COLUMNS)
    atomic_write_text(parts_dir / f"{stem}.index.csv", index.to_csv(index=False))
    atomic_write_text(parts_dir / f"{stem}.qc.csv", pd.DataFrame(qc_rows, columns=QC_COLUMNS).to_csv(index=False))
    atomic_write_text(parts_dir / f"{stem}.done", "")
    return part_id, len(refs)


def _work_manifest(refs: Sequence[RecordRef], spec: PreprocessSpec, leads, dtype, part_size: int, source) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": spec.fingerprint(),
        "spec": spec.to_dict(),
        "leads": list(leads),
        "dtype": np.dtype(dtype).name,
        "part_size": int(part_size),
        "n_input": len(refs),
        "n_parts": (len(refs) + part_size - 1) // part_size,
        "inputs_hash": short_hash([[r.record_id, r.source_path, r.subject_id] for r in refs]),
        "source": str(source),
    }


def _check_or_write_manifest(work_dir: Path, manifest: dict, overwrite: bool) -> None:
    path = work_dir / _WORK_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != manifest:
            if not overwrite:
                raise ValueError(
                    f"{work_dir} holds unfinished work for other inputs or another spec (fingerprint "
                    f"{old.get('fingerprint')} vs {manifest['fingerprint']}); use a new out_dir or pass overwrite=True"
                )
            shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        atomic_write_text(path, canonical_json(manifest))


def _load_complete(out_dir: Path) -> dict | None:
    path = out_dir / "spec.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _report_from_cache(out_dir: Path, meta: dict, elapsed: float = 0.0) -> CacheReport:
    qc = pd.read_csv(out_dir / "qc.csv", dtype=str, keep_default_na=False)
    skipped = [(r, why) for r, s, why in qc[QC_COLUMNS].itertuples(index=False) if s != "ok"]
    return CacheReport(
        out_dir=out_dir,
        n_input=int(meta["n_input"]),
        n_written=int(meta["n_written"]),
        skipped=skipped,
        fingerprint=meta["fingerprint"],
        complete=True,
        parts_done=int(meta["n_parts"]),
        parts_total=int(meta["n_parts"]),
        elapsed_s=elapsed,
    )


def _run_parts(tasks: list[tuple], num_workers: int, progress: bool, total_records: int) -> int:
    from tqdm.auto import tqdm  # progress bar only where work is done

    done = 0
    with tqdm(total=total_records, unit="rec", disable=not progress, desc="prepare ECG cache") as bar:
        if num_workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                _, n = _process_part(task)
                done += 1
                bar.update(n)
        else:
            with ProcessPoolExecutor(max_workers=num_workers) as pool:
                futures = [pool.submit(_process_part, task) for task in tasks]
                for future in as_completed(futures):
                    _, n = future.result()
                    done += 1
                    bar.update(n)
    return done


def _assemble(out_dir: Path, part_files: dict[int, Path], manifest: dict) -> CacheReport:
    """Stream the parts, in id order, into the final cache files; spec.json is written last."""
    n_parts = manifest["n_parts"]
    missing = [i for i in range(n_parts) if i not in part_files]
    if missing:
        raise RuntimeError(f"cannot assemble {out_dir}: parts {missing[:5]} are not done; re-run the prepare step")
    spec = PreprocessSpec.from_dict(manifest["spec"])
    stems = [part_files[i] for i in range(n_parts)]
    counts = [np.load(f"{s}.npy", mmap_mode="r").shape[0] for s in stems]
    n_written = int(sum(counts))
    shape = (n_written, len(CANONICAL_LEADS), spec.target_length)
    final = out_dir / "signals.npy"
    tmp = out_dir / ".signals.npy.tmp"
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(manifest["dtype"]), shape=shape)
    row = 0
    for stem, count in zip(stems, counts):
        if count:
            store[row : row + count] = np.load(f"{stem}.npy", mmap_mode="r")
            row += count
    store.flush()
    del store
    os.replace(tmp, final)
    index = pd.concat([pd.read_csv(f"{s}.index.csv", dtype=str, keep_default_na=False) for s in stems])
    fixed = BASE_COLUMNS + PRESENT_COLUMNS
    index = index.reindex(columns=fixed + sorted(c for c in index.columns if c not in fixed)).fillna("")
    atomic_write_text(out_dir / "index.csv", index.to_csv(index=False))
    qc = pd.concat([pd.read_csv(f"{s}.qc.csv", dtype=str, keep_default_na=False) for s in stems])
    atomic_write_text(out_dir / "qc.csv", qc.to_csv(index=False))
    if len(qc) != manifest["n_input"] or (qc["status"] == "ok").sum() != n_written:
        raise RuntimeError(f"cache {out_dir} is inconsistent ({len(qc)} QC rows for {manifest['n_input']} inputs)")
    meta = {
        "format_version": FORMAT_VERSION,
        "lead_names": list(CANONICAL_LEADS),
        "leads": manifest["leads"],
        "spec": manifest["spec"],
        "fingerprint": manifest["fingerprint"],
        "dtype": manifest["dtype"],
        "shape": list(shape),
        "n_input": manifest["n_input"],
        "n_written": n_written,
        "n_skipped": manifest["n_input"] - n_written,
        "n_parts": n_parts,
        "inputs_hash": manifest["inputs_hash"],
        "source": manifest["source"],
    }
    atomic_write_text(out_dir / "spec.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info("cache %s: %d of %d records written", out_dir, n_written, manifest["n_input"])
    return _report_from_cache(out_dir, meta)


def _part_files(parts_dir: Path) -> dict[int, Path]:
    out = {}
    for marker in parts_dir.glob("part_*.done"):
        out[int(marker.stem.split("_")[1])] = parts_dir / marker.stem
    return out


def prepare_ecg_cache(
    source: str | Path | Sequence[RecordRef],
    out_dir: str | Path,
    *,
    spec: PreprocessSpec | None = None,
    leads: str | Sequence[str] = "12L",
    num_workers: int | None = None,
    num_shards: int = 1,
    shard_index: int | None = None,
    part_size: int = 256,
    dtype: str = "float32",
    progress: bool = True,
    source_kind: str = "auto",
    max_parts: int | None = None,
    keep_parts: bool = False,
    overwrite: bool = False,
) -> CacheReport:
    """Preprocess every record of ``source`` into a cache at ``out_dir`` (see the module docstring for the layout).

    Args:
        source: folder / manifest CSV (see :mod:`kale_ext.loaddata.wfdb_sources`) or a list of ``RecordRef``.
        out_dir: cache folder (created).
        spec: preprocessing knobs; default :class:`PreprocessSpec` (500 Hz, 5000 samples).
        leads: leads a record must have to be written (``"12L"``, ``"6L"`` or names); all 12 slots are always
            stored, absent ones masked.
        num_workers: processes; ``None`` = all CPU cores, 0 or 1 = in this process.
        num_shards: split the parts into this many shards (cluster array jobs).
        shard_index: which shard this call processes (required when ``num_shards > 1``); then call
            :func:`merge_shards` once every shard is done.
        part_size: records per part (the unit of resumption; memory per worker ~ part_size x 12 x T x 4 bytes).
        dtype: ``"float32"`` or ``"float16"`` for ``signals.npy``.
        progress: show a tqdm progress bar.
        source_kind: ``"auto"`` or a kind of :func:`~kale_ext.loaddata.wfdb_sources.list_records`.
        max_parts: process at most this many unfinished parts, then return without assembling (for time-boxed
            jobs; a later call continues).
        keep_parts: keep the part files after assembly (they are deleted by default).
        overwrite: discard unfinished or complete work built from other inputs or another spec.

    Returns:
        :class:`CacheReport`; ``complete`` is False when work is left (``max_parts``) or when this is one shard.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    spec = spec or PreprocessSpec()
    leads = resolve_leads(leads)
    if np.dtype(dtype) not in (np.dtype("float32"), np.dtype("float16")):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if part_size < 1:
        raise ValueError("part_size must be >= 1")
    refs = list(source) if not isinstance(source, (str, Path)) else list_records(source, source_kind)
    manifest = _work_manifest(refs, spec, leads, dtype, part_size, source if isinstance(source, (str, Path)) else "")
    sharded = num_shards > 1
    if sharded and (shard_index is None or not 0 <= shard_index < num_shards):
        raise ValueError(f"num_shards={num_shards} needs shard_index in [0, {num_shards - 1}]")
    existing = _load_complete(out_dir)
    if existing is not None:
        same = existing["fingerprint"] == manifest["fingerprint"] and existing["inputs_hash"] == manifest["inputs_hash"]
        if same and existing["dtype"] == manifest["dtype"] and existing["n_parts"] == manifest["n_parts"]:
            logger.info("cache %s is already complete; nothing to do", out_dir)
            return _report_from_cache(out_dir, existing, time.perf_counter() - start)
        if not overwrite:
            raise ValueError(
                f"{out_dir} already holds a cache built from other inputs or spec (fingerprint "
                f"{existing['fingerprint']}); use a new out_dir or pass overwrite=True"
            )
        for name in ("spec.json", "signals.npy", "index.csv", "qc.csv"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    part_ids = list(range(manifest["n_parts"]))
    if sharded:
        part_ids = [int(i) for i in np.array_split(np.arange(manifest["n_parts"]), num_shards)[shard_index]]
        work_dir = out_dir / "shards" / f"shard-{shard_index:04d}-of-{num_shards:04d}"
        shard_manifest = {**manifest, "num_shards": num_shards, "shard_index": shard_index}
        _check_or_write_manifest(work_dir, shard_manifest, overwrite)
    else:
        work_dir = out_dir / "parts"
        _check_or_write_manifest(work_dir, manifest, overwrite)
    done = _part_files(work_dir)
    pending = [i for i in part_ids if i not in done]
    if max_parts is not None:
        pending = pending[: max(int(max_parts), 0)]
    tasks = [
        (i, refs[i * part_size : (i + 1) * part_size], spec.to_dict(), leads, dtype, str(work_dir)) for i in pending
    ]
    workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
    _run_parts(tasks, workers, progress, sum(len(t[1]) for t in tasks))
    done = _part_files(work_dir)
    finished = all(i in done for i in part_ids)
    if sharded and finished:
        atomic_write_text(work_dir / "shard.done", "")
    if not sharded and finished:
        report = _assemble(out_dir, done, manifest)
        if not keep_parts:
            shutil.rmtree(work_dir)
        report.elapsed_s = time.perf_counter() - start
        return report
    skipped = []
    for i in part_ids:
        if i in done:
            qc = pd.read_csv(f"{done[i]}.qc.csv", dtype=str, keep_default_na=False)
            skipped += [(r, why) for r, s, why in qc[QC_COLUMNS].itertuples(index=False) if s != "ok"]
    return CacheReport(
        out_dir=out_dir,
        n_input=len(refs),
        n_written=0,
        skipped=skipped,
        fingerprint=manifest["fingerprint"],
        complete=False,
        parts_done=sum(i in done for i in part_ids),
        parts_total=len(part_ids),
        elapsed_s=time.perf_counter() - start,
    )


def merge_shards(out_dir: str | Path, *, keep_parts: bool = False) -> CacheReport:
    """Assemble the cache from the shards under ``out_dir/shards/`` once every shard is done.

    Args:
        out_dir: the folder every shard job was given.
        keep_parts: keep the shard folders after assembly.

    Returns:
        :class:`CacheReport` of the assembled cache.

    Raises:
        RuntimeError: shards are missing, unfinished or built with different inputs/specs.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    shard_dirs = sorted((out_dir / "shards").glob("shard-*"))
    if not shard_dirs:
        existing = _load_complete(out_dir)
        if existing is not None:
            return _report_from_cache(out_dir, existing)
        raise RuntimeError(f"no shards under {out_dir / 'shards'}; run prepare_ecg_cache with shard_index first")
    manifests = [json.loads((d / _WORK_FILE).read_text(encoding="utf-8")) for d in shard_dirs]
    common = [{k: v for k, v in m.items() if k != "shard_index"} for m in manifests]
    if any(c != common[0] for c in common):
        raise RuntimeError(f"shards under {out_dir} were built with different inputs or specs; rebuild them")
    num_shards = common[0]["num_shards"]
    indices = sorted(m["shard_index"] for m in manifests)
    unfinished = [d.name for d in shard_dirs if not (d / "shard.done").exists()]
    if indices != list(range(num_shards)) or unfinished:
        missing = sorted(set(range(num_shards)) - set(indices))
        raise RuntimeError(f"cannot merge {out_dir}: shards {missing} missing, {unfinished} unfinished; run them first")
    files: dict[int, Path] = {}
    for d in shard_dirs:
        files.update(_part_files(d))
    manifest = {k: v for k, v in common[0].items() if k != "num_shards"}
    report = _assemble(out_dir, files, manifest)
    if not keep_parts:
        shutil.rmtree(out_dir / "shards")
    report.elapsed_s = time.perf_counter() - start
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring); returns the process exit code."""
    parser = argparse.ArgumentParser(description="Preprocess WFDB ECG records into a memory-mapped cache.")
    parser.add_argument("source", help="folder of WFDB records, root with record_list.csv, or manifest CSV")
    parser.add_argument("out", help="cache folder")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--shard-index", type=int, default=None)
    parser.add_argument("--merge", action="store_true", help="assemble the finished shards under OUT and exit")
    parser.add_argument("--leads", default="12L", help="required leads: 12L, 6L or comma-separated names")
    parser.add_argument("--target-fs", type=float, default=500.0)
    parser.add_argument("--target-length", type=int, default=5000)
    parser.add_argument("--derive-limb-leads", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--part-size", type=int, default=256)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.merge:
        report = merge_shards(args.out)
    else:
        leads = args.leads if args.leads in ("12L", "6L") else [s for s in args.leads.split(",") if s]
        spec = PreprocessSpec(
            target_fs=args.target_fs, target_length=args.target_length, derive_limb_leads=args.derive_limb_leads
        )
        report = prepare_ecg_cache(
            args.source,
            args.out,
            spec=spec,
            leads=leads,
            num_workers=args.workers,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            part_size=args.part_size,
            dtype=args.dtype,
            progress=not args.no_progress,
        )
    logger.info(
        "n_input=%d n_written=%d n_skipped=%d complete=%s fingerprint=%s",
        report.n_input,
        report.n_written,
        report.n_skipped,
        report.complete,
        report.fingerprint,
    )
    for record_id, reason in report.skipped[:20]:
        logger.info("skipped %s: %s", record_id, reason)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
