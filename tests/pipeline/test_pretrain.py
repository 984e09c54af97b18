"""Tests of kale_ext.pipeline.pretrain: split, sampler, reference terms, exact resume, weights-only loading."""

import json
import pickle

import numpy as np
import pytest
import torch
from helpers.lightning import FailAtEpoch, SimulatedInterruption
from torch.utils.data import Dataset

from kale_ext.embed.zoo import build_model
from kale_ext.pipeline.artifacts import is_pretrained, load_model
from kale_ext.pipeline.pretrain import (
    EpochSeededSampler,
    PretrainModule,
    PretrainSettings,
    resumable_checkpoint,
    run_pretraining,
    split_by_subject,
)
from kale_ext.predict.losses import gaussian_kl
from kale_ext.predict.objectives import ELBOObjective, ReferenceObjective, build_objective, reference_alignment

LEADS = ("I", "II", "V1")
T = 64


class _TinyLeads(Dataset):
    """Random smooth 3-lead signals with subject ids (two records per subject) and one absent lead in some."""

    def __init__(self, n=24, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(n, 1, T, generator=g).cumsum(-1) / 8
        self.x = base + 0.1 * torch.randn(n, len(LEADS), T, generator=g)
        self.mask = torch.ones(n, len(LEADS), dtype=torch.bool)
        self.mask[::5, 2] = False
        self.leads = LEADS
        self.subject_ids = np.array([f"s{i // 2}" for i in range(n)])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"signals": self.x[i], "mask": self.mask[i]}


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model("lsemvae", LEADS, T, 4)


def _objective():
    return ELBOObjective(beta=1.0, beta_warmup_epochs=2, gamma=1.0)


def _settings(**kw):
    base = dict(
        epochs=3,
        batch_size=8,
        lr=1e-3,
        val_fraction=0.25,
        seed=7,
        accelerator="cpu",
        devices=1,
        progress_bar=False,
        log_every_n_steps=1,
    )
    base.update(kw)
    return PretrainSettings(**base)


def test_split_by_subject_is_disjoint_seeded_and_sized():
    subjects = np.repeat(np.arange(50).astype(str), 3)
    train, val = split_by_subject(subjects, 0.1, seed=3)
    assert set(subjects[train]).isdisjoint(subjects[val])
    assert len(set(subjects[val])) == 5 and len(train) + len(val) == len(subjects)
    again = split_by_subject(subjects, 0.1, seed=3)
    other = split_by_subject(subjects, 0.1, seed=4)
    assert np.array_equal(val, again[1]) and not np.array_equal(val, other[1])


