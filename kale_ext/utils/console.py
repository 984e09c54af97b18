"""Console output that stays readable in a terminal and in a redirected log.

Long stages show tqdm progress bars (Lightning's included); a log line printed with a plain stream handler lands
on the bar's line. :class:`TqdmLoggingHandler` writes every record through ``tqdm.write``, which clears the bars,
prints the line and redraws them. Bars belong on a terminal only: redirected to a file, each redraw is a ``\\r``
line, megabytes per run; :func:`interactive` says whether to draw them. :func:`quiet_lightning` keeps Lightning's
start-up notes (accelerator availability, tips about optional packages) to one line per process instead of one per
``Trainer``.
"""

from __future__ import annotations

import logging
import sys
import warnings

from tqdm.auto import tqdm

#: Loggers through which Lightning prints its rank-zero notes (old and new package names).
LIGHTNING_NOTE_LOGGERS: tuple[str, ...] = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
#: Lightning notes dropped always (advertising tips, end-of-fit notes that the caller logs in its own words).
DROPPED_NOTES: tuple[str, ...] = ("Tip:", "litlogger", "litmodels", "`Trainer.fit` stopped")
#: Lightning notes shown once per process (the hardware does not change between trainers).
ONCE_NOTES: tuple[str, ...] = ("GPU available", "TPU available", "HPU available", "IPU available", "LOCAL_RANK")


class TqdmLoggingHandler(logging.StreamHandler):
    """A console handler whose lines never glue onto a progress bar's line.

    Args:
        stream: where the lines go (default ``sys.stdout``).
    """

    def __init__(self, stream=None) -> None:
        super().__init__(stream if stream is not None else sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        """Write one formatted record above the active progress bars."""
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def interactive(*streams) -> bool:
    """True when every stream is a terminal (default: stdout and stderr, where tqdm and Lightning draw bars).

    Args:
        *streams: file objects to check; none = ``sys.stdout`` and ``sys.stderr``.

    Returns:
        Whether progress bars would be seen as bars rather than written as ``\\r`` lines into a file.
    """
    for stream in streams or (sys.stdout, sys.stderr):
        isatty = getattr(stream, "isatty", None)
        try:
            if isatty is None or not isatty():
                return False
        except (ValueError, OSError):  # a closed or detached stream
            return False
    return True


class LightningNoteFilter(logging.Filter):
    """Drops Lightning's tips and repeats of its hardware notes (a note in ``ONCE_NOTES`` passes once)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a dropped note or a hardware note already shown in this process."""
        message = record.getMessage()
        if any(part in message for part in DROPPED_NOTES):
            return False
        for part in ONCE_NOTES:
            if message.startswith(part):
                if message in self.seen:
                    return False
                self.seen.add(message)
        return True


def quiet_lightning() -> LightningNoteFilter:
    """Install (once) the :class:`LightningNoteFilter` on Lightning's note loggers; returns the filter in use.

    Call it from an entry point: it changes process-wide logging, which a library function should not do unasked.
    """
    existing = None
    for name in LIGHTNING_NOTE_LOGGERS:
        log = logging.getLogger(name)
        found = next((f for f in log.filters if isinstance(f, LightningNoteFilter)), None)
        existing = existing or found
    note_filter = existing or LightningNoteFilter()
    for name in LIGHTNING_NOTE_LOGGERS:
        log = logging.getLogger(name)
        if note_filter not in log.filters:
            log.addFilter(note_filter)
    return note_filter


def script_logging(level: int = logging.INFO) -> None:
    """Logging of a benchmark script's entry point: timed lines from the script, Lightning and the library quiet.

    Lightning, its fabric and ``kale_ext`` log at WARNING; the notes about DataLoader workers and an unused GPU and
    scikit-learn's convergence notes are not shown. Process-wide: call it from an entry point only.

    Args:
        level: level of the root logger (the script's own lines).
    """
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "kale_ext"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", module="sklearn")
