"""Tests of kale_ext.pipeline.artifacts: models and fold classifiers round-trip through weights-only files."""

import json

import pytest
import torch

from kale_ext.embed.zoo import build_from_args
from kale_ext.pipeline import artifacts

LEADS = ("I", "II")
ARGS = {"name": "lsemvae", "lead_names": list(LEADS), "input_dim": 32, "latent_dim": 4}


def test_pretrained_model_round_trip_and_done_marker_written_last(tmp_path):
    torch.manual_seed(0)
    model = build_from_args(**ARGS)
    assert not artifacts.is_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="pre-training"):
        artifacts.load_model(tmp_path)
    artifacts.save_model(model, tmp_path, ARGS, extra_files={"fingerprint.json": "{}"})
    assert artifacts.is_pretrained(tmp_path) and (tmp_path / "fingerprint.json").read_text() == "{}"
    back = artifacts.load_model(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert not back.training


def test_head_and_end_to_end_fold_classifiers_round_trip(tmp_path):
    torch.manual_seed(0)
    vae = build_from_args(**ARGS)
    artifacts.save_model(vae, tmp_path / "pre", ARGS)
    info = artifacts.classifier_info(ARGS, LEADS, 8, 0.1, "concat_means", 8, tmp_path / "pre")
    assert info["kind"] == "head"
    head = artifacts.head_factory(info)()
    artifacts.save_fold_classifier(tmp_path / "ft", 0, head, {"auroc": 0.5})
    artifacts.write_classifier_info(tmp_path / "ft", info)
    clf = artifacts.load_fold_classifier(tmp_path / "ft", 0)
    x = torch.randn(3, 2, 32)
    with torch.no_grad():
        features = torch.cat(list(vae.encode(x, leads=LEADS).mean), dim=-1)
        torch.testing.assert_close(clf(x), head.eval()(features))
    assert json.loads((tmp_path / "ft" / "fold0" / "metrics.json").read_text())["auroc"] == 0.5

    net_args = {"name": "resnet1d", "lead_names": list(LEADS), "input_dim": 32, "latent_dim": 4, "widths": [4, 4, 8, 8]}
    info = artifacts.classifier_info(net_args, LEADS, 8, 0.1)
    assert info["kind"] == "end_to_end" and "pretrain_dir" not in info
    net = artifacts.end_to_end_factory(info)()
    artifacts.save_fold_classifier(tmp_path / "e2e", 2, net, {})
    artifacts.write_classifier_info(tmp_path / "e2e", info)
    back = artifacts.load_fold_classifier(tmp_path / "e2e", 2)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net.eval()(x))
