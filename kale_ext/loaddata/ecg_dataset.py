"""Lead datasets over a preprocessed cache, the label join and the threshold label rules.

:class:`ECGLeadDataset` reads the cache written by :func:`kale_ext.prepdata.ecg_cache.prepare_ecg_cache`
(``signals.npy`` memory map, ``index.csv``, ``spec.json``). The memory map is opened lazily in each process, so the
dataset pickles cheaply into ``DataLoader`` workers and never loads the whole array.

Missing leads: a requested lead that a record lacks (or that was all-NaN or flat and optional when the cache was
built) has ``mask`` False and zeros as signal; models must read the mask, never infer absence from zeros.

Labels: a table (CSV path or DataFrame) joined by ``id_column`` (``"subject_id"`` or ``"record_id"``). Records whose
id has no label are excluded and listed in ``unlabelled_ids``; labels whose id has no record are listed in
``labels_without_record``; both are logged, never dropped silently. The threshold rules turn haemodynamic values into
labels for the endpoints of Suvon et al. (arXiv 2503.13470): PH detection (mPAP > 20 mmHg), pre- vs post-capillary
phenotype (PAWP > 15 mmHg among PH) and elevated PAWP (PAWP > 15 mmHg). Thresholds are arguments, not library
defaults: the clinical values belong in the experiment's configuration.
"""

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    get_worker_info,
)

from kale_ext.loaddata.leads import CANONICAL_LEADS, resolve_leads
from kale_ext.utils.files import file_digest, read_npy_header

logger = logging.getLogger(__name__)

LABEL_RULES = ("detection", "phenotype", "elevated")


