"""Tests of examples/lsemvae_ph/config.py and layout.py: YAML only, every range and enum checked before any work."""

import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lsemvae_ph"
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from config import load_cfg  # noqa: E402
from layout import RunLayout  # noqa: E402


def test_python_configs_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom yacs.config import CfgNode\ncfg = CfgNode()\n")
    with pytest.raises(ValueError, match="YAML"):
        load_cfg([str(evil)])
    assert not marker.exists()


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("FINETUNE.DROPOUT", "1.5", "0.0 <= value < 1.0"),
        ("FINETUNE.FOCAL_ALPHA", "2.0", "[0, 1]"),
        ("FINETUNE.FOCAL_ALPHA", "2", "wrong type"),
        ("MODEL.NOT_A_KEY", "1", "not a configuration key"),
        ("TRAINER.STRATEGY", "bogus", "ddp"),
        ("EVAL.N_BOOT", "-5", "0 <= value"),
        ("PRETRAIN.LR", "0.0", "0.0 < value"),
        ("PRETRAIN.SIGMA", "-1.0", "0.0 < value"),
        ("FINETUNE.THRESHOLD", "1.5", "(0, 1)"),
        ("FINETUNE.THRESHOLD", "median", "youden, argmax"),
        ("DATASET.PREPROCESS.POWERLINE_HZ", "55.0", "50, 60 or 0"),
        ("DATASET.PREPROCESS.HIGHPASS_HZ", "300.0", "half of DATASET.FS"),
        ("TASK.MPAP_RANGE", "[30.0, 10.0]", "low < high"),
        ("TRAINER.PRECISION", "fp8", "bf16-mixed"),
        ("PRETRAIN.RECON", "l1", "gaussian"),
        ("MODEL.RANDOM_ARCHITECTURE", "resnet1d", "lsemvae"),
        ("PRETRAIN.LEAD_DROPOUT", "1.0", "0.0 <= value < 1.0"),
        ("PRETRAIN.CORRUPT_PROB", "1.5", "0.0 <= value <= 1.0"),
        ("PRETRAIN.CORRUPT_KINDS", "['noise', 'static']", "invert"),
        ("PRETRAIN.SIGMA_MAX", "0.0", "0.0 < value"),
    ],
)
def test_bad_values_stop_before_any_work_naming_what_is_accepted(key, value, words):
    with pytest.raises(ValueError) as err:
        load_cfg(["6L.yaml"], [key, value])
    assert words in str(err.value) and (key in str(err.value) or "NOT_A_KEY" in key)


def test_every_shipped_config_validates_and_the_layout_reads_the_registry():
    for path in sorted((EXAMPLE.parents[1] / "configs").glob("*.yaml")):
        run = RunLayout.from_cfg(load_cfg([path.name]))
        assert run.spec.label and run.method_label
    run = RunLayout.from_cfg(load_cfg(["6L.yaml", "betavae.yaml"]))
    assert run.features == "fused_mean" and not run.spec.end_to_end  # the one feature a joint encoder has
    stmem = RunLayout.from_cfg(load_cfg(["stmem.yaml", "quick.yaml"]))
    assert stmem.features == "pooled" and stmem.build_args(stmem.leads)["preset"] == "small"
    custom = RunLayout.from_cfg(load_cfg([], ["DATASET.LABEL_COLUMN", "nsr"]))
    assert custom.task == "nsr"  # a custom endpoint is named as such, not "ph_detection"
    assert RunLayout.from_cfg(load_cfg([], ["TASK.LABEL", "sinus rhythm"])).task == "sinus rhythm"
    rand = RunLayout.from_cfg(load_cfg(["random_encoder.yaml"]))
    assert rand.method_label == "Random encoder" and rand.spec.frozen and not rand.spec.pretrained


def test_preprocessing_keys_reach_the_spec_and_its_fingerprint():
    base = RunLayout.from_cfg(load_cfg([]))
    us = RunLayout.from_cfg(load_cfg([], ["DATASET.PREPROCESS.POWERLINE_HZ", "60.0"]))
    off = RunLayout.from_cfg(load_cfg([], ["DATASET.PREPROCESS.HIGHPASS_HZ", "0.0"]))
    assert us.preprocess.powerline_hz == 60.0 and off.preprocess.highpass_hz is None
    assert len({base.preprocess.fingerprint(), us.preprocess.fingerprint(), off.preprocess.fingerprint()}) == 3
    assert base.finetune_cache != us.finetune_cache  # another preprocessing never reuses a cache


