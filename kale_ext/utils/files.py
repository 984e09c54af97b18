"""Atomic file writes and stable hashes, shared by the cache builder and the data sets.

A file written through these helpers either exists complete or not at all: the content goes to a temporary file in
the same folder, which is then renamed over the target (``os.replace`` is atomic on one file system). That is what
lets an interrupted job be re-run without reading half-written parts.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _temp_path(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


def atomic_write(target: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Write a file atomically: ``writer(tmp_path)`` fills a temporary file that is then renamed to ``target``.

    Args:
        target: final path; its folder is created when missing.
        writer: callable that writes the whole content to the path it is given.

    Returns:
        The target path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target)
    try:
        writer(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_save_npy(target: str | Path, array: np.ndarray) -> Path:
    """Save ``array`` as a ``.npy`` file atomically (no pickled objects)."""

    def _write(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return atomic_write(target, _write)


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` to JSON with sorted keys and no whitespace, so equal content gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def short_hash(obj: Any, length: int = 16) -> str:
    """Short hex sha256 of the canonical JSON of ``obj`` (strings are hashed as their JSON form).

    Args:
        obj: any JSON-serialisable value.
        length: number of hex characters kept (at most 64).

    Returns:
        Lower-case hex string of ``length`` characters.
    """
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]
