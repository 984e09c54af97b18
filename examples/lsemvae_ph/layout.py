"""The run layout: every path, lead set, cache and label of a run, derived once from the configuration.

Stages receive a ``RunLayout`` and never re-derive a path from ``cfg``; what a model *is* (pre-trained or not, its
label, its features, its objective) comes from the model registry ``kale_ext.embed.zoo.MODELS``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from config import parse_leads
from yacs.config import CfgNode

from kale_ext.embed.zoo import MODELS, ModelSpec
from kale_ext.loaddata.leads import LEAD_SETS, resolve_leads
from kale_ext.prepdata.ecg_transforms import PreprocessSpec

SYNTHETIC_NOTE = (
    "SYNTHETIC DATA: these outputs come from the embedded synthetic ECG cohort (generated, not physiology-grade); "
    "they check the pipeline and are not clinical results."
)
TASK_NAMES = {"ph": "ph_detection", "phenotype": "ph_phenotype", "pawp": "elevated_pawp"}
# Config keys that become builder options, for the models whose registry entry accepts them.
_OPTION_KEYS = {
    "no_poe": "NO_POE",
    "no_moe": "NO_MOE",
    "no_gate": "NO_GATE",
    "use_prior": "USE_PRIOR",
    "conv_impl": "CONV_IMPL",
    "gate_noise": "GATE_NOISE",
    "gate_top_k": "GATE_TOP_K",
    "gate_context": "GATE_CONTEXT",
    "architecture": "RANDOM_ARCHITECTURE",
    "preset": "STMEM_PRESET",
    "patch_size": "STMEM_PATCH_SIZE",
}


def lead_tag(leads: tuple[str, ...]) -> str:
    """``6L`` / ``12L`` for the standard sets, else the lead names joined by ``-``."""
    for name, members in LEAD_SETS.items():
        if tuple(members) == tuple(leads):
            return name
    return "-".join(leads)


@dataclass(frozen=True)
class RunLayout:
    """Where a run reads and writes, and what it trains.

    Attributes:
        cfg: the validated, frozen configuration.
        spec: the registry entry of ``MODEL.NAME``.
        out: ``OUTPUT.DIR``.
        leads: leads used for fine-tuning and evaluation.
        pretrain_leads: leads of the pre-trained encoders.
        preprocess: the preprocessing of the labelled records (fine-tuning, scoring).
        pretrain_preprocess: the preprocessing of the pre-training records (bad leads masked by default).
        synthetic: True when the embedded synthetic cohort is used.
        synthetic_dir, cache_root, pretrain_dir, finetune_dir, predict_dir: folders.
        pretrain_cache, finetune_cache: cache folders (named by leads and preprocessing fingerprint).
        labels: the run's label table (id column + ``label``).
        folds: fold and threshold per record.
    """

    cfg: CfgNode
    spec: ModelSpec
    out: Path
    leads: tuple[str, ...]
    pretrain_leads: tuple[str, ...]
    preprocess: PreprocessSpec
    pretrain_preprocess: PreprocessSpec
    synthetic: bool
    synthetic_dir: Path
    cache_root: Path
    pretrain_dir: Path
    finetune_dir: Path
    predict_dir: Path
    pretrain_cache: Path
    finetune_cache: Path
    labels: Path
    folds: Path

    @classmethod
    def from_cfg(cls, cfg: CfgNode) -> RunLayout:
        """Derive the layout of a validated config."""
        out = Path(cfg.OUTPUT.DIR)
        leads = resolve_leads(parse_leads(cfg.DATASET.LEADS))
        pretrain_leads = resolve_leads(parse_leads(cfg.DATASET.PRETRAIN_LEADS))
        pre = cfg.DATASET.PREPROCESS
        spec = PreprocessSpec(
            target_fs=float(cfg.DATASET.FS),
            target_length=int(cfg.DATASET.INPUT_LENGTH),
            powerline_hz=float(pre.POWERLINE_HZ) or None,
            highpass_hz=float(pre.HIGHPASS_HZ) or None,
            derive_limb_leads=bool(pre.DERIVE_LIMB_LEADS),
            mask_bad_leads=bool(pre.MASK_BAD_LEADS),
            min_good_leads=int(pre.MIN_GOOD_LEADS),
            max_nan_fraction=float(pre.MAX_NAN_FRACTION),
            max_nan_gap_s=float(pre.MAX_NAN_GAP_S),
            max_saturated_fraction=float(pre.MAX_SATURATED_FRACTION),
            min_amplitude_mv=float(pre.MIN_AMPLITUDE_MV),
            max_amplitude_mv=float(pre.MAX_AMPLITUDE_MV),
        )
        cache_root = Path(cfg.DATASET.CACHE_DIR) if cfg.DATASET.CACHE_DIR else out / "cache"
        pre_spec = dataclasses.replace(spec, mask_bad_leads=bool(pre.PRETRAIN_MASK_BAD_LEADS) or spec.mask_bad_leads)
        fp = spec.fingerprint()
        return cls(
            cfg=cfg,
            spec=MODELS[cfg.MODEL.NAME],
            out=out,
            leads=leads,
            pretrain_leads=pretrain_leads,
            preprocess=spec,
            pretrain_preprocess=pre_spec,
            synthetic=not cfg.DATASET.FINETUNE_SOURCE,
            synthetic_dir=Path(cfg.DATASET.SYNTHETIC.DIR) if cfg.DATASET.SYNTHETIC.DIR else out / "data" / "synthetic",
            cache_root=cache_root,
            pretrain_dir=Path(cfg.PRETRAIN.DIR) if cfg.PRETRAIN.DIR else out / "pretrain",
            finetune_dir=out / "finetune",
            predict_dir=out / "predict",
            pretrain_cache=cache_root / f"pretrain_{lead_tag(pretrain_leads)}_{pre_spec.fingerprint()}",
            finetune_cache=cache_root / f"finetune_{lead_tag(leads)}_{fp}",
            labels=out / "labels.csv",
            folds=out / "folds.csv",
        )

    @property
    def task(self) -> str:
        """Name of the endpoint in every output: TASK.LABEL, a custom label column's name, or the task's name."""
        if self.cfg.TASK.LABEL:
            return self.cfg.TASK.LABEL
        if self.cfg.DATASET.LABEL_COLUMN:
            return self.cfg.DATASET.LABEL_COLUMN
        return TASK_NAMES[self.cfg.TASK.NAME]

    @property
    def features(self) -> str | None:
        """Fine-tuning feature mode: ``FINETUNE.FEATURES`` when the model offers it, else the model's default."""
        offered = self.spec.features
        if "architecture" in self.spec.options:  # a random encoder offers its architecture's features
            offered = MODELS[self.cfg.MODEL.RANDOM_ARCHITECTURE].features
        if not offered:
            return None
        return self.cfg.FINETUNE.FEATURES if self.cfg.FINETUNE.FEATURES in offered else offered[0]

    @property
    def window(self) -> int:
        """Samples per window of the run's latent model (``PRETRAIN.WINDOW``), 0 = whole records.

        Models trained end to end on labels take whole records; a window as long as the records is whole records.
        """
        window = int(self.cfg.PRETRAIN.WINDOW)
        if self.spec.end_to_end or window >= int(self.cfg.DATASET.INPUT_LENGTH):
            return 0
        return window

    @property
    def method_label(self) -> str:
        """Method name shown in results: ``OUTPUT.METHOD_LABEL``, or the registry label plus ablation flags."""
        cfg = self.cfg
        if cfg.OUTPUT.METHOD_LABEL:
            return cfg.OUTPUT.METHOD_LABEL
        ablations = (("no PoE", "no_poe"), ("no MoE", "no_moe"), ("no gate", "no_gate"))
        flags = [flag for flag, opt in ablations if opt in self.spec.options and cfg.MODEL[_OPTION_KEYS[opt]]]
        if cfg.PRETRAIN.GAMMA == 0 and self.spec.pretrained:
            flags.append("no alignment")
        label = self.spec.label
        if "architecture" in self.spec.options:
            label += f" ({MODELS[cfg.MODEL.RANDOM_ARCHITECTURE].label} architecture)"
        return label + (f" ({', '.join(flags)})" if flags else "")

    def build_args(self, leads: tuple[str, ...]) -> dict:
        """The registry record (``kale_ext.embed.zoo.build_from_args``) of the run's model over ``leads``."""
        cfg = self.cfg
        options = {opt: cfg.MODEL[key] for opt, key in _OPTION_KEYS.items() if opt in self.spec.options}
        if "widths" in self.spec.options and len(cfg.MODEL.BASELINE_WIDTHS):
            options["widths"] = [int(w) for w in cfg.MODEL.BASELINE_WIDTHS]
        # Only non-default values are recorded, so records of earlier runs rebuild the same model.
        defaults = {"no_poe": False, "no_moe": False, "no_gate": False, "use_prior": True, "conv_impl": "auto",
                    "patch_size": 0, "gate_noise": False, "gate_top_k": 0, "lead_dropout": 0.0,
                    "gate_context": "expert"}  # fmt: skip
        if "lead_dropout" in self.spec.options:  # a training setting that the model applies (training mode only)
            options["lead_dropout"] = float(cfg.PRETRAIN.LEAD_DROPOUT)
        options = {k: v for k, v in options.items() if defaults.get(k, object()) != v}
        return {
            "name": cfg.MODEL.NAME,
            "lead_names": list(leads),
            # A windowed model (PRETRAIN.WINDOW) is built for windows; ST-MEM's patch size follows its input length.
            "input_dim": self.window or int(cfg.DATASET.INPUT_LENGTH),
            "latent_dim": int(cfg.MODEL.LATENT_DIM),
            **options,
        }
