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


def test_lightning_notes_once_and_tips_never():
    from kale_ext.utils.console import interactive, quiet_lightning

    note_filter = quiet_lightning()
    assert quiet_lightning() is note_filter  # installed once
    log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    records = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    keep = _Keep()
    log.addHandler(keep)
    old_level, log.level = log.level, logging.INFO
    try:
        note_filter.seen.clear()
        for _ in range(3):
            log.info("GPU available: False, used: False")
            log.info(
                "💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/project/litlogger/)"
            )
            log.info("a note that always passes")
    finally:
        log.removeHandler(keep)
        log.level = old_level
    assert records == ["GPU available: False, used: False"] + ["a note that always passes"] * 3
    assert not interactive(io.StringIO())  # a file or pipe is not a terminal: no progress bars


def test_script_logging_quiets_lightning_and_the_library():
    import logging

    from kale_ext.utils.console import script_logging

    names = ("pytorch_lightning", "lightning_fabric", "kale_ext")
    before = {name: logging.getLogger(name).level for name in names}
    try:
        script_logging()
        assert all(logging.getLogger(name).level == logging.WARNING for name in names)
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
