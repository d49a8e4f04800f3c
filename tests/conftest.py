"""Shared fixtures: where the real sample data lives, and small helpers every test file needs."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The CLI and multi-process tests start `python -m multibyte` subprocesses; they inherit one
# intra-op thread too (two threads stall at every op's barrier while the other core is busy,
# e.g. with the parent test process or a second rank).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _shared_data_dir() -> Path:
    # ../shared/data relative to the project root, unless MULTIBYTE_SHARED_DATA points elsewhere.
    return Path(os.environ.get("MULTIBYTE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real sample data folder (text/, images/, audio/); skips the test when it is absent."""
    root = _shared_data_dir()
    if not (root / "README.md").is_file():
        pytest.skip(f"shared sample data not found at {root}")
    return root


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Tiny test models are dominated by per-op overhead, where a second intra-op thread only adds
    barrier waits (and stalls badly when another process holds the other core)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
