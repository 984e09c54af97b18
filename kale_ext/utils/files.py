"""Atomic file writes and stable hashes, shared by the cache builder and the data sets.

A file written through these helpers either exists complete or not at all: the content goes to a temporary file in
the same folder, which is then renamed over the target (``os.replace`` is atomic on one file system). That is what
lets an interrupted job be re-run without reading half-written parts. Temporary names carry the writer's process id
and a random part (``.<name>.<pid>.<random>.tmp``), so two processes never share one, and
:func:`remove_stale_temps` can tell the leftovers of dead writers from files being written.

:func:`concat_npy` joins ``.npy`` files along their first axis with plain sequential writes (constant memory, unlike
a writable memory map whose dirty pages count against the process), and :func:`file_lock` serialises writers of one
folder across processes.
"""

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
_COPY_CHUNK = 8 << 20  # bytes per read/write when concatenating


def _temp_path(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(name)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(target: str | Path, writer: Callable[[Path], Any], *, fsync: bool = False) -> Path:
    """Write a file atomically: ``writer(tmp_path)`` fills a temporary file that is then renamed to ``target``.

    Args:
        target: final path; its folder is created when missing.
        writer: callable that writes the whole content to the path it is given.
        fsync: flush the file (and the folder entry) to disk before and after the rename, so the file survives a
            power cut once this returns.

    Returns:
        The target path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(target)
    try:
        writer(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
        if fsync:
            _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_text(target: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically (``fsync`` as in :func:`atomic_write`)."""
    return atomic_write(target, lambda p: p.write_text(text, encoding="utf-8"), fsync=fsync)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temporary files of this module in ``folder`` whose writer process no longer runs.

    Args:
        folder: folder to clean (not recursive).

    Returns:
        The deleted paths.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match and path.is_file() and not _pid_alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    if removed:
        logger.info("removed %d temporary files of dead writers in %s", len(removed), folder)
    return removed


def read_npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Read the header of a ``.npy`` file without loading its data.

    Args:
        path: ``.npy`` file.

    Returns:
        ``(shape, dtype, fortran_order, data_offset)``.
    """
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        return tuple(shape), np.dtype(dtype), bool(fortran), handle.tell()


def _header_bytes(header: dict) -> bytes:
    """The ``.npy`` header numpy itself writes for ``header`` (version 1.0 when it fits, else 2.0)."""
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, header)
    except ValueError:
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, header)
    return buf.getvalue()


def npy_size(shape: Sequence[int], dtype: str | np.dtype) -> int:
    """Bytes of a C-order ``.npy`` file of this shape and dtype (header included)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    return len(_header_bytes(header)) + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def concat_npy(sources: Sequence[str | Path], target: str | Path, *, fsync: bool = True) -> tuple[int, ...]:
    """Concatenate ``.npy`` files along axis 0 into ``target`` with sequential writes, atomically.

    The header is written first, then each source's data bytes are copied in chunks of a few MiB: memory stays
    constant whatever the total size (a writable memory map instead keeps the written pages resident). The result is
    byte-identical to ``np.save(target, np.concatenate(arrays))``. The file is fsynced before the atomic rename.

    Args:
        sources: ``.npy`` files of C-order arrays with one dtype and equal trailing shapes (zero rows allowed).
        target: output path.
        fsync: flush to disk before the rename.

    Returns:
        The shape of the written array.

    Raises:
        ValueError: no sources, or dtypes, orders or trailing shapes differ (the message names the file).
    """
    if not sources:
        raise ValueError("concat_npy needs at least one source file")
    headers = [read_npy_header(p) for p in sources]
    shape0, dtype0, _, _ = headers[0]
    for path, (shape, dtype, fortran, _) in zip(sources, headers):
        if dtype != dtype0 or tuple(shape[1:]) != tuple(shape0[1:]) or (fortran and len(shape) > 1):
            raise ValueError(
                f"{path} holds {dtype} {shape} (fortran={fortran}), the first holds {dtype0} {shape0}; "
                "every part must share dtype and trailing shape; rebuild the parts"
            )
    shape = (sum(h[0][0] for h in headers), *shape0[1:])
    header = {"descr": np.lib.format.dtype_to_descr(dtype0), "fortran_order": False, "shape": shape}

    def _write(path: Path) -> None:
        with open(path, "wb") as out:
            out.write(_header_bytes(header))
            for src, (part_shape, dtype, _, offset) in zip(sources, headers):
                expected = int(np.prod(part_shape, dtype=np.int64)) * dtype.itemsize
                with open(src, "rb") as handle:
                    handle.seek(offset)
                    copied = _copy_exact(handle, out, expected)
                if copied != expected:
                    raise ValueError(f"{src} is truncated ({copied} of {expected} data bytes); rebuild that part")

    atomic_write(target, _write, fsync=fsync)
    return shape


def _copy_exact(src, dst, n_bytes: int) -> int:
    copied = 0
    while copied < n_bytes:
        chunk = src.read(min(_COPY_CHUNK, n_bytes - copied))
        if not chunk:
            break
        dst.write(chunk)
        copied += len(chunk)
    return copied


def free_bytes(folder: str | Path) -> int:
    """Free bytes for an unprivileged writer on the file system holding ``folder`` (``shutil.disk_usage``)."""
    return int(shutil.disk_usage(folder).free)


@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float = 3600.0, poll_s: float = 0.2) -> Iterator[Path]:
    """Hold an exclusive advisory lock on ``path`` (created) across processes, waiting up to ``timeout_s``.

    The lock is an ``fcntl.flock`` on the open file, so the operating system releases it when the holder exits,
    even after a crash: a leftover lock file never blocks anyone. The holder's process id is written into the file
    for the waiting message.

    Args:
        path: lock file.
        timeout_s: seconds to wait for another holder; 0 fails at once.
        poll_s: seconds between attempts.

    Yields:
        The lock path.

    Raises:
        TimeoutError: still held by another process after ``timeout_s``; the message names the lock file.
    """
    import fcntl  # POSIX only; imported here so the module stays importable elsewhere

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    start = time.monotonic()
    announced = False
    try:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout_s:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise TimeoutError(
                        f"another process (pid {holder}) holds the lock {path}; waited {waited:.0f} s. Wait for it to "
                        "finish, or give a larger timeout; the lock is released when that process exits"
                    ) from None
                if not announced:
                    logger.info("waiting for the lock %s held by another process", path)
                    announced = True
                time.sleep(poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield path
    finally:
        handle.close()  # closing the file releases the flock


def atomic_save_npy(target: str | Path, array: np.ndarray) -> Path:
    """Save ``array`` as a ``.npy`` file atomically (no pickled objects)."""

    def _write(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return atomic_write(target, _write)


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` to JSON with sorted keys and no whitespace, so equal content gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def file_digest(*paths: str | Path, length: int = 16) -> str:
    """Hex SHA-256 prefix of the files' bytes, read in chunks (a missing file counts as absent, not an error)."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            digest.update(b"\0absent\0")
            continue
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0end\0")
    return digest.hexdigest()[:length]


def short_hash(obj: Any, length: int = 16) -> str:
    """Short hex sha256 of the canonical JSON of ``obj`` (strings are hashed as their JSON form).

    Args:
        obj: any JSON-serialisable value.
        length: number of hex characters kept (at most 64).

    Returns:
        Lower-case hex string of ``length`` characters.
    """
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


CHECKSUM_SUFFIX = ".sha256"


def write_checksum(path: str | Path) -> str:
    """Record the SHA-256 of ``path``'s bytes in ``<path>.sha256`` (atomically) and return it.

    Written right after the file itself, so a later reader can tell a complete file from a truncated or altered one
    (:func:`checksum_problem`).
    """
    path = Path(path)
    digest = file_digest(path, length=64)
    atomic_write_text(path.with_name(path.name + CHECKSUM_SUFFIX), f"{digest}  {path.name}\n")
    return digest


def checksum_problem(path: str | Path) -> str | None:
    """Why ``path`` does not match the checksum recorded beside it, or None when it matches or none was recorded.

    Args:
        path: a file written with :func:`write_checksum` beside it.

    Returns:
        A one-line reason naming the file (missing, or content differs from the record), or None.
    """
    path = Path(path)
    record = path.with_name(path.name + CHECKSUM_SUFFIX)
    if not record.is_file():
        return None  # written by a version that kept no checksum
    if not path.is_file():
        return f"{path} is missing (its checksum {record.name} is there)"
    expected = record.read_text(encoding="utf-8").split()[0] if record.read_text(encoding="utf-8").strip() else ""
    if file_digest(path, length=64) != expected:
        return f"{path} does not match the checksum recorded when it was written (truncated or changed)"
    return None
