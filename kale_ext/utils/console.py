"""Console logging that cooperates with progress bars.

Long stages show tqdm progress bars (Lightning's included); a log line printed with a plain stream handler lands
on the bar's line. :class:`TqdmLoggingHandler` writes every record through ``tqdm.write``, which clears the bars,
prints the line and redraws them.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm


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
