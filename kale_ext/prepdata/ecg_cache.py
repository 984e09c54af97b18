"""Build a preprocessed, fingerprinted, memory-mapped ECG cache from WFDB records: resumable, parallel, shardable.

Cache layout (``out_dir``):

- ``signals.npy``: (N, 12, T) float32 or float16, canonical lead order ``I II III aVR aVL aVF V1..V6`` (absent leads
  are zeros and marked absent); open it with ``np.load(path, mmap_mode="r")``.
- ``index.csv``: one row per written record: ``record_id, subject_id, source_path, present_I .. present_V6`` (0/1),
  then the record's metadata columns (source table columns, header comments) in sorted order.
- ``qc.csv``: one row per input record: ``record_id, status (ok|skipped), reason, lead_qc, notes`` (``lead_qc``:
  the leads masked by a per-lead check, ``;``-separated; ``notes``: inverted channels negated, ignored channels).
- ``sources.csv``: one row per input record: ``record_id, source_path, stamp`` (sizes and modification times of its
  files): the source fingerprint, used to tell which records changed.
- ``spec.json``: lead names, the :class:`~kale_ext.prepdata.ecg_transforms.PreprocessSpec`, its fingerprint, the
  source fingerprint, the QC counts and the signal shape. It is written last: its presence marks a complete cache.

Safety: a builder holds a lock on ``out_dir/.lock`` (a shard on its own folder), so a second concurrent builder
waits (up to ``lock_timeout_s``) and then finds the finished cache instead of interleaving writes. An existing cache
is reused only when its spec, lead selection and source fingerprint (record paths, file sizes and modification times)
all match (:func:`cache_matches`); otherwise it is rebuilt with ``overwrite=True`` or refused with a message naming
the difference. Paths are resolved before they are fingerprinted, so ``./data`` and ``/home/me/data`` are the same
source. Assembly checks the free space first and writes ``signals.npy`` sequentially (constant memory), fsyncs it
and renames it into place.

How the work is split: the input list is cut into *parts* of ``part_size`` records (part ids are global). Each part
is processed by one worker, which writes ``part_XXXXXX.npy``/``.index.csv``/``.qc.csv`` atomically and then a
``.done`` marker. A re-run skips parts with a marker, so an interrupted job continues where it stopped. With
``num_shards = K`` the parts are split into K contiguous blocks; shard ``i`` writes its parts to
``out_dir/shards/shard-i-of-K/`` and :func:`merge_shards` assembles them. Assembly streams the parts in id order
into ``signals.npy``, so the result is byte-identical whether the job ran in one go, resumed, or ran as shards, and
peak memory is bounded by one part per worker, not by N.

CLI: ``python -m kale_ext.prepdata.ecg_cache SOURCE OUT [--workers N] [--num-shards K --shard-index i] [--merge]
[--overwrite] [--powerline 50|60|off] [--highpass-hz HZ] [--mask-bad-leads --min-good-leads K]``.
"""

