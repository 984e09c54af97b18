"""benchmarks/gpu_check.sh fits one 10-minute device call and names the card before any figure (checked statically:
no GPU here)."""

import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def test_stage_limits_fit_one_ten_minute_call():
    """The stage time limits plus the kill grace of each stage stay under 10 minutes with 30 s to spare."""
    text = SCRIPT.read_text()
    limits = dict(re.findall(r'stage (\w+) "\$\{(?:\w+_TIMEOUT):-(\d+)\}"', text))
    assert set(limits) == {"self_check", "tests", "triton_kernels", "pretrain_throughput", "end_to_end"}
    grace = int(re.search(r"--kill-after=(\d+)", text).group(1))
    assert sum(int(v) for v in limits.values()) + grace * len(limits) <= 600 - 30


def test_card_torch_and_triton_come_first_and_the_verdict_is_summarised():
    text = SCRIPT.read_text()
    first_stage = text.index("stage self_check")
    for marker in ('echo "card: ', "print('torch', torch.__version__", "print('triton', triton.__version__)"):
        assert -1 < text.index(marker) < first_stage, marker
    assert "self-check verdict" in text and 'grep -h "self-check verdict"' in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