def test_sampler_order_depends_on_epoch_only_and_ranks_are_disjoint():
    idx = np.arange(100, 123)
    s = EpochSeededSampler(idx, seed=1)
    s.set_epoch(2)
    first = list(s)
    s.set_epoch(3)
    assert list(s) != first
    s.set_epoch(2)
    assert list(s) == first and sorted(first) == idx.tolist()
    ranks = [EpochSeededSampler(idx, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(5)
    a, b = list(ranks[0]), list(ranks[1])
    assert len(a) == len(b) == 11 and not set(a) & set(b)


def test_reference_alignment_matches_hand_computation():
    mean = torch.randn(4, 3, 5)
    mask = torch.ones(4, 3, dtype=torch.bool)
    centre = mean.mean(0)
    expected = 0.1 * torch.stack([((mean[i] - centre) ** 2).mean() for i in range(4)]).mean()
    assert torch.allclose(reference_alignment(mean, mask, 0.1), expected, atol=1e-6)
    # an absent lead leaves both the centre and the average
    mask[3] = False
    centre3 = mean[:3].mean(0)
    expected3 = 0.1 * torch.stack([((mean[i] - centre3) ** 2).mean() for i in range(3)]).mean()
    assert torch.allclose(reference_alignment(mean, mask, 0.1), expected3, atol=1e-6)


def test_reference_mode_kl_is_on_the_mean_of_lead_encoders():
    model = _model()
    module = PretrainModule(model, ReferenceObjective(gamma=0.0, beta=1.0, beta_warmup_epochs=0))
    data = _TinyLeads(6)
    batch = {"signals": data.x[:6], "mask": torch.ones(6, 3, dtype=torch.bool)}
    losses = module.compute_losses(batch, sample=False)
    mean, log_var, _ = model.encode(batch["signals"], leads=LEADS)
    expected = gaussian_kl(mean.mean(0), log_var.mean(0)).mean()
    assert torch.allclose(losses["kl"], expected, atol=1e-5)
    assert torch.allclose(losses["loss"], losses["recon"] + losses["kl"], atol=1e-4)


def test_paper_mode_beta_anneals_per_step_and_reference_per_epoch():
    module = PretrainModule(_model(), ELBOObjective(beta=0.5, beta_warmup_epochs=2))
    assert module.current_beta() == 0.0  # step 0 without a trainer
    ref = PretrainModule(_model(), ReferenceObjective(beta=1.0, beta_warmup_epochs=50))
    assert ref.current_beta() == 0.0
    with pytest.raises(ValueError, match="elbo"):
        build_objective("bogus")


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    data = _TinyLeads()
    args = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": T, "latent_dim": 4}
    full = _model(1)
    run_pretraining(full, _objective(), data, tmp_path / "full", _settings(), build_args=args)

    killed = _model(1)
    with pytest.raises(SimulatedInterruption):
        run_pretraining(
            killed, _objective(), data, tmp_path / "resumed", _settings(), build_args=args, callbacks=[FailAtEpoch(2)]
        )
    assert (tmp_path / "resumed" / "checkpoints" / "last.ckpt").exists()
    assert not is_pretrained(tmp_path / "resumed")
    fresh = _model(99)  # a different initialisation: everything must come from the checkpoint
    result = run_pretraining(fresh, _objective(), data, tmp_path / "resumed", _settings(), build_args=args)
    assert result.resumed_from is not None
    a, b = full.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    assert max(diffs.values()) <= 1e-6, {k: v for k, v in diffs.items() if v > 1e-6}
    # the weights moved from the initialisation (the test can fail)
    init = _model(1).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)


def test_outputs_load_with_weights_only(tmp_path):
    data = _TinyLeads()
    args = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": T, "latent_dim": 4}
    model = _model()
    run_pretraining(model, _objective(), data, tmp_path, _settings(epochs=1), build_args=args)
    assert is_pretrained(tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert "state_dict" in ckpt and ckpt["epoch"] == 0
    assert json.loads((tmp_path / "model_args.json").read_text())["latent_dim"] == 4
    rebuilt = load_model(tmp_path, lambda **kw: build_model(kw.pop("name"), **kw))
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k].cpu(), v.cpu())
    logs = list((tmp_path / "logs").rglob("metrics.csv"))
    assert logs and "val/loss" in logs[0].read_text()


def test_compiled_forward_gives_the_same_losses_and_keeps_the_state_dict():
    """PRETRAIN.COMPILE: torch.compile of the forward only; same numbers, same parameter names for checkpoints."""
    data = _TinyLeads(6)
    batch = {"signals": data.x[:6], "mask": data.mask[:6]}
    eager = PretrainModule(_model(), ELBOObjective(gamma=0.1, beta=1.0, beta_warmup_epochs=0))
    compiled = PretrainModule(_model(), ELBOObjective(gamma=0.1, beta=1.0, beta_warmup_epochs=0), compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    a = eager.compute_losses(batch, sample=False)
    b = compiled.compute_losses(batch, sample=False)
    for key in ("loss", "recon", "kl", "align"):
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
    b["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in compiled.model.encoder.parameters())


def test_ddp_with_two_cpu_processes_shards_the_data_without_overlap(tmp_path):
    """Two DDP processes (Lightning on CPU) train on disjoint, equally long slices of every epoch."""
    import subprocess
    import sys
    from pathlib import Path

    probe = Path(__file__).with_name("ddp_probe.py")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(probe), str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = {}
    for rank in (0, 1):
        lines = (tmp_path / f"seen_rank{rank}.txt").read_text().split("\n")
        seen[rank] = [int(i) for line in lines if line for i in line.split()[1:]]
    assert seen[0] and seen[1] and len(seen[0]) == len(seen[1])
    assert not set(seen[0]) & set(seen[1])
    assert (tmp_path / "model.pt").exists()


def test_a_truncated_last_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    data = _TinyLeads()
    args = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": T, "latent_dim": 4}
    run_pretraining(_model(), _objective(), data, tmp_path, _settings(epochs=2), build_args=args)
    ckpt = tmp_path / "checkpoints"
    last = ckpt / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])  # a crash (or a full disk) mid-write
    with caplog.at_level("WARNING"):
        chosen = resumable_checkpoint(ckpt)
    assert chosen is not None and chosen.name.startswith("epoch") and "cannot be read" in caplog.text
    for p in ckpt.glob("*.ckpt"):
        p.write_bytes(b"")
    assert resumable_checkpoint(ckpt) is None


