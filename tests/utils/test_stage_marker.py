"""Tests of kale_ext.utils.stage_marker: reuse on a match only, differences named key by key."""

from kale_ext.utils.stage_marker import fingerprint_differences, stage_status, write_fingerprint


def test_missing_match_and_stale(tmp_path):
    fp = {"config": {"MODEL": {"LATENT_DIM": 32}}, "labels": "abc"}
    assert stage_status(tmp_path, fp) == ("missing", [])
    (tmp_path / "DONE").write_text("done")
    assert stage_status(tmp_path, fp)[0] == "stale"  # finished without a fingerprint: not trusted
    write_fingerprint(tmp_path, fp)
    assert stage_status(tmp_path, fp) == ("match", [])
    status, diffs = stage_status(tmp_path, {"config": {"MODEL": {"LATENT_DIM": 64}}, "labels": "abc"})
    assert status == "stale" and diffs == ["config.MODEL.LATENT_DIM: 32 -> 64"]


def test_differences_name_added_and_removed_keys():
    diffs = fingerprint_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "d": 3})
    assert diffs == ["b.c: 2 -> '<absent>'", "d: '<absent>' -> 3"]


def test_partial_work_from_other_inputs_is_stale_only_when_it_would_be_resumed(tmp_path):
    write_fingerprint(tmp_path, {"latent": 32})
    assert stage_status(tmp_path, {"latent": 64}) == ("missing", [])  # nothing to resume: just recompute
    status, diffs = stage_status(tmp_path, {"latent": 64}, in_progress=True)
    assert status == "stale" and diffs == ["latent: 32 -> 64"]
    assert stage_status(tmp_path, {"latent": 32}, in_progress=True) == ("missing", [])  # resume the same run