@pytest.mark.parametrize(
    "opts, words",
    [
        (["PRETRAIN.WINDOW", "-1"], "0 <= value"),
        (["DATASET.INPUT_LENGTH", "1000", "PRETRAIN.WINDOW", "1001"], "DATASET.INPUT_LENGTH 1000"),
        (["PRETRAIN.EARLY_STOP_PATIENCE", "3", "PRETRAIN.VAL_FRACTION", "0.0"], "PRETRAIN.VAL_FRACTION > 0"),
        (["MODEL.NAME", "stmem", "MODEL.STMEM_PATCH_SIZE", "75", "PRETRAIN.WINDOW", "250"], "divisor of 250"),
        (["FINETUNE.WINDOW_POOLING", "max"], "mean"),
    ],
)
def test_window_keys_are_checked_before_any_work(opts, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        load_cfg(["6L.yaml"], opts)


def test_windowed_models_are_built_for_the_window_and_the_paper_default_is_whole_records():
    """PRETRAIN.WINDOW sets the input length of every latent model (ST-MEM's patches follow); 0 keeps the records."""
    from kale_ext.embed.zoo import build_from_args

    base = RunLayout.from_cfg(load_cfg([]))
    assert base.cfg.PRETRAIN.WINDOW == 0 and base.window == 0
    assert base.build_args(base.leads)["input_dim"] == base.cfg.DATASET.INPUT_LENGTH
    assert base.cfg.PRETRAIN.VAL_FRACTION == 0.1 and base.cfg.PRETRAIN.EARLY_STOP_PATIENCE == 0
    short = ["DATASET.INPUT_LENGTH", "1000", "PRETRAIN.WINDOW", "250", "MODEL.LATENT_DIM", "4"]
    for name in ("lsemvae", "mvae", "mopoe", "betavae", "stmem", "random_encoder"):
        run = RunLayout.from_cfg(load_cfg([], [*short, "MODEL.NAME", name, "MODEL.STMEM_PRESET", "small"]))
        args = run.build_args(run.pretrain_leads)
        assert run.window == 250 and args["input_dim"] == 250, name
        if name == "stmem":
            model = build_from_args(**args)
            assert 250 % model.patch_size == 0 and model.n_patches >= 2
    supervised = RunLayout.from_cfg(load_cfg([], [*short, "MODEL.NAME", "resnet1d"]))
    assert supervised.window == 0 and supervised.build_args(supervised.leads)["input_dim"] == 1000
    whole = RunLayout.from_cfg(load_cfg([], ["DATASET.INPUT_LENGTH", "1000", "PRETRAIN.WINDOW", "1000"]))
    assert whole.window == 0  # a window as long as the records is whole records


def test_pretraining_keys_for_the_served_lead_set_reach_the_model_objective_and_fingerprint():
    import stages  # noqa: PLC0415 - the example's stage module, imported with the example on the path

    from kale_ext.embed.zoo import build_from_args  # noqa: PLC0415
    from kale_ext.prepdata.corruption import LeadCorruption  # noqa: PLC0415

    base = RunLayout.from_cfg(load_cfg(["6L.yaml"]))
    assert "lead_dropout" not in base.build_args(base.pretrain_leads)  # default: records of earlier runs unchanged
    assert stages.make_augment(base) is None
    keys = ["PRETRAIN.LEAD_DROPOUT", "0.5", "PRETRAIN.SUBSET_TERMS", "subset", "PRETRAIN.CORRUPT_PROB", "0.3",
            "PRETRAIN.CORRUPT_KINDS", "['flat', 'invert']", "PRETRAIN.LEARN_SIGMA", "True"]  # fmt: skip
    run = RunLayout.from_cfg(load_cfg(["6L.yaml"], keys))
    args = run.build_args(run.pretrain_leads)
    assert args["lead_dropout"] == 0.5 and build_from_args(**args).lead_dropout == 0.5
    objective = stages.make_objective(run)
    assert objective.subset_terms == "subset" and objective.sigma_raw.shape == (12,)
    augment = stages.make_augment(run)
    assert isinstance(augment, LeadCorruption) and augment.prob == 0.3 and augment.kinds == ("flat", "invert")
    fingerprint, base_fingerprint = stages.pretrain_fingerprint(run), stages.pretrain_fingerprint(base)
    assert fingerprint["model"]["lead_dropout"] == 0.5
    for key in ("LEAD_DROPOUT", "CORRUPT_PROB", "CORRUPT_KINDS", "SUBSET_TERMS", "LEARN_SIGMA"):
        assert fingerprint["config"][f"PRETRAIN.{key}"] != base_fingerprint["config"][f"PRETRAIN.{key}"]
    # the capacity objective gets PRETRAIN.SIGMA too
    capacity = stages.make_objective(RunLayout.from_cfg(load_cfg([], ["PRETRAIN.OBJECTIVE", "capacity",
                                                                      "PRETRAIN.SIGMA", "0.5"])))  # fmt: skip
    assert abs(capacity.log_sigma - __import__("math").log(0.5)) < 1e-12


def test_gate_context_reaches_the_model_and_is_recorded_only_when_not_the_default():
    from kale_ext.embed.zoo import build_from_args  # noqa: PLC0415

    base = RunLayout.from_cfg(load_cfg(["6L.yaml"]))
    assert "gate_context" not in base.build_args(base.pretrain_leads)  # records of earlier runs rebuild unchanged
    run = RunLayout.from_cfg(load_cfg(["6L.yaml"], ["MODEL.GATE_CONTEXT", "consensus"]))
    args = run.build_args(run.pretrain_leads)
    assert args["gate_context"] == "consensus"
    assert build_from_args(**args).fusion.gate.context == "consensus"
    with pytest.raises(ValueError, match="MODEL.GATE_CONTEXT"):
        load_cfg([], ["MODEL.GATE_CONTEXT", "neighbours"])


def test_the_real_data_preset_trains_with_corrupted_leads_and_the_paper_configs_do_not():
    import stages  # noqa: PLC0415 - the example's stage module

    from kale_ext.prepdata.corruption import CORRUPTION_KINDS, LeadCorruption  # noqa: PLC0415

    real = RunLayout.from_cfg(load_cfg(["6L.yaml", "real_cpu.yaml"]))
    augment = stages.make_augment(real)
    assert isinstance(augment, LeadCorruption) and augment.prob == 0.5 and augment.kinds == CORRUPTION_KINDS
    for name in ("6L.yaml", "12L.yaml", "lsemvae.yaml"):
        assert stages.make_augment(RunLayout.from_cfg(load_cfg([name]))) is None
