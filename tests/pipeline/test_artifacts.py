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


def test_a_truncated_model_is_named_on_load_and_listed_as_damaged(tmp_path):
    torch.manual_seed(0)
    artifacts.save_model(build_from_args(**ARGS), tmp_path, ARGS)
    assert (tmp_path / "model.pt.sha256").is_file() and artifacts.damaged_models(tmp_path) == []
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.pt does not match the checksum.*delete .* and rerun the pre-training"):
        artifacts.load_model(tmp_path)
    assert len(artifacts.damaged_models(tmp_path)) == 1
    (tmp_path / "model.pt.sha256").unlink()  # an older run without a checksum: the file is still named
    with pytest.raises(ValueError, match=r"model.pt cannot be read"):
        artifacts.load_model(tmp_path)


def test_a_fold_model_write_that_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 2)
    artifacts.save_fold_classifier(tmp_path, 1, head, {})
    before = (tmp_path / "fold1" / "model.pt").read_bytes()

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*fold1/model.pt .*No space left.*bytes are free"):
        artifacts.save_fold_classifier(tmp_path, 1, torch.nn.Linear(4, 2), {})
    assert (tmp_path / "fold1" / "model.pt").read_bytes() == before  # the old complete file, untouched
    assert sorted(p.name for p in (tmp_path / "fold1").iterdir()) == ["metrics.json", "model.pt", "model.pt.sha256"]
    assert artifacts.damaged_models(tmp_path) == []
