"""Shared fixtures: the real ECG records beside the checkout and deterministic torch settings."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported (Lightning or torch.compile may import it before the kernel tests):
    # without a GPU the fused kernels run in Triton's CPU interpreter (tests/embed/test_conv_triton.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ECG = REPO_ROOT.parent / "shared" / "data" / "ecg"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def cinc_dir() -> Path:
    """Folder of 50 real 12-lead WFDB records (../shared/data/ecg/cinc2021); skips when absent."""
    path = SHARED_ECG / "cinc2021"
    if not path.is_dir() or not any(path.glob("*.hea")):
        pytest.skip("real ECG records not found at ../shared/data/ecg/cinc2021")
    return path


@pytest.fixture(scope="session")
def shared_ecg_with_ptbxl() -> Path:
    """``../shared/data/ecg`` holding PTB-XL (``ptbxl/ptbxl_database.csv``), LUDB and CinC; skips when absent."""
    if not (SHARED_ECG / "ptbxl" / "ptbxl_database.csv").is_file():
        pytest.skip("PTB-XL not found at ../shared/data/ecg/ptbxl")
    return SHARED_ECG


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Seed torch for every test and keep CPU threads modest (CI has 2 cores)."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_kernel_verdicts(tmp_path_factory):
    """Keep the Triton self-check verdicts of the tests (kale_ext.embed.kernel_check) out of the user's cache."""
    old = os.environ.get("KALE_EXT_CACHE_DIR")
    os.environ["KALE_EXT_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel_verdicts"))
    yield
    if old is None:
        os.environ.pop("KALE_EXT_CACHE_DIR", None)
    else:
        os.environ["KALE_EXT_CACHE_DIR"] = old