def threshold_label(values, threshold: float) -> np.ndarray:
    """Binary label ``value > threshold``; missing values give NaN.

    Args:
        values: (N,) numbers (NaN = unknown).
        threshold: strict lower bound of the positive class.

    Returns:
        (N,) float array of 1.0, 0.0 or NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(values), np.nan, (values > threshold).astype(np.float64))


def detection_label(values, threshold: float) -> np.ndarray:
    """Detection rule: positive when ``value > threshold`` (PH: mPAP > 20 mmHg in the paper). (N,) -> (N,)."""
    return threshold_label(values, threshold)


def phenotype_label(first, second, first_threshold: float, second_threshold: float) -> np.ndarray:
    """Phenotype rule: among positives of the first value, positive when the second exceeds its threshold.

    In the paper: post-capillary PH = PAWP > 15 mmHg among patients with mPAP > 20 mmHg. Subjects that are not
    positive for the first rule get NaN (they are not part of this task).

    Returns:
        (N,) float array of 1.0, 0.0 or NaN.
    """
    base = threshold_label(first, first_threshold)
    label = threshold_label(second, second_threshold)
    return np.where(base == 1.0, label, np.nan)


def elevated_label(values, threshold: float) -> np.ndarray:
    """Elevated-value rule: positive when ``value > threshold`` (elevated PAWP: PAWP > 15 mmHg). (N,) -> (N,)."""
    return threshold_label(values, threshold)


def label_from_threshold(
    table: pd.DataFrame | str | Path,
    rule: str,
    columns: str | Sequence[str],
    thresholds: float | Sequence[float],
    id_column: str = "subject_id",
    label_column: str = "label",
) -> pd.DataFrame:
    """Apply a threshold rule to a haemodynamics table and return ``(id_column, label_column)`` rows.

    Args:
        table: DataFrame or CSV path with ``id_column`` and the value columns.
        rule: ``"detection"`` (one column, one threshold), ``"phenotype"`` (two columns, two thresholds: positives
            of the first, labelled by the second) or ``"elevated"`` (one column, one threshold).
        columns: value column name(s), e.g. ``"mPAP"`` or ``["mPAP", "PAWP"]``.
        thresholds: threshold(s) matching ``columns``.
        id_column: id column kept in the output.
        label_column: name of the output label column (int 0/1).

    Returns:
        DataFrame with ``id_column`` (str) and ``label_column`` (int); rows without a label (missing values, or not
        in the first group of a phenotype rule) are left out.
    """
    frame = pd.read_csv(table, dtype={id_column: str}) if isinstance(table, (str, Path)) else table.copy()
    columns = [columns] if isinstance(columns, str) else list(columns)
    thresholds = [thresholds] if np.isscalar(thresholds) else list(thresholds)
    missing = [c for c in [id_column, *columns] if c not in frame.columns]
    if missing:
        raise ValueError(f"label table lacks columns {missing}; it has {list(frame.columns)}")
    if rule in ("detection", "elevated"):
        if len(columns) != 1 or len(thresholds) != 1:
            raise ValueError(f"rule {rule!r} takes one column and one threshold")
        fn = detection_label if rule == "detection" else elevated_label
        label = fn(pd.to_numeric(frame[columns[0]], errors="coerce"), thresholds[0])
    elif rule == "phenotype":
        if len(columns) != 2 or len(thresholds) != 2:
            raise ValueError("rule 'phenotype' takes two columns and two thresholds (first: group, second: label)")
        values = [pd.to_numeric(frame[c], errors="coerce") for c in columns]
        label = phenotype_label(values[0], values[1], thresholds[0], thresholds[1])
    else:
        raise ValueError(f"unknown label rule {rule!r}; use one of {LABEL_RULES}")
    out = pd.DataFrame({id_column: frame[id_column].astype(str).to_numpy(), label_column: label})
    out = out[~np.isnan(label)].reset_index(drop=True)
    out[label_column] = out[label_column].astype(int)
    return out


def read_cache_meta(cache_dir: str | Path) -> dict[str, Any]:
    """Read ``spec.json`` of a cache; raises a clear error when the cache is incomplete or absent."""
    path = Path(cache_dir) / "spec.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {cache_dir} is not a complete ECG cache; build it with "
            "prepare_ecg_cache(source, out_dir) or `python -m kale_ext.prepdata.ecg_cache SOURCE OUT`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


CACHE_CHECKSUMS = ("signals.npy", "index.csv")  # files whose SHA-256 the cache builder records in spec.json


def cache_checksums(cache_dir: str | Path) -> dict[str, str]:
    """SHA-256 of the cache files a dataset trusts (:data:`CACHE_CHECKSUMS`), as the builder records them."""
    return {name: file_digest(Path(cache_dir) / name, length=64) for name in CACHE_CHECKSUMS}


def _rebuild_advice(cache_dir: Path) -> str:
    return f"delete the cache folder {cache_dir} and build it again (--stage prepare in the example)"


def cache_content_problem(cache_dir: str | Path, meta: dict | None = None, content: bool = True) -> str | None:
    """Why a complete cache cannot be trusted, or None.

    Checks that ``signals.npy`` has a readable header with the shape and dtype of ``spec.json`` and, with
    ``content``, that its bytes and ``index.csv`` match the checksums recorded at build time (a cache built before
    checksums were recorded passes this part).

    Args:
        cache_dir: cache folder.
        meta: its ``spec.json`` content (read when None).
        content: also compare the checksums (reads every byte once).

    Returns:
        A one-line reason naming the file and what to do, or None.
    """
    cache_dir = Path(cache_dir)
    meta = read_cache_meta(cache_dir) if meta is None else meta
    path = cache_dir / "signals.npy"
    try:
        shape, dtype, _, offset = read_npy_header(path)
    except Exception as err:  # noqa: BLE001 - any unreadable header: the same advice
        return f"{path} has no readable .npy header ({type(err).__name__}: {str(err).strip()[:80]}); " + (
            _rebuild_advice(cache_dir))  # fmt: skip
    expected = meta.get("shape")
    size = path.stat().st_size
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if (expected is not None and list(shape) != list(expected)) or str(dtype) != meta.get("dtype", str(dtype)):
        return f"{path} holds {dtype} {tuple(shape)}, spec.json says {meta.get('dtype')} {expected}; " + (
            _rebuild_advice(cache_dir))  # fmt: skip
    if size != need:
        return f"{path} has {size:,} bytes, its header implies {need:,} (truncated or damaged); " + (
            _rebuild_advice(cache_dir))  # fmt: skip
    recorded = meta.get("checksums") or {}
    if content and recorded:
        actual = cache_checksums(cache_dir)
        changed = [name for name in CACHE_CHECKSUMS if name in recorded and recorded[name] != actual[name]]
        if changed:
            return (f"{', '.join(str(cache_dir / n) for n in changed)} changed since the cache was built (checksum "
                    "differs from spec.json); " + _rebuild_advice(cache_dir))  # fmt: skip
    return None


class ECGLeadDataset(Dataset):
    """Items of selected leads from a preprocessed ECG cache, with optional labels.

    Args:
        cache_dir: folder written by ``prepare_ecg_cache``.
        leads: ``"12L"``, ``"6L"`` or a list of lead names (any alias; mapped by name).
        labels: ``None``, a CSV path or a DataFrame with ``id_column`` and ``label_column``.
        label_column: label column of ``labels``.
        id_column: join key, ``"subject_id"`` or ``"record_id"``.
        expected_fingerprint: a fingerprint string or a ``PreprocessSpec``-like object with ``.fingerprint()``;
            when given and different from the cache's, a ``ValueError`` is raised.
        indices: optional positions (after the label join) that restrict the dataset, e.g. one CV fold.
        verify: compare the cache files with the checksums recorded at build time (reads them once); a damaged or
            changed cache raises a ``ValueError`` naming the file. The ``.npy`` header is checked in any case.

    Items are dicts: ``signals`` (L, T) float32 tensor, ``mask`` (L,) bool tensor, ``record_id`` (str),
    ``subject_id`` (str) and, with labels, ``label`` (int64 scalar tensor). Whole batches: ``get_batch`` (float32
    tensors, used by ``batch_loader``) and ``read_signals`` (the cache dtype, into a caller's buffer; used by
    ``kale_ext.loaddata.batch_stream.BatchStream``).

    Attributes:
        leads: tuple of lead names, in item order.
        record_ids, subject_ids: (N,) arrays of str.
        labels: (N,) int array, or ``None`` without labels.
        masks: (N, L) bool array of lead presence.
        unlabelled_ids: ids of records without a label (excluded).
        labels_without_record: label ids with no record in the cache.
        fingerprint: the cache's preprocessing fingerprint.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        leads: str | Sequence[str] = "6L",
        labels: pd.DataFrame | str | Path | None = None,
        label_column: str = "label",
        id_column: str = "subject_id",
        expected_fingerprint: Any = None,
        indices: Sequence[int] | np.ndarray | None = None,
        verify: bool = False,
    ):
        self.cache_dir = Path(cache_dir)
        meta = read_cache_meta(self.cache_dir)
        problem = cache_content_problem(self.cache_dir, meta, content=verify)
        if problem:
            raise ValueError(problem)
        self.fingerprint = str(meta["fingerprint"])
        if expected_fingerprint is not None:
            expected = expected_fingerprint
            if hasattr(expected, "fingerprint"):
                expected = expected.fingerprint()
            if str(expected) != self.fingerprint:
                raise ValueError(
                    f"cache {self.cache_dir} was built with preprocessing fingerprint {self.fingerprint} but "
                    f"{expected} is expected; rebuild the cache with the matching PreprocessSpec (or point to the "
                    "cache built with it)"
                )
        self.leads = resolve_leads(leads)
        cache_leads = tuple(meta.get("lead_names", CANONICAL_LEADS))
        self._lead_idx = np.array([cache_leads.index(name) for name in self.leads])
        index = pd.read_csv(self.cache_dir / "index.csv", dtype=str, keep_default_na=False)
        present = index[[f"present_{name}" for name in self.leads]].to_numpy() == "1"
        if id_column not in ("subject_id", "record_id"):
            raise ValueError(f"id_column must be 'subject_id' or 'record_id', got {id_column!r}")
        rows = np.arange(len(index))
        self.unlabelled_ids: list[str] = []
        self.labels_without_record: list[str] = []
        label_values = None
        if labels is not None:
            table = pd.read_csv(labels, dtype={id_column: str}) if isinstance(labels, (str, Path)) else labels.copy()
            for col in (id_column, label_column):
                if col not in table.columns:
                    raise ValueError(f"label table lacks column {col!r}; it has {list(table.columns)}")
            table = table[[id_column, label_column]].copy()
            table[id_column] = table[id_column].astype(str)
            table = table.dropna(subset=[label_column])
            conflicts = table.groupby(id_column)[label_column].nunique()
            if (conflicts > 1).any():
                raise ValueError(f"ids with conflicting labels: {list(conflicts[conflicts > 1].index[:5])}")
            lookup = table.drop_duplicates(id_column).set_index(id_column)[label_column]
            keys = index[id_column].to_numpy()
            has = np.isin(keys, lookup.index.to_numpy())
            self.unlabelled_ids = sorted(set(keys[~has].tolist()))
            self.labels_without_record = sorted(set(lookup.index) - set(keys.tolist()))
            if self.unlabelled_ids:
                logger.warning(
                    "%d %s values in the cache have no label and are excluded: %s",
                    len(self.unlabelled_ids),
                    id_column,
                    self.unlabelled_ids[:5],
                )
            if self.labels_without_record:
                logger.warning(
                    "%d labelled %s values have no record in the cache: %s",
                    len(self.labels_without_record),
                    id_column,
                    self.labels_without_record[:5],
                )
            rows = rows[has]
            label_values = lookup.loc[keys[has]].to_numpy().astype(np.int64)
        if indices is not None:
            indices = np.asarray(indices, dtype=np.int64)
            rows = rows[indices]
            label_values = label_values[indices] if label_values is not None else None
        self._rows = rows
        self.record_ids = index["record_id"].to_numpy()[rows]
        self.subject_ids = index["subject_id"].to_numpy()[rows]
        self.masks = present[rows]
        self.labels = label_values
        self._signals = None  # opened lazily per process (see _store)

    def _store(self) -> np.ndarray:
        if self._signals is None:
            self._signals = np.load(self.cache_dir / "signals.npy", mmap_mode="r")
        return self._signals

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_signals"] = None  # a memmap must not travel to workers: each opens its own
        return state

    def __len__(self) -> int:
        """Number of items."""
        return len(self._rows)

    def __getitem__(self, i: int | Sequence[int] | np.ndarray) -> dict[str, Any]:
        """Item ``i``: ``signals`` (L, T) float32, ``mask`` (L,) bool, ids and ``label`` when labelled.

        A sequence of positions returns a whole batch at once (``signals`` (n, L, T), ``mask`` (n, L), lists of ids,
        ``label`` (n,)): see ``batch_loader``, which feeds index batches so that no per-item collation is needed.
        """
        if not np.isscalar(i) and not (isinstance(i, torch.Tensor) and i.ndim == 0):
            return self.get_batch(i)
        row = self._rows[i]
        x = np.asarray(self._store()[row][self._lead_idx], dtype=np.float32)
        item = {
            "signals": torch.from_numpy(x),
            "mask": torch.from_numpy(self.masks[i].copy()),
            "record_id": self.record_ids[i],
            "subject_id": self.subject_ids[i],
        }
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[i], dtype=torch.int64)
        return item

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """A batch of items, read straight into one float32 tensor.

        Args:
            indices: (n,) positions in this dataset.

        Returns:
            dict with ``signals`` (n, L, T) float32, ``mask`` (n, L) bool, ``record_id`` / ``subject_id`` lists and,
            with labels, ``label`` (n,) int64. Inside a DataLoader worker the signal tensor is allocated in shared
            memory, so handing it to the main process costs no extra copy.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = torch.empty((len(idx), len(self._lead_idx), self.num_samples), dtype=torch.float32)
        if get_worker_info() is not None:
            out.share_memory_()
        self.read_signals(idx, out=out.numpy())
        batch = {
            "signals": out,
            "mask": torch.from_numpy(self.masks[idx].copy()),
            "record_id": self.record_ids[idx].tolist(),
            "subject_id": self.subject_ids[idx].tolist(),
        }
        if self.labels is not None:
            batch["label"] = torch.from_numpy(self.labels[idx].astype(np.int64))
        return batch

    def read_signals(self, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Signals of the selected leads of items ``indices``, read from the memory map in ascending row order.

        Each row lands directly in its place in ``out`` (one copy, no per-item tensors), so the reads are sequential
        whatever the batch order; a contiguous run of cache leads is read as a slice.

        Args:
            indices: (n,) positions in this dataset.
            out: optional (n, L, T) array to fill, e.g. a reused or pinned buffer; a dtype other than the cache's
                casts on the fly (float16 -> float32 is exact).

        Returns:
            (n, L, T) array in the cache dtype (``signal_dtype``), or ``out``.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        store = self._store()
        shape = (len(idx), len(self._lead_idx), store.shape[-1])
        if out is None:
            out = np.empty(shape, dtype=store.dtype)
        elif tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}; pass an array of shape {shape} (items, leads, T)")
        leads = self._lead_slice()
        take = leads is None and out.dtype == store.dtype  # np.take fills out in place only without a cast
        rows = self._rows[idx]
        for j in np.argsort(rows, kind="stable"):  # ascending rows: sequential reads of the memory map
            if leads is not None:
                out[j] = store[rows[j], leads]
            elif take:
                np.take(store[rows[j]], self._lead_idx, axis=0, out=out[j], mode="clip")
            else:
                out[j] = store[rows[j]][self._lead_idx]
        return out

    def _lead_slice(self) -> slice | None:
        """The selected leads as a slice of the cache's leads when they are a contiguous ascending run, else None."""
        first, n = int(self._lead_idx[0]), len(self._lead_idx)
        if np.array_equal(self._lead_idx, np.arange(first, first + n)):
            return slice(first, first + n)
        return None

    @property
    def num_samples(self) -> int:
        """Samples per lead (T)."""
        return int(self._store().shape[-1])

    @property
    def signal_dtype(self) -> torch.dtype:
        """Torch dtype of the cache's signals (``torch.float32`` or ``torch.float16``), as ``read_signals`` returns."""
        return torch.from_numpy(np.empty(0, dtype=self._store().dtype)).dtype


def batch_loader(
    dataset: ECGLeadDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader that fetches whole batches from the memory map (``ECGLeadDataset.get_batch``).

    Equivalent to ``DataLoader(dataset, batch_size, shuffle=...)`` in content and order, but each worker reads a batch
    into one shared tensor instead of building ``batch_size`` items and stacking them, which is what bounds the loader
    on fast storage.

    Args:
        dataset: the dataset to read.
        batch_size: items per batch.
        shuffle: draw a seeded random order (ignored when ``sampler`` is given).
        sampler: optional item sampler, e.g. a ``DistributedSampler``.
        drop_last: drop the last incomplete batch.
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling generator.
        **loader_kwargs: passed on to ``DataLoader`` (``pin_memory``, ``persistent_workers``, ...).

    Returns:
        a DataLoader yielding batch dicts as described in ``ECGLeadDataset.get_batch``.
    """
    if sampler is None:
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=num_workers, **loader_kwargs)