def test_gate_diagnostics_are_written_per_epoch(tmp_path):
    data = _TinyLeads()
    args = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": T, "latent_dim": 4}
    run_pretraining(_model(), _objective(), data, tmp_path, _settings(epochs=2), build_args=args)
    import pandas as pd

    table = pd.read_csv(tmp_path / "gate_diagnostics.csv")
    assert sorted(table["epoch"].unique()) == [0, 1]
    assert list(table[table["epoch"] == 0]["expert"]) == [*LEADS, "shared (PoE)"]
    sums = table.groupby("epoch")["mean_weight"].sum()
    assert np.allclose(sums, 1.0, atol=1e-4)  # every sample's weights sum to 1 over its present experts
    assert (table["entropy_nats"] > 0).all() and (table["entropy_nats"] <= np.log(len(LEADS) + 1) + 1e-6).all()
    logs = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "gate/entropy" in logs and "train/balance" in logs


class _Payload:
    """A pickle that runs code when unpickled without weights_only (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_crafted_checkpoint_never_runs_even_when_torch_is_told_to_unpickle(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "payload_ran"
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "checkpoints" / "last.ckpt")
    args = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": T, "latent_dim": 4}
    with caplog.at_level("WARNING"):
        result = run_pretraining(_model(), _objective(), _TinyLeads(), tmp_path, _settings(epochs=1), build_args=args)
    assert not marker.exists()  # the payload did not run
    assert result.resumed_from is None and "cannot be read" in caplog.text and is_pretrained(tmp_path)
    torch.save({"x": _Payload(marker)}, tmp_path / "model.pt")  # a crafted model file is refused too
    with pytest.raises(pickle.UnpicklingError):
        load_model(tmp_path)
    assert not marker.exists()


class _RecordingELBO(ELBOObjective):
    """The ELBO objective that records what each call saw: input, target, sampling, train/eval mode."""

    def __init__(self):
        super().__init__(beta=1.0, beta_warmup_epochs=0, gamma=0.1)
        self.calls = []

    def forward(self, model, batch, progress):
        self.calls.append((batch.signals.clone(), batch.target.clone(), batch.sample, model.training))
        return super().forward(model, batch, progress)


def test_augmentation_reaches_the_training_input_only_and_validation_samples_z(tmp_path):
    data = _TinyLeads()

    def flatten_lead0(signals, mask):
        out = signals.clone()
        out[:, 0] = 0.0
        return out

    objective = _RecordingELBO()
    run_pretraining(_model(), objective, data, tmp_path, _settings(epochs=1), augment=flatten_lead0)
    train = [c for c in objective.calls if c[3]]
    val = [c for c in objective.calls if not c[3]]
    assert train and val
    for signals, target, sample, _ in train:
        assert sample and (signals[:, 0] == 0).all() and (target[:, 0] != 0).any()  # corrupted input, clean target
        torch.testing.assert_close(signals[:, 1:], target[:, 1:])
    for signals, target, sample, _ in val:
        assert sample and (signals[:, 0] != 0).any()  # clean input, z drawn (an ELBO estimate, not at the mean)
        torch.testing.assert_close(signals, target)
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "val/neg_elbo_poe" in metrics and "train/neg_elbo" in metrics
