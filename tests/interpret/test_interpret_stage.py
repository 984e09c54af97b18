"""The example's interpret stage: files, one row per lead in use, shares summing to 1, figures.

The run's artefacts (labelled records, folds, fold classifiers, pre-trained model) are provided in memory through
the stage's own ``artifacts`` functions, so the stage logic runs for real without a full pre-training; the real
demo output is exercised by the example's end-to-end run.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lsemvae_ph"
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF")
ALL_LEADS = LEADS + ("V1", "V2", "V3", "V4", "V5", "V6")
FS, T = 100, 200


class _Records:
    """A labelled dataset with the ECGLeadDataset surface the stage uses."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        t = np.arange(T) / FS
        beat = sum(np.exp(-0.5 * ((t - r) / 0.012) ** 2) for r in np.arange(0.3, 2.0, 0.75))
        self.signals = (beat[None, None] + 0.05 * rng.normal(size=(n, len(LEADS), T))).astype(np.float32)
        self.masks = np.ones((n, len(LEADS)), dtype=bool)
        self.masks[0, 4] = False  # one record without aVL
        self.labels = np.tile([0, 1], n // 2)
        self.record_ids = np.array([f"r{i}" for i in range(n)])
        self.subject_ids = np.array([f"s{i}" for i in range(n)])
        self.leads = LEADS

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"signals": torch.from_numpy(self.signals[i]), "mask": torch.from_numpy(self.masks[i])}


@pytest.fixture()
def stage(monkeypatch):
    """The interpret stage module with the run's artefacts served from memory."""
    pytest.importorskip("kale_ext.embed.lsemvae")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for name in ("artifacts", "interpret_stage", "config"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import artifacts
    import config
    import interpret_stage

    from kale_ext.embed.zoo import build_model
    from kale_ext.predict.heads import ClassificationHead, FeatureClassifier, LatentFeatureExtractor

    torch.manual_seed(0)
    records = _Records(24)
    vae = build_model("lsemvae", ALL_LEADS, input_dim=T, latent_dim=4).eval()
    folds = pd.DataFrame(
        {
            "record_id": records.record_ids,
            "subject_id": records.subject_ids,
            "label": records.labels,
            "fold": (np.arange(24) // 2) % 2,
            "threshold": 0.5,
        }
    )

    def classifier(cfg, fold, device="cpu"):
        torch.manual_seed(fold)
        head = ClassificationHead(len(LEADS) * 4, 2, 8, 0.0)
        return FeatureClassifier(LatentFeatureExtractor(vae, LEADS), head).eval()

    monkeypatch.setattr(artifacts, "finetune_dataset", lambda cfg: records)
    monkeypatch.setattr(artifacts, "load_folds", lambda cfg: folds)
    monkeypatch.setattr(artifacts, "load_pretrained_model", lambda cfg, device="cpu": vae)
    monkeypatch.setattr(artifacts, "load_fold_classifier", classifier)
    monkeypatch.setattr(artifacts, "is_synthetic", lambda cfg: True)
    return interpret_stage, config


def test_stage_writes_every_table_and_figure(stage, tmp_path):
    """CSV per question with one row per lead in use, shares summing to 1, gate rows incl. the shared expert, PNGs."""
    interpret_stage, config = stage
    cfg = config.get_cfg_defaults()
    cfg.merge_from_list(
        ["OUTPUT.DIR", str(tmp_path), "DATASET.FS", FS, "INTERPRET.N_STEPS", 4, "INTERPRET.SUBJECTS", 1]
    )
    cfg.TRAINER.PROGRESS_BAR = False
    out = interpret_stage.run_interpret(cfg)
    assert out == tmp_path / "interpret"

    importance = pd.read_csv(out / "lead_importance.csv")
    assert list(importance["lead"]) == list(LEADS)
    assert importance["share_mean"].sum() == pytest.approx(1.0)
    for cls in (0, 1):
        assert importance[f"share_mean_class_{cls}"].sum() == pytest.approx(1.0)

    gates = pd.read_csv(out / "gate_weights.csv")
    assert list(gates["expert"]) == [*LEADS, "shared (PoE)"]
    assert gates["weight_mean"].sum() == pytest.approx(1.0, abs=1e-6)
    assert (gates["gate"] == "learned").all()

    ablation = pd.read_csv(out / "lead_ablation.csv")
    assert sorted(ablation["lead"]) == sorted(LEADS)
    assert np.allclose(ablation["drop_mean"], ablation["auroc_full_mean"] - ablation["auroc_ablated_mean"])
    by_fold = pd.read_csv(out / "lead_ablation_by_fold.csv")
    assert set(by_fold["fold"]) == {0, 1}

    waves = pd.read_csv(out / "wave_attribution.csv")
    assert list(waves["lead"]) == list(LEADS)
    shares = waves[["share_P", "share_QRS", "share_T", "share_other"]].sum(axis=1)
    np.testing.assert_allclose(shares, 1.0, atol=1e-9)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["synthetic"] is True
    assert summary["records_interpreted"] == 24
    for name in summary["figures"]:
        assert (out / name).stat().st_size > 10_000, name
    subject_figures = [n for n in summary["figures"] if n.startswith("subject_")]
    assert len(subject_figures) == 2  # one per class


def test_supervised_model_has_no_gate_weights(stage, tmp_path, monkeypatch):
    """Without a pre-trained VAE (a supervised baseline) the stage still interprets and writes an empty gate table."""
    interpret_stage, config = stage
    import artifacts

    class Supervised(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(len(LEADS), 2)

        def forward(self, x, mask=None):
            energy = x.pow(2).mean(dim=-1)
            if mask is not None:
                energy = energy * mask
            return self.linear(energy)

    monkeypatch.setattr(artifacts, "load_pretrained_model", lambda cfg, device="cpu": None)
    monkeypatch.setattr(artifacts, "load_fold_classifier", lambda cfg, fold, device="cpu": Supervised().eval())
    cfg = config.get_cfg_defaults()
    cfg.merge_from_list(["OUTPUT.DIR", str(tmp_path), "DATASET.FS", FS, "INTERPRET.N_STEPS", 4])
    cfg.TRAINER.PROGRESS_BAR = False
    out = interpret_stage.run_interpret(cfg)
    assert pd.read_csv(out / "gate_weights.csv").empty
    assert not (out / "gate_weights.png").exists()
    importance = pd.read_csv(out / "lead_importance.csv")
    assert list(importance["lead"]) == list(LEADS)
    assert importance["share_mean"].sum() == pytest.approx(1.0)