import argparse
import errno
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kale_ext.loaddata.leads import CANONICAL_LEADS, resolve_leads
from kale_ext.loaddata.record_table import list_source_records
from kale_ext.loaddata.wfdb_sources import RecordReadError, RecordRef, find_header, read_record
from kale_ext.prepdata.ecg_transforms import PreprocessSpec, QualityError, preprocess_record
from kale_ext.utils.files import (
    atomic_save_npy,
    atomic_write,
    atomic_write_text,
    canonical_json,
    concat_npy,
    file_lock,
    free_bytes,
    npy_size,
    read_npy_header,
    remove_stale_temps,
    short_hash,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
BASE_COLUMNS = ["record_id", "subject_id", "source_path"]
PRESENT_COLUMNS = [f"present_{name}" for name in CANONICAL_LEADS]
QC_COLUMNS = ["record_id", "status", "reason", "lead_qc", "notes"]
SOURCE_COLUMNS = ["record_id", "source_path", "stamp"]
LOCK_NAME = ".lock"
_WORK_FILE = "work.json"
_SOURCES_FILE = "sources.csv"


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
        qc_counts: records per QC outcome: ``"ok"`` and each refusal reason (``"flat_lead"``, ``"unreadable"``, ...).
        masked_leads: leads masked by a per-lead check in written records, per reason (``"saturated_lead"``, ...).
        qc_path: the ``qc.csv`` with the reason of every record (``None`` until assembled).
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
    qc_counts: dict[str, int] = field(default_factory=dict)
    masked_leads: dict[str, int] = field(default_factory=dict)
    qc_path: Path | None = None

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
            qc_rows.append((ref.record_id, "skipped", _one_line(err.describe()), "", ""))
            continue
        except RecordReadError as err:
            qc_rows.append((ref.record_id, "skipped", _one_line(str(err)), "", ""))
            continue
        except Exception as err:  # noqa: BLE001 - any reader/parser failure is a QC reason, never a crash
            qc_rows.append((ref.record_id, "skipped", _one_line(f"unreadable: {type(err).__name__}: {err}"), "", ""))
            continue
        arrays.append(out.signals.astype(dtype))
        row = {"record_id": ref.record_id, "subject_id": ref.subject_id, "source_path": ref.source_path}
        row.update({col: int(m) for col, m in zip(PRESENT_COLUMNS, out.mask)})
        meta = {**raw.comments, **ref.metadata}
        row.update({k: _one_line(v, 1000) for k, v in meta.items() if k not in row})
        index_rows.append(row)
        lead_qc = "; ".join(out.lead_qc.values())
        qc_rows.append((ref.record_id, "ok", "", _one_line(lead_qc, 1000), _one_line("; ".join(out.notes), 1000)))
    shape = (0, len(CANONICAL_LEADS), spec.target_length)
    stack = np.stack(arrays) if arrays else np.zeros(shape, dtype=dtype)
    atomic_save_npy(parts_dir / f"{stem}.npy", stack)
    index = pd.DataFrame(index_rows, columns=None if index_rows else BASE_COLUMNS + PRESENT_COLUMNS)
    atomic_write_text(parts_dir / f"{stem}.index.csv", index.to_csv(index=False))
    atomic_write_text(parts_dir / f"{stem}.qc.csv", pd.DataFrame(qc_rows, columns=QC_COLUMNS).to_csv(index=False))
    atomic_write_text(parts_dir / f"{stem}.done", "")
    return part_id, len(refs)


def _file_stamp(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return ""
    return f"{path.suffix.lower()}:{info.st_size}:{info.st_mtime_ns}"


def _record_stamp(ref: RecordRef) -> str:
    """Sizes and modification times of a record's header and signal files (``"missing"`` without a header)."""
    try:
        header = find_header(ref.path)
    except RecordReadError:
        return "missing"
    stem = header.with_name(header.name[: -len(".hea")])
    stamps = [_file_stamp(header)] + [_file_stamp(stem.with_name(stem.name + ext)) for ext in (".dat", ".mat")]
    return ";".join(t for t in stamps if t)


def source_table(refs: Sequence[RecordRef]) -> pd.DataFrame:
    """The source fingerprint table of a record list: ``record_id, source_path, stamp`` per record.

    Args:
        refs: the records (as listed by :func:`~kale_ext.loaddata.wfdb_sources.list_records`).

    Returns:
        DataFrame with the :data:`SOURCE_COLUMNS`; ``stamp`` holds the sizes and modification times (ns) of the
        record's header and signal files, ``"missing"`` when the header is absent.
    """
    rows = [(r.record_id, r.source_path, _record_stamp(r)) for r in refs]
    return pd.DataFrame(rows, columns=SOURCE_COLUMNS)


def _source_label(source) -> str:
    return str(Path(source).resolve()) if isinstance(source, (str, Path)) else ""


def _work_manifest(
    refs: Sequence[RecordRef], spec: PreprocessSpec, leads, dtype, part_size: int, source, sources: pd.DataFrame
) -> dict:
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
        "source_hash": short_hash(sources.to_numpy().tolist()),
        "source": _source_label(source),
    }


def _read_sources(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.exists() else None


def _describe_difference(old: dict, new: dict, old_sources: pd.DataFrame | None, new_sources: pd.DataFrame) -> str:
    """One line naming how a stored cache or work manifest differs from a new request ('' when it matches)."""
    problems = []
    if old.get("format_version") != new["format_version"]:
        problems.append(f"cache format {old.get('format_version')} vs {new['format_version']} (older builder)")
    if old.get("fingerprint") != new["fingerprint"]:
        old_spec, new_spec = old.get("spec") or {}, new["spec"]
        fields = [f"{k} {old_spec.get(k)!r} -> {new_spec.get(k)!r}" for k in new_spec if old_spec.get(k) != new_spec[k]]
        problems.append(f"spec {old.get('fingerprint')} vs {new['fingerprint']} ({', '.join(fields[:4]) or 'fields'})")
    if list(old.get("leads") or []) != new["leads"]:
        problems.append(f"leads {old.get('leads')} vs {new['leads']}")
    if "dtype" in new and old.get("dtype") != new["dtype"]:
        problems.append(f"dtype {old.get('dtype')} vs {new['dtype']}")
    same_source = old.get("inputs_hash") == new["inputs_hash"] and old.get("source_hash") == new["source_hash"]
    if not same_source:
        if old_sources is None:
            problems.append("source records not fingerprinted in the stored cache")
        else:
            before = dict(zip(old_sources["record_id"], old_sources["stamp"]))
            after = dict(zip(new_sources["record_id"], new_sources["stamp"]))
            added = [r for r in after if r not in before]
            removed = [r for r in before if r not in after]
            changed = [r for r in after if r in before and before[r] != after[r]]
            parts = [
                f"{len(items)} {what} (first: {items[0]})"
                for what, items in (("added", added), ("removed", removed), ("changed on disk", changed))
                if items
            ]
            problems.append("source records " + (", ".join(parts) if parts else "reordered or re-assigned to subjects"))
    return "; ".join(problems)


def _check_or_write_manifest(work_dir: Path, manifest: dict, sources: pd.DataFrame, overwrite: bool) -> None:
    path = work_dir / _WORK_FILE
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        compared = {k: v for k, v in old.items() if k != "source"}
        if compared != {k: v for k, v in manifest.items() if k != "source"}:
            diff = _describe_difference(old, manifest, _read_sources(work_dir / _SOURCES_FILE), sources)
            if not overwrite:
                raise ValueError(
                    f"{work_dir} holds unfinished work for other inputs or another spec ({diff or 'part size'}); "
                    "use a new out_dir or pass overwrite=True (--overwrite)"
                )
            logger.info("discarding unfinished work in %s (%s)", work_dir, diff)
            shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        atomic_write_text(work_dir / _SOURCES_FILE, sources.to_csv(index=False))
        atomic_write_text(path, canonical_json(manifest))


def _load_complete(out_dir: Path) -> dict | None:
    path = out_dir / "spec.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _qc_summary(qc: pd.DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    outcome = Counter("ok" if s == "ok" else str(r).split(":")[0] for s, r in zip(qc["status"], qc["reason"]))
    masked: Counter = Counter()
    if "lead_qc" in qc.columns:
        for text in qc["lead_qc"]:
            masked.update(item.split(":")[0].strip() for item in str(text).split(";") if ":" in item)
    return dict(sorted(outcome.items())), dict(sorted(masked.items()))


def _report_from_cache(out_dir: Path, meta: dict, elapsed: float = 0.0) -> CacheReport:
    skipped: list[tuple[str, str]] = []
    outcome: Counter = Counter()
    masked_leads: Counter = Counter()
    chunks = pd.read_csv(out_dir / "qc.csv", dtype=str, keep_default_na=False, chunksize=100_000)
    for qc in chunks:  # in chunks: only the refused records are kept in memory
        skipped += [
            (r, why) for r, s, why in qc[["record_id", "status", "reason"]].itertuples(index=False) if s != "ok"
        ]
        part_counts, part_masked = _qc_summary(qc)
        outcome.update(part_counts)
        masked_leads.update(part_masked)
    counts, masked = dict(sorted(outcome.items())), dict(sorted(masked_leads.items()))
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
        qc_counts=counts,
        masked_leads=masked,
        qc_path=out_dir / "qc.csv",
    )


def _log_qc(report: CacheReport) -> None:
    refused = ", ".join(f"{k} {v}" for k, v in report.qc_counts.items() if k != "ok") or "none"
    masked = ", ".join(f"{k} {v}" for k, v in report.masked_leads.items()) or "none"
    logger.info(
        "cache %s: %d of %d records written; refused: %s; masked leads: %s; reasons per record in %s",
        report.out_dir,
        report.n_written,
        report.n_input,
        refused,
        masked,
        report.qc_path,
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


def _csv_columns(path: str) -> list[str]:
    return list(pd.read_csv(path, dtype=str, keep_default_na=False, nrows=0).columns)


def _concat_csv(
    sources: Sequence[str], target: Path, columns: list[str], visit: Callable[[pd.DataFrame], None] | None = None
) -> int:
    """Write the CSVs one after the other under one header (columns reindexed), one part in memory at a time.

    Returns the number of data rows written; ``visit`` sees each part's table.
    """
    rows = [0]

    def _write(path: Path) -> None:
        with open(path, "w", encoding="utf-8", newline="") as out:
            for k, src in enumerate(sources):
                table = pd.read_csv(src, dtype=str, keep_default_na=False).reindex(columns=columns).fillna("")
                out.write(table.to_csv(index=False, header=k == 0))
                rows[0] += len(table)
                if visit is not None:
                    visit(table)

    atomic_write(target, _write, fsync=True)
    return rows[0]


def _assemble(
    out_dir: Path, part_files: dict[int, Path], manifest: dict, sources: Path, free_space: Callable[[Path], int]
) -> CacheReport:
    """Stream the parts, in id order, into the final cache files; spec.json is written last."""
    n_parts = manifest["n_parts"]
    missing = [i for i in range(n_parts) if i not in part_files]
    if missing:
        raise RuntimeError(f"cannot assemble {out_dir}: parts {missing[:5]} are not done; re-run the prepare step")
    spec = PreprocessSpec.from_dict(manifest["spec"])
    stems = [str(part_files[i]) for i in range(n_parts)]
    npys = [f"{s}.npy" for s in stems]
    n_written = int(sum(read_npy_header(p)[0][0] for p in npys))
    shape = (n_written, len(CANONICAL_LEADS), spec.target_length)
    csv_bytes = sum(os.path.getsize(f"{s}.{kind}.csv") for s in stems for kind in ("index", "qc"))
    needed = npy_size(shape, manifest["dtype"]) + csv_bytes + os.path.getsize(sources) + (1 << 20)
    available = int(free_space(out_dir))
    if available < needed:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space in {out_dir} to assemble the cache: {needed:,} bytes needed, {available:,} "
            "available; free some space (the finished parts are kept, a re-run only assembles) or use another out_dir",
        )
    if not npys:
        atomic_save_npy(out_dir / "signals.npy", np.zeros(shape, dtype=manifest["dtype"]))
    else:
        written = concat_npy(npys, out_dir / "signals.npy")
        if tuple(written) != shape or read_npy_header(out_dir / "signals.npy")[1] != np.dtype(manifest["dtype"]):
            raise RuntimeError(f"parts of {out_dir} hold {written}, expected {shape}; rebuild with overwrite=True")
    index_cols: list[str] = []
    for stem in stems:
        index_cols += [c for c in _csv_columns(f"{stem}.index.csv") if c not in index_cols]
    fixed = BASE_COLUMNS + PRESENT_COLUMNS
    index_cols = fixed + sorted(c for c in index_cols if c not in fixed)
    _concat_csv([f"{s}.index.csv" for s in stems], out_dir / "index.csv", index_cols)
    outcome: Counter = Counter()
    masked_leads: Counter = Counter()

    def _count(table: pd.DataFrame) -> None:
        part_counts, part_masked = _qc_summary(table)
        outcome.update(part_counts)
        masked_leads.update(part_masked)

    n_qc = _concat_csv([f"{s}.qc.csv" for s in stems], out_dir / "qc.csv", QC_COLUMNS, _count)
    if n_qc != manifest["n_input"] or outcome.get("ok", 0) != n_written:
        raise RuntimeError(f"cache {out_dir} is inconsistent ({n_qc} QC rows for {manifest['n_input']} inputs)")
    shutil.copyfile(sources, out_dir / _SOURCES_FILE)
    counts, masked = dict(sorted(outcome.items())), dict(sorted(masked_leads.items()))
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
        "source_hash": manifest["source_hash"],
        "source": manifest["source"],
        "qc_counts": counts,
        "masked_leads": masked,
    }
    atomic_write_text(out_dir / "spec.json", json.dumps(meta, indent=2, sort_keys=True) + "\n", fsync=True)
    report = _report_from_cache(out_dir, meta)
    _log_qc(report)
    return report


