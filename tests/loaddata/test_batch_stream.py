"""Tests of kale_ext.loaddata.batch_stream: order, sharding, resume, both modes, dtypes, masks and Lightning epochs."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from kale_ext.loaddata.batch_stream import BatchStream, _BufferPool, epoch_order, shard_order
from kale_ext.loaddata.ecg_dataset import ECGLeadDataset
from kale_ext.loaddata.leads import CANONICAL_LEADS
from kale_ext.pipeline.pretrain import EpochSeededSampler

N, T = 23, 40


def _write_cache(path, dtype, n=N, length=T, seed=0):
    """A cache in the layout ECGLeadDataset reads; some leads absent (zeros, present 0)."""
    rng = np.random.default_rng(seed)
    signals = rng.standard_normal((n, 12, length)).astype(dtype)
    present = rng.random((n, 12)) > 0.2
    signals[~present] = 0
    path.mkdir(parents=True)
    np.save(path / "signals.npy", signals)
    index = pd.DataFrame({"record_id": [f"r{i}" for i in range(n)], "subject_id": [f"s{i // 2}" for i in range(n)]})
    for j, name in enumerate(CANONICAL_LEADS):
        index[f"present_{name}"] = present[:, j].astype(int)
    index.to_csv(path / "index.csv", index=False)
    meta = {"fingerprint": "test", "lead_names": list(CANONICAL_LEADS), "dtype": np.dtype(dtype).name}
    (path / "spec.json").write_text(json.dumps(meta))
    return signals, present


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {name: (root / name, *_write_cache(root / name, name)) for name in ("float16", "float32")}


def _collect(stream):
    batches = list(stream)
    return batches, np.concatenate([b["index"].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) == {"signals", "mask", "index"}
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("resident", [True, False])
def test_batches_match_dataset_items(caches, dtype, resident):
    """Signals (cache dtype kept), masks and indices equal dataset[i]; short last batch kept without drop_last."""
    cache, signals, present = caches[dtype]
    ds = ECGLeadDataset(cache, leads="12L")
    assert ds.signal_dtype == getattr(torch, dtype)
    sub = np.array([3, 7, 0, 22, 15, 9, 4])
    stream = BatchStream(ds, sub, batch_size=3, seed=1, shuffle=True, drop_last=False, resident=resident)
    assert stream.resident is resident and len(stream) == 3
    batches, seen = _collect(stream)
    assert [len(b["index"]) for b in batches] == [3, 3, 1]
    assert sorted(seen.tolist()) == sorted(sub.tolist())
    for b in batches:
        assert b["signals"].dtype == getattr(torch, dtype) and b["mask"].dtype == torch.bool
        assert b["index"].dtype == torch.int64 and b["signals"].shape[1:] == (12, T)
        for x, m, i in zip(b["signals"], b["mask"], b["index"].tolist()):
            item = ds[i]
            assert torch.equal(x.float(), item["signals"]) and torch.equal(m, item["mask"])
            np.testing.assert_array_equal(x.numpy(), signals[i])
            np.testing.assert_array_equal(m.numpy(), present[i])


def test_lead_subset_and_dtype_cast(caches):
    """A lead subset (non-contiguous, named) reads the right channels; dtype=float32 casts float16 exactly."""
    cache, signals, present = caches["float16"]
    ds = ECGLeadDataset(cache, leads=["V3", "aVL", "I"])
    for resident in (True, False):
        stream = BatchStream(ds, batch_size=5, seed=0, resident=resident, dtype=torch.float32, num_threads=1)
        assert stream.leads == ("V3", "aVL", "I")
        for b in stream:
            assert b["signals"].dtype == torch.float32
            idx = b["index"].numpy()
            np.testing.assert_array_equal(b["signals"].numpy(), signals[idx][:, [8, 4, 0]].astype(np.float32))
            np.testing.assert_array_equal(b["mask"].numpy(), present[idx][:, [8, 4, 0]])
    six = ECGLeadDataset(cache, leads="6L")  # contiguous run of leads: read as a slice
    np.testing.assert_array_equal(six.read_signals([4, 1]), signals[[4, 1], :6])


@pytest.mark.parametrize("threads", [0, 2])
def test_resident_and_streaming_identical(caches, threads):
    """Same seed and epoch: the two modes yield the same batches, over several epochs and both dtypes."""
    for dtype in ("float16", "float32"):
        ds = ECGLeadDataset(caches[dtype][0], leads="12L")
        kw = {"batch_size": 4, "seed": 7, "num_threads": threads, "prefetch": 3}
        resident, streaming = BatchStream(ds, resident=True, **kw), BatchStream(ds, resident=False, **kw)
        ring = BatchStream(ds, resident=False, dtype=torch.float32, **kw)
        ring._ring = True  # the accelerator path: ring slots in the cache dtype, copied out per batch
        for epoch in range(3):
            for stream in (resident, streaming, ring):
                stream.set_epoch(epoch)
            expected = list(resident)
            _same_batches(expected, list(streaming))
            rung = list(ring)
            for b in rung:
                assert b["signals"].dtype == torch.float32
                b["signals"] = b["signals"].to(resident.cache_dtype)
            _same_batches(expected, rung)


def test_resident_copy_loaded_in_chunks(caches, monkeypatch):
    """Chunked, threaded loading (straight and through staging buffers as on a GPU) copies every record right."""
    from kale_ext.loaddata import batch_stream

    cache, signals, _ = caches["float16"]
    ds = ECGLeadDataset(cache, leads="12L")
    monkeypatch.setattr(batch_stream, "LOAD_CHUNK_BYTES", 3 * 12 * T * 2)  # 3 records per chunk
    sub = np.array([5, 1, 22, 9, 9, 14, 0, 3, 18, 2])
    for threads in (0, 1, 3):
        stream = BatchStream(ds, sub, batch_size=4, resident=True, num_threads=threads)
        np.testing.assert_array_equal(stream._signals.numpy(), signals[sub])
        staged = BatchStream(ds, sub, batch_size=4, resident=False, num_threads=threads)
        staged._ring = True  # the accelerator path: staging buffers copied into the device tensor
        np.testing.assert_array_equal(staged._load_resident().numpy(), signals[sub])


def test_order_matches_epoch_seeded_sampler_and_depends_on_seed_epoch_only(caches):
    """The per-rank order is EpochSeededSampler's (seed + epoch draw, rank slicing); only (seed, epoch) matter."""
    ds = ECGLeadDataset(caches["float16"][0], leads="12L")
    sub = np.arange(2, 21)
    for shuffle, drop_last in ((True, True), (False, False), (True, False)):
        for rank in range(2):
            sampler = EpochSeededSampler(sub, seed=5, shuffle=shuffle, num_replicas=2, rank=rank, drop_last=drop_last)
            stream = BatchStream(ds, sub, 1, seed=5, shuffle=shuffle, drop_last=drop_last, num_replicas=2, rank=rank)
            for epoch in (0, 3):
                sampler.set_epoch(epoch)
                stream.set_epoch(epoch)
                assert _collect(stream)[1].tolist() == list(sampler)
    a = BatchStream(ds, sub, 4, seed=5, resident=False)
    b = BatchStream(ds, sub, 4, seed=5, resident=True, num_threads=0)
    list(a)  # consuming epochs or other randomness does not move the order
    torch.manual_seed(123)
    np.random.seed(0)
    a.set_epoch(2)
    b.set_epoch(2)
    assert _collect(a)[1].tolist() == _collect(b)[1].tolist()
    expected = sub[shard_order(epoch_order(len(sub), 5, 2), 1, 0, True)][:16]
    assert _collect(a)[1].tolist() == expected.tolist()  # iterating again without set_epoch keeps epoch 2
    orders = {}
    for seed, epoch in ((5, 0), (5, 1), (8, 0), (6, 0)):
        a = BatchStream(ds, sub, 4, seed=seed)
        a.set_epoch(epoch)
        orders[seed, epoch] = _collect(a)[1].tolist()
    assert len({tuple(orders[k]) for k in ((5, 0), (5, 1), (8, 0))}) == 3
    assert orders[5, 1] == orders[6, 0]  # the draw is seeded by seed + epoch, as in EpochSeededSampler


