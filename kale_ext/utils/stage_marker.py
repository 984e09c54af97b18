"""Completion markers with fingerprints: a stage's output is reused only when it was made from the same inputs.

A finished stage writes ``fingerprint.json`` (what it was computed from: input hashes, the relevant configuration
slice, the code version) beside its ``DONE`` marker. A later run compares its own fingerprint with the stored one:
on a match the output is reused; otherwise the differences are named, key by key, so the caller can recompute or
refuse with a message that says what changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kale_ext.utils.files import atomic_write_text, canonical_json

FINGERPRINT_FILE = "fingerprint.json"


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out.update(_flatten(value, f"{prefix}{key}." if not isinstance(value, dict) or value else f"{prefix}{key}"))
        return out
    return {prefix.rstrip("."): obj}


def fingerprint_differences(stored: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints (``"KEY: stored -> current"``), sorted by key."""
    a, b = _flatten(json.loads(canonical_json(stored))), _flatten(json.loads(canonical_json(current)))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return diffs


def stage_status(
    folder: str | Path, fingerprint: dict, done_file: str = "DONE", in_progress: bool = False
) -> tuple[str, list[str]]:
    """Whether ``folder`` holds a finished output of the same inputs.

    Args:
        folder: the stage's output folder.
        fingerprint: what the output would be computed from now (JSON-serialisable).
        done_file: name of the completion marker.
        in_progress: the folder holds partial work that a rerun would resume (e.g. checkpoints); it is stale when
            its stored fingerprint differs, since resuming it would mix inputs.

    Returns:
        ``("missing", [])`` (nothing to reuse or resume from other inputs), ``("match", [])`` or
        ``("stale", differences)``; an output finished without a fingerprint (an older version) is stale with the
        difference ``"fingerprint: <absent>"``.
    """
    folder = Path(folder)
    path = folder / FINGERPRINT_FILE
    if not (folder / done_file).exists():
        if in_progress and path.exists():
            diffs = fingerprint_differences(json.loads(path.read_text(encoding="utf-8")), fingerprint)
            if diffs:
                return "stale", diffs
        return "missing", []
    if not path.exists():
        return "stale", ["fingerprint: <absent> (made by an older version)"]
    diffs = fingerprint_differences(json.loads(path.read_text(encoding="utf-8")), fingerprint)
    return ("stale", diffs) if diffs else ("match", [])


def write_fingerprint(folder: str | Path, fingerprint: dict) -> Path:
    """Store ``fingerprint`` in ``folder/fingerprint.json`` (call before writing the DONE marker)."""
    return atomic_write_text(
        Path(folder) / FINGERPRINT_FILE, json.dumps(json.loads(canonical_json(fingerprint)), indent=2)
    )
