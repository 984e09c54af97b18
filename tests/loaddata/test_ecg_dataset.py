"""Tests of kale_ext.loaddata.ecg_dataset: items, masks, fingerprint check, label join and rules, loaders."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from kale_ext.loaddata.ecg_dataset import (
    ECGLeadDataset,
    batch_loader,
    detection_label,
    elevated_label,
    label_from_threshold,
    phenotype_label,
    threshold_label,
)
from kale_ext.loaddata.synthetic import write_synthetic_cohort
from kale_ext.prepdata.ecg_cache import prepare_ecg_cache
from kale_ext.prepdata.ecg_transforms import PreprocessSpec

SPEC = PreprocessSpec(target_fs=100.0, target_length=200)


@pytest.fixture(scope="module")
def cohort_cache(tmp_path_factory):
    """A 6-subject synthetic cohort (one record has no V3) and its cache."""
    root = tmp_path_factory.mktemp("cohort")
    cohort = write_synthetic_cohort(root / "src", n_subjects=6, seed=5, fs=100.0, duration_s=3.0)
    # drop V3 from the last record by rewriting its header without that channel
    last = pd.read_csv(cohort.record_list).path.iloc[-1]
    hea = root / "src" / f"{last}.hea"
    lines = hea.read_text().splitlines()
    lines = [ln.replace(" V3", " resp") if ln.endswith(" V3") else ln for ln in lines]
    hea.write_text("\n".join(lines) + "\n")
    cache = root / "cache"
    rep = prepare_ecg_cache(cohort.root, cache, spec=SPEC, leads="6L", num_workers=0, progress=False)
    assert rep.n_written == 6
    return cohort, cache


def test_items_select_leads_by_name(cohort_cache):
    _, cache = cohort_cache
    ds = ECGLeadDataset(cache, leads=["V3", "avl", "I"])
    store = np.load(cache / "signals.npy")
    assert ds.leads == ("V3", "aVL", "I") and len(ds) == 6
    item = ds[2]
    assert item["signals"].dtype == torch.float32 and item["signals"].shape == (3, 200)
    np.testing.assert_array_equal(item["signals"].numpy(), store[2][[8, 4, 0]])
    assert item["mask"].dtype == torch.bool and item["mask"].all()
    assert item["record_id"] == ds.record_ids[2] and "label" not in item
    last = ds[5]
    assert last["mask"].tolist() == [False, True, True] and (last["signals"][0] == 0).all()
    assert ECGLeadDataset(cache).leads == ("I", "II", "III", "aVR", "aVL", "aVF")
    assert ECGLeadDataset(cache, indices=[4, 1]).record_ids.tolist() == ds.record_ids[[4, 1]].tolist()


def test_fingerprint_mismatch_raises(cohort_cache):
    _, cache = cohort_cache
    ECGLeadDataset(cache, expected_fingerprint=SPEC)
    ECGLeadDataset(cache, expected_fingerprint=SPEC.fingerprint())
    with pytest.raises(ValueError, match="fingerprint"):
        ECGLeadDataset(cache, expected_fingerprint=PreprocessSpec())
    with pytest.raises(FileNotFoundError, match="prepare_ecg_cache"):
        ECGLeadDataset(cache / "nope")


def test_label_join_reports_missing_ids(cohort_cache):
    cohort, cache = cohort_cache
    haemo = pd.read_csv(cohort.haemodynamics, dtype={"subject_id": str})
    table = label_from_threshold(haemo, "detection", "mPAP", 20.0)
    table = pd.concat([table.iloc[1:], pd.DataFrame({"subject_id": ["99999999"], "label": [1]})])
    ds = ECGLeadDataset(cache, labels=table)
    first_subject = haemo.subject_id.iloc[0]
    assert ds.unlabelled_ids == [first_subject]
    assert ds.labels_without_record == ["99999999"]
    assert len(ds) == 5 and first_subject not in ds.subject_ids
    expected = (haemo.set_index("subject_id").loc[ds.subject_ids, "mPAP"] > 20).astype(int).to_numpy()
    np.testing.assert_array_equal(ds.labels, expected)
    assert ds[0]["label"].item() == expected[0]
    by_record = pd.DataFrame({"record_id": ds.record_ids, "y": np.arange(5) % 2})
    ds2 = ECGLeadDataset(cache, labels=by_record, label_column="y", id_column="record_id")
    assert len(ds2) == 5 and ds2.labels.tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="conflicting"):
        ECGLeadDataset(cache, labels=pd.DataFrame({"subject_id": ["a", "a"], "label": [0, 1]}))


def test_label_rules():
    np.testing.assert_array_equal(threshold_label([19.0, 20.0, 21.0], 20.0), [0.0, 0.0, 1.0])
    assert np.isnan(detection_label([np.nan], 20.0)[0])
    np.testing.assert_array_equal(elevated_label([15.0, 15.5], 15.0), [0.0, 1.0])
    ph = phenotype_label([30.0, 30.0, 18.0], [16.0, 10.0, 30.0], 20.0, 15.0)
    np.testing.assert_array_equal(ph[:2], [1.0, 0.0])
    assert np.isnan(ph[2])
    table = pd.DataFrame({"subject_id": [1, 2, 3, 4], "mPAP": [30, 25, 15, np.nan], "PAWP": [20, 10, 20, 20]})
    pheno = label_from_threshold(table, "phenotype", ["mPAP", "PAWP"], [20, 15])
    assert pheno.subject_id.tolist() == ["1", "2"] and pheno.label.tolist() == [1, 0]
    assert label_from_threshold(table, "elevated", "PAWP", 15).label.tolist() == [1, 0, 1, 1]
    with pytest.raises(ValueError, match="unknown label rule"):
        label_from_threshold(table, "severity", "mPAP", 20)


def test_dataloader_workers_and_distributed_sampler(cohort_cache):
    cohort, cache = cohort_cache
    ds = ECGLeadDataset(cache, leads="12L")
    batches = list(DataLoader(ds, batch_size=4, num_workers=1))
    assert batches[0]["signals"].shape == (4, 12, 200) and batches[0]["mask"].shape == (4, 12)
    assert sum(len(b["record_id"]) for b in batches) == 6
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        idx = list(sampler)
        assert len(idx) == 3
        seen.append(set(idx))
        ids = [rid for b in DataLoader(ds, batch_size=2, sampler=sampler) for rid in b["record_id"]]
        assert ids == ds.record_ids[idx].tolist()
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(6))


@pytest.mark.parametrize("leads", ["12L", "6L"])
def test_batch_loader_equals_item_loader(cohort_cache, leads):
    """Whole-batch reads give the same content and order as per-item reads and default collation."""
    _, cache = cohort_cache
    ds = ECGLeadDataset(cache, leads=leads)
    plain = list(DataLoader(ds, batch_size=4))
    for workers in (0, 1):
        fast = list(batch_loader(ds, 4, num_workers=workers))
        assert len(fast) == len(plain)
        for a, b in zip(plain, fast):
            assert torch.equal(a["signals"], b["signals"]) and torch.equal(a["mask"], b["mask"])
            assert list(a["record_id"]) == b["record_id"]
    shuffled = list(batch_loader(ds, 4, shuffle=True, seed=3))
    ids = [rid for b in shuffled for rid in b["record_id"]]
    assert sorted(ids) == sorted(ds.record_ids.tolist()) and ids == [
        rid for b in batch_loader(ds, 4, shuffle=True, seed=3) for rid in b["record_id"]
    ]
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=False)
    ids = [rid for b in batch_loader(ds, 2, sampler=sampler) for rid in b["record_id"]]
    assert ids == ds.record_ids[list(sampler)].tolist()
