"""Tests of kale_ext.pipeline.pretrain: split, sampler, reference terms, exact resume, weights-only loading."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from helpers.lightning import FailAtEpoch, SimulatedInterruption
from torch.utils.data import Dataset

from kale_ext.embed.zoo import MODELS, build_model
from kale_ext.loaddata.ecg_dataset import ECGLeadDataset
from kale_ext.loaddata.leads import CANONICAL_LEADS
from kale_ext.pipeline.artifacts import is_pretrained, load_model
from kale_ext.pipeline.pretrain import (
    EpochSeededSampler,
    PretrainModule,
    PretrainSettings,
    lead_pearson_r,
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


@pytest.mark.parametrize("window", [0, 24])
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, window):
    """Also with windowed pre-training: the crops come from the per-step reseeded generator."""
    data = _TinyLeads()
    length = window or T
    args = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": length, "latent_dim": 4}

    def model(seed):
        torch.manual_seed(seed)
        return build_model("lsemvae", LEADS, length, 4)

    settings = _settings(window=window)
    full = model(1)
    run_pretraining(full, _objective(), data, tmp_path / "full", settings, build_args=args)

    killed = model(1)
    with pytest.raises(SimulatedInterruption):
        run_pretraining(
            killed, _objective(), data, tmp_path / "resumed", settings, build_args=args, callbacks=[FailAtEpoch(2)]
        )
    assert (tmp_path / "resumed" / "checkpoints" / "last.ckpt").exists()
    assert not is_pretrained(tmp_path / "resumed")
    fresh = model(99)  # a different initialisation: everything must come from the checkpoint
    result = run_pretraining(fresh, _objective(), data, tmp_path / "resumed", settings, build_args=args)
    assert result.resumed_from is not None
    a, b = full.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
    assert max(diffs.values()) <= 1e-6, {k: v for k, v in diffs.items() if v > 1e-6}
    # the weights moved from the initialisation (the test can fail)
    init = model(1).state_dict()
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
    with pytest.raises(ValueError, match="does not match the checksum"):  # never even opened: not the file written
        load_model(tmp_path)
    (tmp_path / "model.pt.sha256").unlink()
    with pytest.raises(ValueError, match="model.pt cannot be read") as err:  # opened weights-only: refused
        load_model(tmp_path)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


class _TinyStreamLeads(_TinyLeads):
    """``_TinyLeads`` with the memory-map protocol, so pre-training streams it."""

    signal_dtype = torch.float32
    num_samples = T

    @property
    def masks(self):
        return self.mask.numpy()

    def read_signals(self, indices, out=None):
        rows = self.x[np.asarray(indices)].numpy()
        if out is None:
            return rows
        out[...] = rows
        return out


def test_fewer_records_than_a_batch_still_train_when_streamed(tmp_path):
    args = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": T, "latent_dim": 4}
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_pretraining(model, _objective(), _TinyStreamLeads(), tmp_path, _settings(batch_size=32), build_args=args)
    assert is_pretrained(tmp_path)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it did train
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3  # one (short) batch per epoch, 3 epochs


def test_more_processes_than_training_records_are_refused_before_training(tmp_path):
    from kale_ext.pipeline.pretrain import ECGPretrainDataModule, _fit_batch_to_records

    data = ECGPretrainDataModule(_TinyStreamLeads(n=4), batch_size=8, val_fraction=0.5)
    with pytest.raises(ValueError, match=r"2 training records .* fewer than the 4 processes.*TRAINER.DEVICES"):
        _fit_batch_to_records(data, 4)


def test_a_model_without_any_optimiser_step_is_not_marked_done(tmp_path):
    args = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": T, "latent_dim": 4}
    with pytest.raises(RuntimeError, match="no optimiser step"):
        run_pretraining(_model(), _objective(), _TinyLeads(), tmp_path, _settings(epochs=0), build_args=args)
    assert not is_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Windowed pre-training, loaders' step counts, reconstruction r per epoch, early stopping
# ---------------------------------------------------------------------------------------------------------------------
class _Ramp(_TinyLeads):
    """Signals that name their own position: record b, time t holds ``b * T + t`` (every lead), all leads present."""

    def __init__(self, n=24):
        super().__init__(n)
        self.x = (torch.arange(n).view(n, 1, 1) * T + torch.arange(T).view(1, 1, T)).float().expand(-1, 3, -1)
        self.mask = torch.ones(n, len(LEADS), dtype=torch.bool)


class _Recording(ELBOObjective):
    """ELBO that records where every window it is given starts: (training, records, starts, width) per call."""

    def __init__(self):
        super().__init__(beta=1.0, beta_warmup_epochs=2, gamma=1.0)
        self.seen = []

    def forward(self, model, batch, progress):
        first = batch.signals[:, 0, :].detach().long()
        # a window is a run of consecutive positions of one record
        assert torch.equal(first - first[:, :1], torch.arange(first.shape[1]).expand_as(first))
        # training calls are told apart by the model's mode (validation draws z too, so batch.sample does not)
        self.seen.append((model.training, (first[:, 0] // T).tolist(), (first[:, 0] % T).tolist(), first.shape[1]))
        return super().forward(model, batch, progress)


def _windowed_run(tmp_path, name, window=16, seed=7, **kw):
    torch.manual_seed(0)
    model = build_model("lsemvae", LEADS, window, 4)
    objective = _Recording()
    settings = _settings(epochs=2, window=window, seed=seed, lr=1e-6, resume=False, **kw)
    run_pretraining(model, objective, _Ramp(), tmp_path / name, settings)
    return objective.seen


def test_windowed_training_draws_a_fresh_uniform_crop_per_step_within_bounds_and_reproducibly(tmp_path):
    """PRETRAIN.WINDOW: every training step crops each record anew; the same seed crops the same windows."""
    window = 16
    seen = _windowed_run(tmp_path, "a", window)
    train = [s for s in seen if s[0]]
    assert len(train) == 2 * 3  # 18 training records, batch 8: 3 steps per epoch (short last batch kept)
    starts = [start for _, _, step_starts, width in train for start in step_starts]
    assert all(width == window for *_, width in train)
    assert min(starts) >= 0 and max(starts) <= T - window
    assert len(set(starts)) > 10  # uniform over 0..48, not one fixed window
    # the same record gets different windows in different steps (a new crop per step)
    by_record = {}
    for _, records, step_starts, _ in train:
        for r, s in zip(records, step_starts):
            by_record.setdefault(r, set()).add(s)
    assert sum(len(v) > 1 for v in by_record.values()) >= len(by_record) // 2
    # validation sees every window of each held-out record (non-overlapping tiles)
    held_out = [s for s in seen if not s[0]]
    pairs = {(r, s) for _, records, starts, _ in held_out for r, s in zip(records, starts)}
    records = {r for r, _ in pairs}
    assert len(records) == 6  # 3 of 12 subjects, two records each
    assert pairs == {(r, s) for r in records for s in (0, 16, 32, 48)}
    assert _windowed_run(tmp_path, "b", window) == seen  # same seed, same crops


@pytest.mark.parametrize("name", [n for n, spec in MODELS.items() if spec.pretrained])
def test_every_pre_trainable_model_trains_and_validates_on_windows(name):
    """Each registry model built for a window takes a random crop (training) and every window (validation)."""
    window, length = 32, 96
    options = {"preset": "small"} if "preset" in MODELS[name].options else {}
    torch.manual_seed(0)
    model = build_model(name, LEADS, window, 4, **options)
    objective = build_objective(MODELS[name].objective)
    module = PretrainModule(model, objective, leads=LEADS, window=window)
    batch = {"signals": torch.randn(5, 3, length), "mask": torch.ones(5, 3, dtype=torch.bool)}
    train = module.crop_batch(batch, train=True)
    assert train["signals"].shape == (5, 3, window)
    assert torch.isfinite(module.compute_losses(train, sample=True)["loss"])
    val = module.crop_batch(batch, train=False)
    assert val["signals"].shape == (3 * 5, 3, window) and val["mask"].shape == (15, 3)
    assert torch.isfinite(module.compute_losses(val, sample=False)["loss"])


def test_window_zero_or_the_record_length_leaves_batches_as_they_are():
    module = PretrainModule(_model(), _objective(), window=0)
    batch = {"signals": torch.randn(2, 3, T), "mask": torch.ones(2, 3, dtype=torch.bool)}
    assert module.crop_batch(batch, train=True) is batch
    assert PretrainModule(_model(), _objective(), window=T).crop_batch(batch, train=False) is batch


def _cache_dataset(path, n=22):
    """An ECGLeadDataset over a small 12-lead cache (the stream needs one)."""
    rng = np.random.default_rng(0)
    signals = (rng.standard_normal((n, 1, T)).cumsum(-1) / 8 + 0.1 * rng.standard_normal((n, 12, T))).astype("float32")
    path.mkdir(parents=True)
    np.save(path / "signals.npy", signals)
    index = pd.DataFrame({"record_id": [f"r{i}" for i in range(n)], "subject_id": [f"s{i // 2}" for i in range(n)]})
    for name in CANONICAL_LEADS:
        index[f"present_{name}"] = 1
    index.to_csv(path / "index.csv", index=False)
    meta = {"fingerprint": "test", "lead_names": list(CANONICAL_LEADS), "dtype": "float32"}
    (path / "spec.json").write_text(json.dumps(meta))
    return ECGLeadDataset(path, leads=CANONICAL_LEADS)


class _StepLog(pl.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append((trainer.current_epoch, int(trainer.global_step), round(module.current_beta(), 9)))


def test_both_loaders_give_the_same_optimiser_steps_and_beta_warm_up(tmp_path):
    """The stream keeps the short last batch as the DataLoader does: 20 training records, batch 8 -> 3 steps."""
    data = _cache_dataset(tmp_path / "cache")
    logs = {}
    for loader in ("stream", "dataloader"):
        torch.manual_seed(0)
        model = build_model("lsemvae", CANONICAL_LEADS, T, 4)
        logs[loader] = _StepLog()
        settings = _settings(epochs=2, loader=loader, val_fraction=0.1, resume=False)
        run_pretraining(model, _objective(), data, tmp_path / loader, settings, callbacks=[logs[loader]])
    assert logs["stream"].steps == logs["dataloader"].steps
    assert [s for e, s, _ in logs["stream"].steps if e == 0] == [0, 1, 2]
    assert len({b for *_, b in logs["stream"].steps}) == 6  # beta rises every step over the 2-epoch warm-up


def test_held_out_and_training_reconstruction_r_are_logged_every_epoch(tmp_path, caplog):
    data = _cache_dataset(tmp_path / "cache")
    torch.manual_seed(0)
    model = build_model("lsemvae", CANONICAL_LEADS, T, 4)
    with caplog.at_level("INFO", logger="kale_ext.pipeline.pretrain"):
        run_pretraining(model, _objective(), data, tmp_path / "run", _settings(epochs=3, val_fraction=0.2))
    lines = [r.getMessage() for r in caplog.records if "recon r train" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("| held-out " in line and "| 6->12 r held-out " in line for line in lines)
    metrics = pd.read_csv(next((tmp_path / "run" / "logs").rglob("metrics.csv")))
    for key in ("val/recon_r", "train/recon_r", "val/gen_r_6to12"):
        values = metrics[key].dropna()
        assert len(values) == 3 and values.between(-1, 1).all(), key


def test_lead_pearson_r_scores_present_leads_only():
    target = torch.randn(2, 3, 50)
    recon = torch.stack([target[:, 0], -target[:, 1], torch.zeros(2, 50)], dim=1) * 3 + 1
    mask = torch.tensor([[True, True, True], [True, False, True]])
    r, valid = lead_pearson_r(recon, target, mask)
    assert torch.allclose(r[:, 0], torch.ones(2), atol=1e-5) and torch.allclose(r[0, 1], torch.tensor(-1.0), atol=1e-5)
    assert valid.tolist() == [[True, True, False], [True, False, False]]  # a flat reconstruction has no r


class _Scramble(pl.Callback):
    """Moves every weight at the start of each epoch after the first, and keeps each epoch's weights."""

    def __init__(self):
        self.weights = {}

    def on_train_epoch_start(self, trainer, module):
        epoch = trainer.current_epoch
        if epoch > 0:
            g = torch.Generator().manual_seed(epoch)
            with torch.no_grad():
                for p in module.model.parameters():
                    p.add_(0.5 * torch.randn(p.shape, generator=g))
        self.weights[epoch] = {k: v.clone() for k, v in module.model.state_dict().items()}


