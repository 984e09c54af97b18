"""Does the gate weigh lead quality? A corrupted lead's gate weight against its clean weight on held-out records.

Two LS-EMVAE models are pre-trained label-free on the same training records, one without and one with the corruption
augmentation (``kale_ext.prepdata.corruption``, ``PRETRAIN.CORRUPT_PROB`` in the example). On held-out records
(split by subject), one lead per record is corrupted (each kind in turn: noise burst, flat line, baseline wander,
inversion; the lead drawn with a fixed seed) and the gate weights are read in eval mode, z at the mean:

- ``share_below_third``: share of held-out records whose corrupted lead's weight falls below a third of its clean
  weight (the issue's target: >= 0.8 with the augmentation);
- ``median_ratio``: median of corrupted / clean weight of that lead;
- ``poe_clean`` / ``poe_corrupted``: mean weight of the shared PoE expert;
- a figure (``lead_quality.png``, when matplotlib is installed): mean weight per lead, clean vs one lead corrupted;
- ``six_lead``: how far the fused mean from the 6 limb leads is from the 12-lead one (share of the between-record
  variance, centred cosine), for every arm, including a third one pre-trained with lead dropout and no corruption
  (``--lead-dropout``, 0 = no third arm).

Data: LUDB (+ CinC-2021, label-free) under ``../shared/data/ecg`` at a CPU preset (100 Hz x 10 s); ``--small`` uses
smooth synthetic 12-lead signals instead (a test run, seconds). Windowed pre-training (issue 17) is not used here.

Run: ``python benchmarks/lead_quality.py [--out outputs/lead_quality] [--epochs 8] [--corrupt-prob 0.5] [--small]``.
Writes ``results.json`` and prints a Markdown table. Exit code 2 when the data folder is absent (without --small).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kale_ext.embed.zoo import build_model
from kale_ext.loaddata.leads import CANONICAL_LEADS
from kale_ext.pipeline.pretrain import PretrainSettings, run_pretraining, split_by_subject
from kale_ext.predict.objectives import build_objective
from kale_ext.prepdata.corruption import CORRUPTION_KINDS, LeadCorruption, corrupt_leads

logger = logging.getLogger("lead_quality")


class _Signals(Dataset):
    """Items ``signals`` (12, T), ``mask`` (12,) from arrays, with subject ids."""

    def __init__(self, x: np.ndarray, mask: np.ndarray, subjects: np.ndarray):
        self.x, self.m, self.subject_ids = torch.as_tensor(x).float(), torch.as_tensor(mask).bool(), subjects
        self.leads = CANONICAL_LEADS

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"signals": self.x[i], "mask": self.m[i]}


def synthetic(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth 12-lead signals: 3 shared sources mixed per lead plus lead noise, z-scored per lead."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, length)
    sources = np.stack([np.sin(2 * np.pi * (rng.uniform(2, 6, (n, 1)) * t + rng.uniform(0, 1, (n, 1)))) for _ in "abc"])
    mix = rng.normal(size=(12, 3))
    x = np.einsum("lk,knt->nlt", mix, sources) + 0.2 * rng.normal(size=(n, 12, length))
    x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    return x.astype(np.float32), np.ones((n, 12), dtype=bool)


def real(data: Path, out: Path, fs: float) -> tuple[np.ndarray, np.ndarray]:
    """LUDB (+ CinC-2021 beside it) cached at ``fs`` Hz x 10 s, 12 leads, z-scored per lead by the library."""
    from kale_ext.loaddata.ecg_dataset import ECGLeadDataset  # noqa: PLC0415 - only for real data
    from kale_ext.loaddata.wfdb_sources import list_records  # noqa: PLC0415
    from kale_ext.prepdata.ecg_cache import prepare_ecg_cache  # noqa: PLC0415
    from kale_ext.prepdata.ecg_transforms import PreprocessSpec  # noqa: PLC0415

    refs = list_records(data / "data" if (data / "data").is_dir() else data, "header_tree")
    cinc = data.parent / "cinc2021"
    if cinc.is_dir():
        refs = refs + list_records(cinc, "header_tree")
    length = int(round(10 * fs))
    cache = out / f"cache_{int(fs)}hz_{length}"
    prepare_ecg_cache(refs, cache, spec=PreprocessSpec(target_fs=fs, target_length=length), leads="12L",
                      num_workers=1, progress=False)  # fmt: skip
    ds = ECGLeadDataset(cache, "12L")
    batch = ds.get_batch(np.arange(len(ds)))
    return batch["signals"].numpy(), batch["mask"].numpy().astype(bool)


def pretrain(
    train: _Signals, length: int, latent: int, epochs: int, corrupt: float, out: Path, seed: int, dropout: float = 0.0
):
    """LS-EMVAE pre-trained with the library's ELBO defaults, with or without corruption augmentation, lead dropout."""
    torch.manual_seed(seed)
    model = build_model("lsemvae", CANONICAL_LEADS, length, latent, lead_dropout=dropout)
    settings = PretrainSettings(epochs=epochs, batch_size=32, lr=1e-3, val_fraction=0.0, seed=seed, accelerator="cpu",
                                progress_bar=False, resume=False, log_every_n_steps=1)  # fmt: skip
    augment = LeadCorruption(corrupt, generator=None) if corrupt > 0 else None
    objective = build_objective("elbo", beta_warmup_epochs=max(epochs / 2, 0.5))
    run_pretraining(model, objective, train, out, settings, build_args={}, augment=augment)
    return model.eval()