def _part_files(parts_dir: Path) -> dict[int, Path]:
    out = {}
    for marker in parts_dir.glob("part_*.done"):
        out[int(marker.stem.split("_")[1])] = parts_dir / marker.stem
    return out


def _resolve_request(source, spec, leads, dtype, part_size, source_kind):
    # A record table holds files at several rates: list the ones at (or just above) the rate the cache is built at.
    refs = (
        list(source)
        if not isinstance(source, (str, Path))
        else list_source_records(source, source_kind, spec.target_fs)
    )
    sources = source_table(refs)
    manifest = _work_manifest(refs, spec, leads, dtype, part_size, source, sources)
    return refs, sources, manifest


def cache_matches(
    out_dir: str | Path,
    source: str | Path | Sequence[RecordRef],
    spec: PreprocessSpec | None = None,
    leads: str | Sequence[str] = "12L",
    *,
    dtype: str | None = None,
    source_kind: str = "auto",
) -> bool | str:
    """Whether the complete cache at ``out_dir`` was built from exactly this source, spec and lead selection.

    The source matches when the same record ids, paths and subjects are listed and every record's header and signal
    files have the sizes and modification times stored at build time.

    Args:
        out_dir: cache folder.
        source: folder / manifest CSV or a list of ``RecordRef`` (as for :func:`prepare_ecg_cache`).
        spec: preprocessing knobs; default :class:`PreprocessSpec`.
        leads: required leads as given to :func:`prepare_ecg_cache`.
        dtype: also require this dtype (``None``: any).
        source_kind: ``"auto"`` or a kind of :func:`~kale_ext.loaddata.record_table.list_source_records`.

    Returns:
        ``True`` when the cache can be reused, else a one-line ``str`` saying what differs (a non-empty string is
        truthy: test the result with ``is True``).
    """
    out_dir = Path(out_dir).resolve()
    existing = _load_complete(out_dir)
    if existing is None:
        return f"no complete cache at {out_dir} (no spec.json); build it with prepare_ecg_cache"
    spec = spec or PreprocessSpec()
    _, sources, manifest = _resolve_request(
        source, spec, resolve_leads(leads), dtype or existing["dtype"], 1, source_kind
    )
    diff = _describe_difference(existing, manifest, _read_sources(out_dir / _SOURCES_FILE), sources)
    return True if not diff else f"cache {out_dir} differs: {diff}"


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
    lock_timeout_s: float = 3600.0,
    free_space: Callable[[Path], int] = free_bytes,
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
        source_kind: ``"auto"`` or a kind of :func:`~kale_ext.loaddata.record_table.list_source_records`.
        max_parts: process at most this many unfinished parts, then return without assembling (for time-boxed
            jobs; a later call continues).
        keep_parts: keep the part files after assembly (they are deleted by default).
        overwrite: rebuild when ``out_dir`` holds a cache or unfinished work from another source (files added,
            removed or changed), spec or lead selection; without it such a call raises a ``ValueError`` naming the
            difference.
        lock_timeout_s: seconds to wait for another builder holding the lock on ``out_dir`` (then ``TimeoutError``).
        free_space: function giving the free bytes of a folder (injectable for tests); assembly refuses to start
            with an ``OSError`` (ENOSPC) naming the bytes needed and available when they do not fit.

    Returns:
        :class:`CacheReport`; ``complete`` is False when work is left (``max_parts``) or when this is one shard.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    spec = spec or PreprocessSpec()
    leads = resolve_leads(leads)
    if np.dtype(dtype) not in (np.dtype("float32"), np.dtype("float16")):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if part_size < 1:
        raise ValueError("part_size must be >= 1")
    sharded = num_shards > 1
    if sharded and (shard_index is None or not 0 <= shard_index < num_shards):
        raise ValueError(f"num_shards={num_shards} needs shard_index in [0, {num_shards - 1}]")
    refs, sources, manifest = _resolve_request(source, spec, leads, dtype, part_size, source_kind)
    if sharded:
        work_dir = out_dir / "shards" / f"shard-{shard_index:04d}-of-{num_shards:04d}"
    else:
        work_dir = out_dir / "parts"
    # a shard locks a file beside its folder, which an overwrite may delete and recreate
    lock = out_dir / "shards" / f".{work_dir.name}{LOCK_NAME}" if sharded else out_dir / LOCK_NAME
    with file_lock(lock, timeout_s=lock_timeout_s):
        remove_stale_temps(out_dir)
        existing = _load_complete(out_dir)
        if existing is not None:
            diff = _describe_difference(existing, manifest, _read_sources(out_dir / _SOURCES_FILE), sources)
            if not diff:
                logger.info("cache %s is already complete and matches its source; nothing to do", out_dir)
                report = _report_from_cache(out_dir, existing, time.perf_counter() - start)
                _log_qc(report)
                return report
            if not overwrite:
                raise ValueError(
                    f"{out_dir} already holds a cache built from other inputs or spec: {diff}; use a new out_dir or "
                    "pass overwrite=True (--overwrite) to rebuild it"
                )
            logger.info("rebuilding cache %s: %s", out_dir, diff)
            for name in ("spec.json", "signals.npy", "index.csv", "qc.csv", _SOURCES_FILE):
                (out_dir / name).unlink(missing_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        part_ids = list(range(manifest["n_parts"]))
        if sharded:
            part_ids = [int(i) for i in np.array_split(np.arange(manifest["n_parts"]), num_shards)[shard_index]]
            shard_manifest = {**manifest, "num_shards": num_shards, "shard_index": shard_index}
            _check_or_write_manifest(work_dir, shard_manifest, sources, overwrite)
        else:
            _check_or_write_manifest(work_dir, manifest, sources, overwrite)
        remove_stale_temps(work_dir)
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
            report = _assemble(out_dir, done, manifest, work_dir / _SOURCES_FILE, free_space)
            if not keep_parts:
                shutil.rmtree(work_dir)
            report.elapsed_s = time.perf_counter() - start
            return report
        qcs = [pd.read_csv(f"{done[i]}.qc.csv", dtype=str, keep_default_na=False) for i in part_ids if i in done]
        qc = pd.concat(qcs) if qcs else pd.DataFrame(columns=QC_COLUMNS)
        skipped = [(r, why) for r, s, why in qc[["record_id", "status", "reason"]].itertuples(index=False) if s != "ok"]
        counts, masked = _qc_summary(qc)
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
            qc_counts=counts,
            masked_leads=masked,
        )


