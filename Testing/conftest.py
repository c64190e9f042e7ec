"""Shared fixtures (helpers live in helpers.py, importable from every test as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DATA


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared CT data not found at {DATA} (set DIFFUSIONSEG_DATA to the data folder)")
    return DATA


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """One torch thread per test process by default (DIFFUSIONSEG_TEST_THREADS overrides): the test tensors are
    tiny, and on a busy 2-core machine two threads per process stall in OpenMP barriers (up to 10x slower)."""
    import os

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DIFFUSIONSEG_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(threads)
