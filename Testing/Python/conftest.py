"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _shared_data_dir() -> Path:
    # CI clones the repo beside shared/; developers may point elsewhere.
    env = os.environ.get("SUBJECT_FINGERPRINT_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The small sample data committed under Resources/SampleData."""
    return REPO_ROOT / "Resources" / "SampleData"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real ChestX-ray14 and brain MRI); tests skip where it is absent."""
    path = _shared_data_dir()
    if not (path / "cxr14-subset-64px" / "manifest.csv").is_file():
        pytest.skip(f"shared data not found at {path} (set SUBJECT_FINGERPRINT_SHARED_DATA)")
    return path


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: tests share 2 cores with each other and CI."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _export_cache(tmp_path_factory):
    """ONNX exports made by tests go to a temporary folder, not the user's cache."""
    os.environ.setdefault("SUBJECT_FINGERPRINT_CACHE", str(tmp_path_factory.mktemp("sf-cache")))
    yield