def merge_shards(
    out_dir: str | Path,
    *,
    keep_parts: bool = False,
    lock_timeout_s: float = 3600.0,
    free_space: Callable[[Path], int] = free_bytes,
) -> CacheReport:
    """Assemble the cache from the shards under ``out_dir/shards/`` once every shard is done.

    Args:
        out_dir: the folder every shard job was given.
        keep_parts: keep the shard folders after assembly.
        lock_timeout_s: seconds to wait for another process holding the lock on ``out_dir``.
        free_space: function giving the free bytes of a folder (see :func:`prepare_ecg_cache`).

    Returns:
        :class:`CacheReport` of the assembled cache.

    Raises:
        RuntimeError: shards are missing, unfinished or built with different inputs/specs.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    with file_lock(out_dir / LOCK_NAME, timeout_s=lock_timeout_s):
        return _merge_locked(out_dir, keep_parts, free_space, start)


def _merge_locked(out_dir: Path, keep_parts: bool, free_space: Callable[[Path], int], start: float) -> CacheReport:
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
    report = _assemble(out_dir, files, manifest, shard_dirs[0] / _SOURCES_FILE, free_space)
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
    parser.add_argument("--overwrite", action="store_true", help="rebuild a cache made from another source or spec")
    parser.add_argument("--powerline", default="50", choices=["50", "60", "off"], help="powerline smoothing (Hz)")
    parser.add_argument("--highpass-hz", type=float, default=0.5, help="high-pass cut-off in Hz, 0 = off")
    parser.add_argument("--mask-bad-leads", action="store_true", help="mask bad leads instead of refusing records")
    parser.add_argument("--min-good-leads", type=int, default=1, help="with --mask-bad-leads: usable leads needed")
    parser.add_argument("--lock-timeout", type=float, default=3600.0, help="seconds to wait for another builder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.merge:
        report = merge_shards(args.out, lock_timeout_s=args.lock_timeout)
    else:
        leads = args.leads if args.leads in ("12L", "6L") else [s for s in args.leads.split(",") if s]
        spec = PreprocessSpec(
            target_fs=args.target_fs,
            target_length=args.target_length,
            derive_limb_leads=args.derive_limb_leads,
            powerline_hz=None if args.powerline == "off" else float(args.powerline),
            highpass_hz=args.highpass_hz,
            mask_bad_leads=args.mask_bad_leads,
            min_good_leads=args.min_good_leads,
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
            overwrite=args.overwrite,
            lock_timeout_s=args.lock_timeout,
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
