"""Several record sources as one: listed one by one, ids tagged by source so that nothing collides.

Pre-training can draw on several archives at once (a hospital's export, PTB-XL, LUDB, the PhysioNet/CinC 2021
challenge data). Each source is listed by :func:`~kale_ext.loaddata.record_table.list_source_records` in its own
layout, at the wanted sampling rate; then every record id and subject id is prefixed with the source's tag
(``<tag><separator><id>``), so record ``1`` of two archives, or patient ``15709`` of two hospitals, stay two records
and two people: grouped splits never join people of different sources.

A list of sources is written as one text with commas (``"a/ptbxl, a/ludb, a/cinc2021"``): :func:`split_sources`.
The tag of a source is its folder name (the file stem for a manifest CSV), made unique by a ``-2``, ``-3``, ...
suffix when two sources share a name: :func:`source_tags`.
"""

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from kale_ext.loaddata.record_table import list_source_records
from kale_ext.loaddata.wfdb_sources import RecordRef

logger = logging.getLogger(__name__)


def split_sources(text: str | Sequence[str]) -> list[str]:
    """The sources of a comma-separated list (or a sequence), stripped, empty items dropped.

    Args:
        text: ``"root1, root2"`` or ``["root1", "root2"]``.

    Returns:
        The source paths as written.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    return [str(item).strip() for item in items if str(item).strip()]


def source_tags(sources: Sequence[str | Path]) -> list[str]:
    """A short unique tag per source: the folder name (or a CSV's stem), ``-2``, ``-3``, ... on repeats.

    Args:
        sources: source paths.

    Returns:
        One tag per source, in order.
    """
    tags: list[str] = []
    for source in sources:
        path = Path(source)
        base = (path.stem if path.suffix.lower() == ".csv" else path.name) or "source"
        tag, k = base, 1
        while tag in tags:
            k += 1
            tag = f"{base}-{k}"
        tags.append(tag)
    return tags


def combine_sources(
    sources: Sequence[str | Path | Sequence[RecordRef]],
    fs: float | None = None,
    tags: Sequence[str] | None = None,
    separator: str = ":",
) -> list[RecordRef]:
    """List several sources as one record list with source-tagged record and subject ids.

    Args:
        sources: source paths (any layout of :func:`~kale_ext.loaddata.record_table.list_source_records`) or ready
            record lists.
        fs: sampling rate the records will be used at (picks the files of a record table).
        tags: one tag per source; default :func:`source_tags` of the paths (record lists: ``source-<k>``).
        separator: between tag and id.

    Returns:
        The records of every source in source order; ``record_id`` and ``subject_id`` are ``tag + separator + id``,
        ``metadata["source"]`` is the tag.

    Raises:
        ValueError: ``tags`` has another length than ``sources`` or repeats a tag.
    """
    if tags is None:
        names = [s if isinstance(s, (str, Path)) else f"source-{k + 1}" for k, s in enumerate(sources)]
        tags = source_tags(names)
    tags = list(tags)
    if len(tags) != len(sources) or len(set(tags)) != len(tags):
        raise ValueError(f"give one distinct tag per source: {len(sources)} sources, tags {tags}")
    out: list[RecordRef] = []
    for tag, source in zip(tags, sources):
        refs = list_source_records(source, fs=fs) if isinstance(source, (str, Path)) else list(source)
        logger.info("source %s: %d records", tag, len(refs))
        for ref in refs:
            out.append(
                replace(
                    ref,
                    record_id=f"{tag}{separator}{ref.record_id}",
                    subject_id=f"{tag}{separator}{ref.subject_id}",
                    metadata={**ref.metadata, "source": tag},
                )
            )
    return out
