"""Whole-batch stream from an ECG cache to the training device, with no per-item Python and no worker processes.

:class:`BatchStream` replaces ``DataLoader(ECGLeadDataset, sampler=EpochSeededSampler)`` in pre-training. It yields
dict batches already on the training device and keeps the exact-resume contract of the sampler: the order of epoch
``k`` is a permutation drawn from ``seed + k`` alone (``numpy.random.default_rng(seed + k).permutation``, the very
draw of ``kale_ext.pipeline.pretrain.EpochSeededSampler``), sharded across replicas by the same rank slicing, so a
stream rebuilt after a resume and told ``set_epoch(k)`` reproduces epoch ``k`` batch for batch.

Two modes give identical batches (same order, same values):

- resident: the selected records' signals are copied once into one tensor on the device (GPU memory on CUDA, RAM
  on the CPU) and each batch is an ``index_select`` gather. ``resident="auto"`` picks it when the copy fits: on CUDA
  below ``RESIDENT_FRACTION`` of the free memory (``torch.cuda.mem_get_info``), on the CPU below
  ``resident_budget`` bytes (default: the smaller of ``CPU_RESIDENT_BYTES`` and half the available RAM).
- streaming: ``num_threads`` threads read each batch from the memory map (rows in ascending order, each placed
  directly at its batch position) into a ring of ``prefetch`` reused slots: pinned host buffers copied to the GPU
  with ``non_blocking=True`` on CUDA; on the CPU the batch tensors themselves, recycled once nothing refers to
  them. No shared-memory segment or pinned buffer is allocated per batch.

Signals keep the cache dtype up to the device (a float16 cache moves half the bytes); ``dtype`` casts there.

Epochs with Lightning: Lightning calls ``set_epoch`` on the ``sampler`` of each train loader before every epoch's
first batch, and it finds it on any iterable, so ``BatchStream.sampler`` (the stream itself) receives the epoch
without help. Calling ``stream.set_epoch(trainer.current_epoch)`` from ``on_train_epoch_start`` as well is harmless
and keeps other loops right. The epoch is read when the first batch is drawn, not when ``iter()`` is called
(Lightning calls ``iter()`` before ``on_train_epoch_start``); iterating without ``set_epoch`` uses the last epoch set.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from kale_ext.loaddata.ecg_dataset import ECGLeadDataset

logger = logging.getLogger(__name__)

RESIDENT_FRACTION = 0.5  # share of the free CUDA memory a resident copy may take under resident="auto"
CPU_RESIDENT_BYTES = 4 * 2**30  # default RAM budget of a resident copy on the CPU under resident="auto"
LOAD_CHUNK_BYTES = 128 * 2**20  # chunk read per thread when the resident copy is loaded


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Order of ``n`` positions in an epoch: ``default_rng(seed + epoch).permutation(n)``, or ``arange(n)``.

    This is the draw of ``EpochSeededSampler``; it depends on ``(seed, epoch)`` only.

    Args:
        n: number of positions.
        seed: base seed.
        epoch: epoch number.
        shuffle: permute (training) or keep the order (evaluation).

    Returns:
        (n,) int64 array.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(int(seed) + int(epoch)).permutation(n).astype(np.int64)


def shard_order(order: np.ndarray, num_replicas: int, rank: int, drop_last: bool) -> np.ndarray:
    """This rank's share of an epoch order, exactly as ``EpochSeededSampler`` slices it.

    With ``drop_last`` (and several replicas) the tail that does not divide evenly is dropped, otherwise the order is
    padded by wrapping around; rank ``r`` takes every ``num_replicas``-th entry starting at ``r``.

    Args:
        order: (n,) epoch order.
        num_replicas: number of processes.
        rank: this process.
        drop_last: drop the uneven tail (training) or pad it (evaluation).

    Returns:
        (n_rank,) slice of ``order``.
    """
    num_replicas = max(int(num_replicas), 1)
    n = len(order)
    per_rank = n // num_replicas if (drop_last and num_replicas > 1) else math.ceil(n / num_replicas)
    total = per_rank * num_replicas
    if total > n:
        order = np.concatenate([order, order[: total - n]])
    return order[:total][rank:total:num_replicas]


def _storage_uses(t: torch.Tensor) -> int | None:
    """How many tensors share ``t``'s storage, or None when this torch build does not tell."""
    counter = getattr(torch._C, "_storage_Use_Count", None)
    return None if counter is None else int(counter(t.untyped_storage()._cdata))