@torch.no_grad()
def gate_response(model, x: torch.Tensor, mask: torch.Tensor, seed: int) -> dict:
    """Per kind: the corrupted lead's weight, clean and corrupted, for every held-out record, and the mean weights."""
    clean = model(x, mask=mask, sample=False).fusion.weights  # (13, B): 12 leads + the PoE expert
    result = {}
    for k, kind in enumerate(CORRUPTION_KINDS):
        bad = corrupt_leads(x, mask, prob=1.0, kinds=[kind], generator=torch.Generator().manual_seed(seed + k))
        weights = model(bad.signals, mask=mask, sample=False).fusion.weights
        lead = bad.corrupted.float().argmax(1)  # (B,)
        rows = torch.arange(len(lead))
        w_clean, w_bad = clean[lead, rows], weights[lead, rows]
        ratio = w_bad / w_clean.clamp_min(1e-12)
        result[kind] = {
            "share_below_third": float((ratio < 1 / 3).float().mean()),
            "median_ratio": float(ratio.median()),
            "weight_clean": float(w_clean.mean()),
            "weight_corrupted": float(w_bad.mean()),
            "poe_clean": float(clean[-1].mean()),
            "poe_corrupted": float(weights[-1].mean()),
        }
    only_ii = torch.zeros_like(mask)
    only_ii[:, 1] = mask[:, 1]  # lead II noisy in every record, for the figure
    noisy = corrupt_leads(x, only_ii, prob=1.0, kinds=["noise"], generator=torch.Generator().manual_seed(seed)).signals
    result["six_lead"] = six_lead_shift(model, x, mask)
    result["_figure"] = {
        "clean": clean.mean(1).tolist(),
        "lead II noisy": model(noisy, mask=mask, sample=False).fusion.weights.mean(1).tolist(),
    }
    return result


@torch.no_grad()
def six_lead_shift(model, x: torch.Tensor, mask: torch.Tensor) -> dict:
    """How far the fused mean from the 6 limb leads is from the 12-lead one, on the same records.

    ``shift``: mean squared distance over the total variance of the 12-lead means across records (0 = the same
    posterior mean); ``centred_cosine``: mean cosine of the two means after removing each one's mean over records.
    """
    limb = torch.zeros_like(mask)
    limb[:, :6] = mask[:, :6]  # I, II, III, aVR, aVL, aVF come first in CANONICAL_LEADS
    mu12 = model(x, mask=mask, sample=False).fusion.mean
    mu6 = model(x, mask=limb, sample=False).fusion.mean
    variance = (mu12 - mu12.mean(0)).square().sum(1).mean().clamp_min(1e-12)
    shift = (mu6 - mu12).square().sum(1).mean() / variance
    a, b = mu12 - mu12.mean(0), mu6 - mu6.mean(0)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1).mean()
    return {"shift": float(shift), "centred_cosine": float(cosine)}