def test_early_stopping_saves_the_best_held_out_epoch(tmp_path):
    """The saved model is the epoch with the best held-out r, not the last epoch run (lr ~ 0: weights move only by
    the callback, so each epoch's weights are known)."""
    scramble = _Scramble()
    settings = _settings(epochs=10, early_stop_patience=1, lr=1e-30)
    run_pretraining(_model(), _objective(), _TinyLeads(), tmp_path, settings, callbacks=[scramble])
    metrics = pd.read_csv(next((tmp_path / "logs").rglob("metrics.csv")))
    r = metrics.dropna(subset=["val/recon_r"]).groupby("epoch")["val/recon_r"].first()
    best, last = int(r.idxmax()), int(r.index.max())
    assert last < 9 and best < last  # it stopped early, after an epoch that did not improve
    assert torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == best
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.allclose(saved[k].float(), v.float(), atol=1e-20) for k, v in scramble.weights[best].items())
    assert not all(torch.allclose(saved[k].float(), v.float(), atol=1e-6) for k, v in scramble.weights[last].items())


def test_early_stopping_stops_when_held_out_reconstruction_stops_improving(tmp_path):
    """lr 0: the held-out r never improves, so patience 1 stops after the second of ten epochs."""
    model = _model()
    settings = _settings(epochs=10, early_stop_patience=1, lr=1e-30)
    run_pretraining(model, _objective(), _TinyLeads(), tmp_path, settings)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1  # epochs 0 and 1 ran
    assert is_pretrained(tmp_path)
    with pytest.raises(ValueError, match="VAL_FRACTION"):
        run_pretraining(
            _model(), _objective(), _TinyLeads(), tmp_path / "b", _settings(early_stop_patience=1, val_fraction=0)
        )


class _RecordingELBO(ELBOObjective):
    """The ELBO objective that records what each call saw: input, target, sampling, train/eval mode."""

    def __init__(self):
        super().__init__(beta=1.0, beta_warmup_epochs=0, gamma=0.1)
        self.calls = []
        self.rng_states = []

    def forward(self, model, batch, progress):
        self.calls.append((batch.signals.clone(), batch.target.clone(), batch.sample, model.training))
        self.rng_states.append(torch.random.get_rng_state())
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


def test_validation_draws_are_repeatable_from_epoch_to_epoch(tmp_path):
    objective = _RecordingELBO()
    run_pretraining(_model(), objective, _TinyLeads(), tmp_path, _settings(epochs=2))
    val = [state for call, state in zip(objective.calls, objective.rng_states) if not call[3]]
    train = [state for call, state in zip(objective.calls, objective.rng_states) if call[3]]
    per_epoch = len(val) // 2  # one validation per epoch
    assert per_epoch >= 1 and len(val) == 2 * per_epoch, len(val)
    for batch in range(per_epoch):  # the same batch is validated with the same noise at every epoch
        assert torch.equal(val[batch], val[per_epoch + batch])
    assert not any(torch.equal(t, v) for t in train for v in val)  # training never draws from a validation seed