class _BufferPool:
    """Reused CPU batch tensors: a buffer is handed out again only when no tensor outside the pool refers to it.

    Every hand-out is a fresh view, so the storage's use count tells whether a batch (or any view of it, or a numpy
    array over it) is still alive. Fresh large allocations cost page faults on every batch; reuse avoids them.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, capacity: int, pin: bool = False):
        self.shape, self.dtype, self.capacity, self.pin = shape, dtype, capacity, pin
        self._buffers: list[tuple[torch.Tensor, int]] = []

    def acquire(self, n: int) -> torch.Tensor:
        """A (n, ...) view of a released buffer, or of a new one (kept when the pool has room)."""
        for buf, idle in self._buffers:
            if _storage_uses(buf) == idle:
                return buf[:n]
        buf = torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin)
        idle = _storage_uses(buf)
        if idle is not None and len(self._buffers) < self.capacity:
            self._buffers.append((buf, idle))
        return buf[:n]


class BatchStream:
    """Seeded, sharded batches of an ``ECGLeadDataset``, formed on the device from a resident copy or a stream.

    Args:
        dataset: the lead dataset over a cache (its leads, masks and memory map are used).
        indices: (N,) dataset positions to draw from (e.g. the training part of a split); default all.
        batch_size: items per batch (per process).
        seed: base seed; epoch ``k``'s order is drawn from ``seed + k`` only.
        shuffle: permute per epoch (training) or keep the order of ``indices`` (evaluation).
        drop_last: drop the uneven replica tail and (unless ``drop_last_batch`` says otherwise) the last incomplete
            batch (training); else pad the replicas by wrapping around (as ``EpochSeededSampler``) and keep a short
            last batch.
        drop_last_batch: drop the last incomplete batch; None = ``drop_last``. Pre-training passes False so that the
            stream gives as many steps per epoch as a ``DataLoader`` over the same sampler (``drop_last=False``).
        num_replicas: number of processes (DDP world size).
        rank: this process (DDP global rank).
        device: where batches are formed, e.g. ``"cuda:0"`` (``trainer.strategy.root_device``) or ``"cpu"``.
        resident: ``True`` (copy the signals onto the device), ``False`` (stream) or ``"auto"`` (resident when it
            fits, see the module docstring).
        num_threads: reader threads of the streaming mode (0 = read in the calling thread).
        prefetch: batches read ahead = ring slots of the streaming mode (at least 1).
        dtype: dtype of the yielded signals; None keeps the cache dtype (``dataset.signal_dtype``).
        resident_budget: bytes a resident copy may take under ``"auto"``; None = the defaults of the module docstring.

    Batches are dicts: ``signals`` (B, L, T) in ``dtype`` (default the cache dtype), ``mask`` (B, L) bool (True =
    lead present) and ``index`` (B,) int64 dataset positions, all on ``device``.

    Attributes:
        resident: whether the resident mode is in use (decided at construction).
        epoch: the epoch whose order the next iteration draws.
        leads: lead names of the ``signals`` channels.
    """

    def __init__(
        self,
        dataset: ECGLeadDataset,
        indices: Sequence[int] | np.ndarray | None = None,
        batch_size: int = 256,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        drop_last_batch: bool | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        device: str | torch.device = "cpu",
        resident: bool | str = "auto",
        num_threads: int = 2,
        prefetch: int = 2,
        dtype: torch.dtype | None = None,
        resident_budget: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= int(rank) < max(int(num_replicas), 1):
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}; pass the process's global rank")
        if resident not in (True, False, "auto"):
            raise ValueError(f"resident must be True, False or 'auto', got {resident!r}")
        self.dataset = dataset
        self.indices = np.arange(len(dataset), dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if self.indices.ndim != 1:
            raise ValueError(f"indices must be one-dimensional dataset positions, got shape {self.indices.shape}")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(dataset)):
            raise ValueError(f"indices must lie in 0..{len(dataset) - 1} (positions in the dataset)")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.drop_last_batch = self.drop_last if drop_last_batch is None else bool(drop_last_batch)
        self.num_replicas = max(int(num_replicas), 1)
        self.rank = int(rank)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_threads = max(int(num_threads), 0)
        self.prefetch = max(int(prefetch), 1)
        self.cache_dtype = dataset.signal_dtype
        self.dtype = dtype or self.cache_dtype
        self.leads = tuple(dataset.leads)
        self.epoch = 0
        self.batch_sampler = None  # Lightning looks for it beside ``sampler`` (see the module docstring)
        self._item_shape = (len(self.leads), dataset.num_samples)
        self._active: weakref.ReferenceType | None = None
        self._slots: list[torch.Tensor] | None = None
        self._pool: _BufferPool | None = None
        self._scratch: torch.Tensor | None = None
        # Streaming through ring slots copied to the device (accelerators) or straight into recycled batches (CPU).
        self._ring = self.device.type != "cpu"
        # Masks and positions are small: they live on the device in both modes and are gathered like the signals.
        self._mask = torch.from_numpy(np.ascontiguousarray(dataset.masks[self.indices])).to(self.device)
        self._index = torch.from_numpy(self.indices.copy()).to(self.device)
        self.resident = self._decide_resident(resident, resident_budget)
        self._signals = self._load_resident() if self.resident else None

    def __getstate__(self) -> dict:
        """State for pickling: the running iteration, ring slots and buffer pool stay behind (rebuilt on demand)."""
        state = self.__dict__.copy()
        state.update(_active=None, _slots=None, _pool=None, _scratch=None)
        return state

    # ------------------------------------------------------------------------------------------------------------
    # Epochs and lengths
    # ------------------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration draws (kept until set again)."""
        self.epoch = int(epoch)

    @property
    def sampler(self) -> BatchStream:
        """The stream itself: Lightning calls ``loader.sampler.set_epoch(epoch)`` on train loaders every epoch."""
        return self

    def rank_positions(self, epoch: int | None = None) -> np.ndarray:
        """Positions in ``indices`` this rank visits in an epoch, in order (before cutting into batches).

        Args:
            epoch: the epoch (default ``self.epoch``).

        Returns:
            (n_rank,) int64 positions; ``indices[rank_positions()]`` equals ``list(EpochSeededSampler(...))``.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        order = epoch_order(len(self.indices), self.seed, epoch, self.shuffle)
        return shard_order(order, self.num_replicas, self.rank, self.drop_last)

    def _per_rank(self) -> int:
        n = len(self.indices)
        if self.drop_last and self.num_replicas > 1:
            return n // self.num_replicas
        return math.ceil(n / self.num_replicas)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        per_rank = self._per_rank()
        return per_rank // self.batch_size if self.drop_last_batch else math.ceil(per_rank / self.batch_size)

    # ------------------------------------------------------------------------------------------------------------
    # Resident copy
    # ------------------------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of the selected records' signals in the cache dtype (the size of a resident copy)."""
        itemsize = torch.empty((), dtype=self.cache_dtype).element_size()
        return len(self.indices) * self._item_shape[0] * self._item_shape[1] * itemsize

    def _decide_resident(self, resident: bool | str, budget: int | None) -> bool:
        if resident != "auto":
            logger.info(
                "BatchStream: %s mode on %s (%.2f GiB of signals)",
                "resident" if resident else "streaming",
                self.device,
                self.nbytes / 2**30,
            )
            return bool(resident)
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(RESIDENT_FRACTION * free)
            elif self.device.type == "cpu":
                budget = CPU_RESIDENT_BYTES
                try:
                    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                    budget = min(budget, available // 2)
                except (AttributeError, ValueError, OSError):
                    pass
            else:
                budget = 0
        fits = self.nbytes <= budget
        logger.info(
            "BatchStream: %d records x %s = %.2f GiB %s the resident budget of %.2f GiB on %s: %s mode",
            len(self.indices),
            self._item_shape,
            self.nbytes / 2**30,
            "within" if fits else "above",
            budget / 2**30,
            self.device,
            "resident" if fits else "streaming",
        )
        return fits

    def _load_resident(self) -> torch.Tensor:
        """Copy the selected records once into one (N, L, T) tensor on the device, in the cache dtype.

        ``num_threads`` threads read chunks of ``LOAD_CHUNK_BYTES`` from the memory map: straight into the tensor on
        the CPU, else into a ring of staging buffers (pinned on CUDA) copied to the device while the next chunks are
        read.
        """
        start = time.perf_counter()
        n = len(self.indices)
        step = max(1, LOAD_CHUNK_BYTES // max(self.nbytes // max(n, 1), 1))
        chunks = [(a, min(a + step, n)) for a in range(0, n, step)]
        workers = max(self.num_threads, 1)
        if not self._ring:
            out = torch.empty((n, *self._item_shape), dtype=self.cache_dtype)
            out_np = out.numpy()

            def read_into(chunk: tuple[int, int]) -> None:
                self.dataset.read_signals(self.indices[chunk[0] : chunk[1]], out=out_np[chunk[0] : chunk[1]])

            with ThreadPoolExecutor(workers, thread_name_prefix="BatchStream-load") as executor:
                list(executor.map(read_into, chunks))
        else:
            out = torch.empty((n, *self._item_shape), dtype=self.cache_dtype, device=self.device)
            pin = self.device.type == "cuda"
            n_stage = min(workers + 1, len(chunks))
            shape = (min(step, n), *self._item_shape)
            staging = [torch.empty(shape, dtype=self.cache_dtype, pin_memory=pin) for _ in range(n_stage)]
            events: list[torch.cuda.Event | None] = [None] * n_stage

            def read_staged(k: int) -> torch.Tensor:
                slot = k % n_stage
                if events[slot] is not None:
                    events[slot].synchronize()  # the copy out of this staging buffer has run
                a, b = chunks[k]
                buf = staging[slot][: b - a]
                self.dataset.read_signals(self.indices[a:b], out=buf.numpy())
                return buf

            with ThreadPoolExecutor(workers, thread_name_prefix="BatchStream-load") as executor:
                pending = deque(executor.submit(read_staged, k) for k in range(n_stage))
                for k, (a, b) in enumerate(chunks):
                    out[a:b].copy_(pending.popleft().result(), non_blocking=pin)
                    if pin:
                        events[k % n_stage] = torch.cuda.Event()
                        events[k % n_stage].record()
                    if k + n_stage < len(chunks):
                        pending.append(executor.submit(read_staged, k + n_stage))
            if pin:
                torch.cuda.synchronize(self.device)
        logger.info(
            "BatchStream: resident copy of %.2f GiB loaded in %.1f s", self.nbytes / 2**30, time.perf_counter() - start
        )
        return out

    # ------------------------------------------------------------------------------------------------------------
    # Iteration
    # ------------------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield this rank's batches of the current epoch (the epoch is read when the first batch is drawn).

        Starting a new iteration ends an unfinished previous one (they share the ring slots and buffers).
        """
        previous = self._active() if self._active is not None else None
        if previous is not None:
            previous.close()  # its finally block waits for its reader threads
        current = self._iterate()
        self._active = weakref.ref(current)
        return current

    def _iterate(self) -> Iterator[dict[str, torch.Tensor]]:
        positions = self.rank_positions()
        n_batches = len(self)
        bounds = [(k * self.batch_size, min((k + 1) * self.batch_size, len(positions))) for k in range(n_batches)]
        pos_all = torch.from_numpy(positions).to(self.device)  # one transfer per epoch
        if self.resident:
            yield from self._iter_resident(pos_all, bounds)
        else:
            yield from self._iter_streaming(positions, pos_all, bounds)

    def _batch(self, signals: torch.Tensor, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"signals": signals, "mask": self._mask.index_select(0, pos), "index": self._index.index_select(0, pos)}

    def _cpu_pool(self) -> _BufferPool:
        if self._pool is None:
            capacity = self.prefetch + self.num_threads + 2
            self._pool = _BufferPool((self.batch_size, *self._item_shape), self.dtype, capacity)
        return self._pool

    def _iter_resident(self, pos_all: torch.Tensor, bounds: list[tuple[int, int]]) -> Iterator[dict]:
        on_cpu = self.device.type == "cpu"
        for a, b in bounds:
            pos = pos_all[a:b]
            if on_cpu:  # gather into a recycled buffer: fresh large CPU tensors cost page faults every batch
                out = self._cpu_pool().acquire(b - a)
                if self.dtype == self.cache_dtype:
                    torch.index_select(self._signals, 0, pos, out=out)
                else:
                    if self._scratch is None:
                        self._scratch = torch.empty((self.batch_size, *self._item_shape), dtype=self.cache_dtype)
                    torch.index_select(self._signals, 0, pos, out=self._scratch[: b - a])
                    out.copy_(self._scratch[: b - a])
            else:
                out = self._signals.index_select(0, pos)
                if self.dtype != self.cache_dtype:
                    out = out.to(self.dtype)
            yield self._batch(out, pos)

    def _iter_streaming(
        self, positions: np.ndarray, pos_all: torch.Tensor, bounds: list[tuple[int, int]]
    ) -> Iterator[dict]:
        ring, pinned = self._ring, self.device.type == "cuda"
        n_batches = len(bounds)
        n_slots = self.prefetch
        events: list[torch.cuda.Event | None] = [None] * n_slots
        if ring and (self._slots is None or len(self._slots) != n_slots):
            shape = (self.batch_size, *self._item_shape)
            self._slots = [torch.empty(shape, dtype=self.cache_dtype, pin_memory=pinned) for _ in range(n_slots)]
        items = [self.indices[positions[a:b]] for a, b in bounds]

        def fill(k: int, out: torch.Tensor | None) -> torch.Tensor:
            if out is None:  # a ring slot (accelerator): wait until its previous copy to the device has finished
                slot = k % n_slots
                if events[slot] is not None:
                    events[slot].synchronize()
                out = self._slots[slot][: len(items[k])]
            self.dataset.read_signals(items[k], out=out.numpy())
            return out

        workers = min(self.num_threads, n_slots)
        executor = ThreadPoolExecutor(workers, thread_name_prefix="BatchStream") if workers > 0 else None
        pending: deque[Future | torch.Tensor] = deque()

        def submit(k: int) -> None:
            out = None if ring else self._cpu_pool().acquire(len(items[k]))
            if executor is None:
                pending.append(fill(k, out))
            else:
                pending.append(executor.submit(fill, k, out))

        try:
            for k in range(min(n_slots, n_batches)):
                submit(k)
            for k in range(n_batches):
                job = pending.popleft()
                host = job.result() if isinstance(job, Future) else job
                del job
                if not ring:
                    signals = host
                elif self.device.type == "cpu":  # ring slots on the CPU (tests of the accelerator path): copy out
                    signals = host.to(self.dtype, copy=True)
                else:
                    signals = host.to(self.device, non_blocking=pinned)
                    if pinned:  # the slot is refilled only once this copy has run
                        event = torch.cuda.Event()
                        event.record()
                        events[k % n_slots] = event
                    if self.dtype != self.cache_dtype:
                        signals = signals.to(self.dtype)
                del host
                if k + n_slots < n_batches:
                    submit(k + n_slots)
                yield self._batch(signals, pos_all[bounds[k][0] : bounds[k][1]])
        finally:
            for job in pending:
                if isinstance(job, Future):
                    job.cancel()
            if executor is not None:
                executor.shutdown(wait=True)  # no thread may still write into a slot when the next epoch starts
