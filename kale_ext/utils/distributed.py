"""Process rank and waiting, for stages that only the global rank 0 may run (DDP, SLURM, torchrun).

Preparation work (generating a cohort, building a cache) runs on one process; the others wait for its completion
marker. The rank is read from the launcher's environment, so it is known before any process group exists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK")


def global_rank() -> int:
    """The global rank of this process from the launcher's environment (0 when not launched in parallel)."""
    for key in RANK_VARIABLES:
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


def wait_for(path: str | Path, timeout_s: float = 3600.0, poll_s: float = 2.0) -> None:
    """Block until ``path`` exists (written by rank 0), or raise ``TimeoutError`` saying what to do.

    Args:
        path: the marker file to wait for.
        timeout_s: longest wait in seconds.
        poll_s: seconds between checks.
    """
    path = Path(path)
    start = time.time()
    while not path.exists():
        if time.time() - start > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {path}; run the preparation on one process first")
        time.sleep(poll_s)