def test_two_replicas_disjoint_and_cover_epoch(caches):
    """Two ranks see disjoint records that together cover the epoch (the uneven tail dropped); same batch count."""
    ds = ECGLeadDataset(caches["float32"][0], leads="12L")
    streams = [BatchStream(ds, batch_size=2, seed=3, num_replicas=2, rank=r, drop_last=True) for r in range(2)]
    for epoch in (0, 1):
        seen = []
        for stream in streams:
            stream.set_epoch(epoch)
            seen.append(_collect(stream)[1])
        assert len(streams[0]) == len(streams[1]) == 5 and len(seen[0]) == len(seen[1]) == 10
        assert set(seen[0]).isdisjoint(seen[1])
        per_rank = [stream.rank_positions() for stream in streams]
        assert sorted(np.concatenate(per_rank).tolist()) == sorted(epoch_order(N, 3, epoch)[:22].tolist())
    evaluation = [BatchStream(ds, batch_size=4, shuffle=False, drop_last=False, num_replicas=2, rank=r) for r in (0, 1)]
    union = np.concatenate([_collect(s)[1] for s in evaluation])
    assert set(union.tolist()) == set(range(N)) and len(union) == 24  # padded by wrapping around


def test_resume_mid_run_reproduces_epoch(caches):
    """A fresh stream told set_epoch(k) yields exactly what the uninterrupted stream yielded in epoch k."""
    ds = ECGLeadDataset(caches["float16"][0], leads="12L")
    kw = {"batch_size": 3, "seed": 11, "num_replicas": 2, "rank": 1}
    run = BatchStream(ds, resident=False, **kw)
    history = []
    for epoch in range(4):
        run.set_epoch(epoch)
        history.append(list(run))
    resumed = BatchStream(ECGLeadDataset(caches["float16"][0], leads="12L"), resident=True, **kw)
    resumed.set_epoch(2)
    _same_batches(list(resumed), history[2])
    resumed.set_epoch(3)
    _same_batches(list(resumed), history[3])
    assert not torch.equal(history[2][0]["index"], history[3][0]["index"])