def figure(results: dict, path: Path) -> bool:
    """Bar chart of the mean weight per expert, clean vs lead II noisy, for each arm; False without matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    names = [*CANONICAL_LEADS, "PoE"]
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3), sharey=True, squeeze=False)
    for ax, (arm, res) in zip(axes[0], results.items()):
        pos = np.arange(len(names))
        for shift, (label, values) in zip((-0.2, 0.2), res["_figure"].items()):
            ax.bar(pos + shift, values, width=0.4, label=label)
        ax.set_xticks(pos, names, rotation=90)
        ax.set_title(f"pre-trained {arm}")
        ax.set_ylabel("mean gate weight")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="LUDB folder (default ../shared/data/ecg/ludb)")
    p.add_argument("--out", type=Path, default=Path("outputs/lead_quality"))
    p.add_argument("--fs", type=float, default=100.0, help="sampling rate of the 10 s records")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--corrupt-prob", type=float, default=0.5, help="augmentation probability of the second arm")
    p.add_argument("--lead-dropout", type=float, default=0.5, help="lead dropout of a third arm (0 = no third arm)")
    p.add_argument("--held-out", type=float, default=0.3, help="share of subjects held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="synthetic records, 1 epoch (a test run)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Run the measurement; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "kale_ext"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.small:
        length, latent, epochs = 128, 8, 1
        x, mask = synthetic(48, length, args.seed)
        source = "synthetic (3 shared sources mixed per lead + noise), 48 records"
    else:
        data = args.data or Path(__file__).resolve().parents[2] / "shared" / "data" / "ecg" / "ludb"
        if not any(data.glob("**/*.hea")):
            print(f"no WFDB records under {data}; point --data to the LUDB folder or use --small", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        x, mask = real(data, args.out, args.fs)
        length, latent, epochs = x.shape[-1], args.latent, args.epochs
        source = f"real: {len(x)} records (LUDB + CinC-2021 beside it), {args.fs:g} Hz x 10 s"
    args.out.mkdir(parents=True, exist_ok=True)
    subjects = np.arange(len(x)).astype(str)
    train_idx, test_idx = split_by_subject(subjects, args.held_out, args.seed)
    train = _Signals(x[train_idx], mask[train_idx], subjects[train_idx])
    xt, mt = torch.as_tensor(x[test_idx]).float(), torch.as_tensor(mask[test_idx]).bool()
    results = {}
    arms = [("without corruption", 0.0, 0.0), (f"with corruption p={args.corrupt_prob:g}", args.corrupt_prob, 0.0)]
    if args.lead_dropout > 0:
        arms.append((f"lead dropout {args.lead_dropout:g}, no corruption", 0.0, args.lead_dropout))
    for arm, prob, dropout in arms:
        out = args.out / f"model_p{prob:g}_d{dropout:g}"
        model = pretrain(train, length, latent, epochs, prob, out, args.seed, dropout)
        results[arm] = gate_response(model, xt, mt, args.seed + 100)
    drew = figure(results, args.out / "lead_quality.png")
    summary = {"source": source, "held_out_records": len(test_idx), "epochs": epochs, "results": results,
               "figure": "lead_quality.png" if drew else None}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"{source}; {len(test_idx)} held-out records; {epochs} epochs")
    header = ["arm", "kind", "share < 1/3 of clean", "median ratio", "weight clean", "weight corrupted", "PoE clean"]
    print("| " + " | ".join(header + ["PoE corrupted"]) + " |")
    print("|" + " --- |" * (len(header) + 1))
    for arm, res in results.items():
        for kind in CORRUPTION_KINDS:
            r = res[kind]
            cells = [arm, kind, f"{r['share_below_third']:.2f}", f"{r['median_ratio']:.2f}", f"{r['weight_clean']:.3f}",
                     f"{r['weight_corrupted']:.3f}", f"{r['poe_clean']:.3f}", f"{r['poe_corrupted']:.3f}"]  # fmt: skip
            print("| " + " | ".join(cells) + " |")
    print("\n| arm | 6-lead vs 12-lead fused mean: shift (share of variance) | centred cosine |\n| --- | --- | --- |")
    for arm, res in results.items():
        print(f"| {arm} | {res['six_lead']['shift']:.3f} | {res['six_lead']['centred_cosine']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
