"""What training leaves on disk, and how it is read back: pre-trained models and fold classifiers.

Everything is a plain state dict read with ``torch.load(weights_only=True)`` plus a JSON record that rebuilds the
module through the model registry (:mod:`kale_ext.embed.zoo`); no pickled objects and no Lightning checkpoint are
needed to use a trained model.

- Pre-training folder: ``model.pt``, ``model_args.json`` (``{"name", "lead_names", "input_dim", "latent_dim", ...}``)
  and a ``DONE`` marker, written last.
- Fine-tuning folder: ``classifier.json`` (what the fold classifiers are) and ``fold<k>/model.pt`` +
  ``fold<k>/metrics.json`` per fold.

Every ``model.pt`` is written to a temporary file and renamed (a full disk or a kill leaves no half file under the
final name) and gets a ``model.pt.sha256`` beside it; loading checks it, and :func:`damaged_models` lists the models
of a folder that no longer match, so a stage does not trust a ``DONE`` marker over a damaged model.

A model pre-trained on windows (``PRETRAIN.WINDOW``) is built with ``input_dim`` = the window, and
``classifier.json`` records ``window`` and ``window_pooling``: the fold classifiers take whole records and pool the
features of every window of them (``LatentFeatureExtractor``). Records without these keys are whole-record models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from kale_ext.embed.zoo import build_from_args, model_spec
from kale_ext.pipeline.finetune import MaskedInputClassifier
from kale_ext.predict.heads import ClassificationHead, FeatureClassifier, LatentFeatureExtractor
from kale_ext.utils.files import atomic_write, atomic_write_text, checksum_problem, free_bytes, write_checksum

MODEL_FILE = "model.pt"
MODEL_ARGS_FILE = "model_args.json"
DONE_FILE = "DONE"
CLASSIFIER_FILE = "classifier.json"


def save_model(
    model: nn.Module, out_dir: str | Path, build_args: dict | None = None, extra_files: dict[str, str] | None = None
) -> Path:
    """Write ``model.pt`` (plain state dict on CPU), ``model_args.json``, extra files and a ``DONE`` marker.

    Args:
        model: the trained model.
        out_dir: destination folder.
        build_args: JSON-serialisable arguments of :func:`kale_ext.embed.zoo.build_from_args`.
        extra_files: further text files (name -> content) written before the marker.

    Returns:
        Path of ``model.pt``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_state(model, out_dir / MODEL_FILE)
    atomic_write_text(out_dir / MODEL_ARGS_FILE, json.dumps(build_args or {}, indent=2))
    for name, text in (extra_files or {}).items():
        atomic_write_text(out_dir / name, text)
    atomic_write_text(out_dir / DONE_FILE, "pre-training finished\n")
    return out_dir / MODEL_FILE


