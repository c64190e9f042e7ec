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
