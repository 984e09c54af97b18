"""Tests of kale_ext.utils.console: log lines go through tqdm.write, on their own line, while a bar runs."""

import io
import logging

from tqdm import tqdm

from kale_ext.utils.console import TqdmLoggingHandler


def test_log_lines_during_a_progress_bar_are_on_their_own_lines():
    out = io.StringIO()
    log = logging.getLogger("test_console")
    handler = TqdmLoggingHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        for i in tqdm(range(3), file=out, mininterval=0, ascii=True):
            log.info("step %d done", i)
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    for i in range(3):
        line = next(part for part in text.replace("\r", "\n").split("\n") if f"step {i} done" in part)
        assert line.strip() == f"step {i} done"  # nothing of the bar on the log line