def save_state(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s state dict (on CPU) to ``path`` atomically, then its checksum beside it."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp), fsync=True)
    except Exception as err:  # a full disk surfaces from torch's zip writer as "unexpected pos ..."
        free = free_bytes(Path(path).parent)
        raise OSError(
            f"could not write {path} ({type(err).__name__}: {str(err).strip()[:120]}); {free:,} bytes are "
            "free on its file system: free some space and rerun (nothing was left under that name)"
        ) from err
    write_checksum(path)
    return Path(path)


def load_state(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """Read a state dict written by :func:`save_state`, refusing a file that fails its checksum or does not load.

    Raises:
        ValueError: one line naming the file and saying which stage to rerun.
    """
    path = Path(path)
    rerun = "the fine-tuning" if path.parent.name.startswith("fold") else "the pre-training"
    problem = checksum_problem(path)
    if problem:
        raise ValueError(f"{problem}; delete {path.parent} and rerun {rerun}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated zip archive, a pickle error: all mean "damaged"
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {str(err).strip()[:120]}); delete "
                         f"{path.parent} and rerun {rerun}") from err  # fmt: skip


def damaged_models(folder: str | Path) -> list[str]:
    """Reasons, one per ``model.pt`` under ``folder`` (any depth) that fails the checksum recorded beside it."""
    return [p for p in (checksum_problem(m) for m in sorted(Path(folder).rglob(MODEL_FILE))) if p]


def is_pretrained(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a finished pre-training (model, build arguments, DONE marker)."""
    out_dir = Path(out_dir)
    return all((out_dir / name).exists() for name in (MODEL_FILE, MODEL_ARGS_FILE, DONE_FILE))


def read_model_args(out_dir: str | Path) -> dict:
    """The registry record (``model_args.json``) of a finished pre-training in ``out_dir``."""
    return json.loads((Path(out_dir) / MODEL_ARGS_FILE).read_text(encoding="utf-8"))


def load_model(
    out_dir: str | Path,
    build: Callable[..., nn.Module] = build_from_args,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a pre-trained model from ``model_args.json`` with ``build(**args)`` and load ``model.pt``.

    Args:
        out_dir: a finished pre-training folder.
        build: builder taking the JSON record (default: the registry's ``build_from_args``).
        device: where the model goes.

    Returns:
        The model in eval mode.
    """
    out_dir = Path(out_dir)
    if not is_pretrained(out_dir):
        raise FileNotFoundError(f"no finished pre-training in {out_dir}; run the pre-training stage first")
    model = build(**read_model_args(out_dir))
    state = load_state(out_dir / MODEL_FILE, device)
    model.load_state_dict(state)
    return model.to(device).eval()


def classifier_info(
    build_args: dict,
    leads: Sequence[str],
    hidden_dim: int,
    dropout: float,
    features: str | None = None,
    in_features: int | None = None,
    pretrain_dir: str | Path | None = None,
    window: int = 0,
    window_pooling: str = "mean",
) -> dict:
    """The JSON record of a run's fold classifiers.

    Args:
        build_args: registry record of the network (the pre-trained model, or the end-to-end network).
        leads: input channels of the classifiers, in order.
        hidden_dim: hidden units of the head.
        dropout: dropout of the head.
        features: feature mode of a latent model (None for a network that is a classifier itself).
        in_features: width of the features a head on frozen features takes.
        pretrain_dir: folder of the frozen pre-trained model (heads on frozen features).
        window: samples per window of a model pre-trained on windows (0 = whole records).
        window_pooling: how the windows' features of a record are pooled (``"mean"`` or ``"poe"``).

    Returns:
        dict with ``kind`` ``"head"`` (a head on frozen features) or ``"end_to_end"``.
    """
    spec = model_spec(build_args["name"])
    info = {
        "kind": "end_to_end" if spec.end_to_end else "head",
        "model": build_args["name"],
        "leads": list(leads),
        "build_args": build_args,
        "hidden_dim": int(hidden_dim),
        "dropout": float(dropout),
        "features": features,
    }
    if not spec.end_to_end:
        info.update(in_features=int(in_features), pretrain_dir=str(pretrain_dir))
    if int(window) > 0:
        info.update(window=int(window), window_pooling=str(window_pooling))
    return info


def feature_width(features: str, num_leads: int, latent_dim: int) -> int:
    """Width of the features of a latent model: ``num_leads * D`` for lead means, ``D`` for the fused mean."""
    return num_leads * latent_dim if features == "concat_means" else latent_dim


def end_to_end_factory(info: dict) -> Callable[[], nn.Module]:
    """Builder of a fresh end-to-end classifier ``forward(x (B, L, T), mask (B, L)) -> logits`` from its record."""
    spec = model_spec(info["model"])
    leads = tuple(info["leads"])

    def make() -> nn.Module:
        net = build_from_args(**info["build_args"])
        if not spec.features:  # the network is a classifier
            return MaskedInputClassifier(net)
        extractor = LatentFeatureExtractor(net, leads, info["features"])
        width = feature_width(info["features"], len(leads), int(info["build_args"]["latent_dim"]))
        head = ClassificationHead(width, 2, info["hidden_dim"], info["dropout"])
        return FeatureClassifier(extractor, head, freeze_extractor=False)

    return make


def head_factory(info: dict) -> Callable[[], nn.Module]:
    """Builder of a fresh head on frozen features from its record."""
    return lambda: ClassificationHead(info["in_features"], 2, info["hidden_dim"], info["dropout"])


def save_fold_classifier(out_dir: str | Path, fold: int, model: nn.Module, metrics: dict) -> Path:
    """Write ``fold<k>/model.pt`` (state dict) and ``fold<k>/metrics.json``; returns the fold folder."""
    folder = Path(out_dir) / f"fold{int(fold)}"
    folder.mkdir(parents=True, exist_ok=True)
    save_state(model, folder / MODEL_FILE)
    atomic_write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
    return folder


def write_classifier_info(out_dir: str | Path, info: dict) -> Path:
    """Write ``classifier.json`` into the fine-tuning folder."""
    return atomic_write_text(Path(out_dir) / CLASSIFIER_FILE, json.dumps(info, indent=2))


def load_fold_classifier(out_dir: str | Path, fold: int, device: str = "cpu") -> nn.Module:
    """The classifier of fold ``fold``: ``forward(x (B, L, T), mask (B, L) | None) -> logits (B, 2)``, eval mode.

    A head on frozen features comes back wrapped with its frozen pre-trained model (``FeatureClassifier``), so both
    kinds take signals of the record's ``leads`` in that order.

    Args:
        out_dir: the fine-tuning folder (``classifier.json``, ``fold<k>/model.pt``).
        fold: fold index.
        device: where the model goes.

    Returns:
        nn.Module.
    """
    out_dir = Path(out_dir)
    path = out_dir / f"fold{int(fold)}" / MODEL_FILE
    info_path = out_dir / CLASSIFIER_FILE
    if not path.exists() or not info_path.exists():
        raise FileNotFoundError(f"{path} or {info_path} not found; run the fine-tuning stage first")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    state = load_state(path, device)
    if info["kind"] == "head":
        head = head_factory(info)()
        head.load_state_dict(state)
        vae = load_model(info["pretrain_dir"], device=device)
        extractor = LatentFeatureExtractor(
            vae, info["leads"], info["features"], window=int(info.get("window", 0)),
            pooling=info.get("window_pooling", "mean"),
        )  # fmt: skip
        model = FeatureClassifier(extractor, head)
    else:
        model = end_to_end_factory(info)()
        model.load_state_dict(state)
    return model.to(device).eval()