def test_auto_mode_budget_and_unfinished_iteration(caches):
    """resident='auto' follows the byte budget; breaking off an epoch and starting again is safe."""
    ds = ECGLeadDataset(caches["float16"][0], leads="12L")
    assert BatchStream(ds, resident="auto", resident_budget=10**9).resident
    small = BatchStream(ds, resident="auto", resident_budget=100, batch_size=4)
    assert not small.resident and small.nbytes == N * 12 * T * 2
    first = iter(small)
    next(first)
    full = list(small)  # a new iteration closes the unfinished one and waits for its readers
    assert len(full) == len(small) == 5 and list(first) == []
    with pytest.raises(ValueError, match="rank"):
        BatchStream(ds, num_replicas=2, rank=2)


def test_pickled_stream_yields_the_same_batches(caches):
    """A stream survives pickling (e.g. into spawned processes) mid-use and yields the same epoch."""
    ds = ECGLeadDataset(caches["float16"][0], leads="12L")
    for resident in (True, False):
        stream = BatchStream(ds, batch_size=4, seed=9, resident=resident)
        stream.set_epoch(1)
        running = iter(stream)
        first = next(running)
        copy = pickle.loads(pickle.dumps(stream))
        assert copy.epoch == 1 and copy.resident is resident
        batches = list(copy)
        _same_batches(batches[:1], [first])
        _same_batches(batches, list(stream))


def test_buffer_pool_reuses_only_released_buffers():
    """A pooled buffer comes back only once no batch (or view, or numpy array) of it is alive."""
    pool = _BufferPool((4, 3), torch.float32, capacity=2)
    a = pool.acquire(4)
    b = pool.acquire(4)
    assert a.data_ptr() != b.data_ptr()
    view = a[1:]
    del a
    c = pool.acquire(2)
    assert c.data_ptr() not in (view.data_ptr() - 12, b.data_ptr())  # a is still held through its view
    del view, c
    d = pool.acquire(4)
    ptr = d.data_ptr()
    assert ptr != b.data_ptr() and d.shape == (4, 3)
    held = d.numpy()
    del d
    assert pool.acquire(4).data_ptr() != ptr  # the numpy array still refers to it
    del held
    assert pool.acquire(4).data_ptr() == ptr  # released: recycled


