"""Test helpers: where the real CT of ../shared/data is (override with DIFFUSIONSEG_DATA)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DIFFUSIONSEG_DATA", REPO.parent / "shared" / "data"))


def data_path(relative: str) -> Path:
    """Path of a file of the shared data; skips the test with the reason when it is absent."""
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"shared CT data not found at {path} (set DIFFUSIONSEG_DATA to the data folder)")
    return path