def test_cpu_batches_stay_valid_while_held(caches):
    """Collected CPU batches are never overwritten by later ones (the pool only recycles released tensors)."""
    cache, signals, _ = caches["float32"]
    ds = ECGLeadDataset(cache, leads="12L")
    for resident in (True, False):
        stream = BatchStream(ds, batch_size=2, seed=2, resident=resident, prefetch=2)
        kept = [b for epoch in range(2) for b in (stream.set_epoch(epoch) or list(stream))]
        for b in kept:
            np.testing.assert_array_equal(b["signals"].numpy(), signals[b["index"].numpy()])


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_lightning_sets_the_epoch_and_resumes(caches, tmp_path):
    """Lightning finds stream.sampler.set_epoch: every epoch of fit, also after a resume, trains on (seed, epoch)."""
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.callbacks import ModelCheckpoint

    ds = ECGLeadDataset(caches["float16"][0], leads="12L")

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
            return (self.w - batch["signals"].float().mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_epochs, ckpt_path=None):
        probe = Probe()
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            accelerator="cpu",
            logger=False,
            callbacks=[ModelCheckpoint(dirpath=tmp_path / f"ckpt{max_epochs}", save_last=True)],
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(probe, train_dataloaders=BatchStream(ds, batch_size=5, seed=4), ckpt_path=ckpt_path)
        return probe.seen

    seen = fit(3)
    for epoch in range(3):
        assert seen[epoch] == epoch_order(N, 4, epoch)[:20].tolist()
    resumed = fit(5, ckpt_path=str(tmp_path / "ckpt3" / "last.ckpt"))  # a fresh stream, epochs 3 and 4
    assert sorted(resumed) == [3, 4]
    for epoch in (3, 4):
        assert resumed[epoch] == epoch_order(N, 4, epoch)[:20].tolist()


def _check_against_items(ds, batch_size):
    for resident in (True, False):
        stream = BatchStream(ds, batch_size=batch_size, seed=1, drop_last=False, resident=resident)
        batches = list(stream)
        assert sorted(np.concatenate([b["index"].numpy() for b in batches]).tolist()) == list(range(len(ds)))
        for b in batches:
            assert b["signals"].dtype == torch.float16
            for x, m, i in zip(b["signals"], b["mask"], b["index"].tolist()):
                item = ds[i]
                assert torch.equal(x.float(), item["signals"]) and torch.equal(m, item["mask"])


def test_float16_cache_built_by_prepare_ecg_cache(tmp_path):
    """On a float16 cache written by prepare_ecg_cache (one record lacks V3), batches equal the dataset's items."""
    from kale_ext.loaddata.synthetic import write_synthetic_cohort
    from kale_ext.prepdata.ecg_cache import prepare_ecg_cache
    from kale_ext.prepdata.ecg_transforms import PreprocessSpec

    cohort = write_synthetic_cohort(tmp_path / "src", n_subjects=5, seed=2, fs=100.0, duration_s=3.0)
    last = pd.read_csv(cohort.record_list).path.iloc[-1]
    hea = tmp_path / "src" / f"{last}.hea"
    hea.write_text("\n".join(ln.replace(" V3", " resp") for ln in hea.read_text().splitlines()) + "\n")
    spec = PreprocessSpec(target_fs=100.0, target_length=200)
    prepare_ecg_cache(
        cohort.root, tmp_path / "cache", spec=spec, leads="6L", dtype="float16", num_workers=0, progress=False
    )
    for leads in ("12L", ["V3", "I", "aVF"]):
        ds = ECGLeadDataset(tmp_path / "cache", leads=leads)
        assert ds.signal_dtype == torch.float16
        _check_against_items(ds, 2)
    assert not ECGLeadDataset(tmp_path / "cache", leads=["V3"]).masks[-1, 0]


def test_real_records_float16_cache(cinc_dir, tmp_path):
    """Real 12-lead records through a float16 cache: both modes give the dataset's items."""
    from kale_ext.prepdata.ecg_cache import prepare_ecg_cache
    from kale_ext.prepdata.ecg_transforms import PreprocessSpec

    spec = PreprocessSpec(target_fs=100.0, target_length=1000)
    prepare_ecg_cache(cinc_dir, tmp_path / "cache", spec=spec, dtype="float16", num_workers=0, progress=False)
    ds = ECGLeadDataset(tmp_path / "cache", leads="12L")
    assert len(ds) >= 40
    _check_against_items(ds, 16)


def test_training_stream_may_keep_the_short_last_batch_like_the_dataloader(caches):
    """drop_last_batch=False (what pre-training uses): ceil(n / batch) batches, every training record once."""
    ds = ECGLeadDataset(caches["float32"][0], leads=CANONICAL_LEADS)
    kept = BatchStream(ds, batch_size=5, seed=2, drop_last=True, drop_last_batch=False, resident=True)
    dropped = BatchStream(ds, batch_size=5, seed=2, drop_last=True, resident=True)
    assert len(kept) == len(list(kept)) == 5 and len(dropped) == 4  # 23 records
    _, order = _collect(kept)
    assert sorted(order.tolist()) == list(range(N))
    sampler = EpochSeededSampler(np.arange(N), seed=2, shuffle=True, drop_last=True)
    assert order.tolist() == list(sampler)
