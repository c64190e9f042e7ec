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


def dice(a, b) -> float:
    """Dice of two boolean masks (0 when both are empty)."""
    import numpy as np

    return float(2 * np.logical_and(a, b).sum() / max(np.sum(a) + np.sum(b), 1))


def read_labeled_case(case: str = "ircadb1.01"):
    """``(ct, organ label map)`` of a case of ``labeled/`` (skips when the data is absent)."""
    from DiffusionSegLib.data.volume import read_volume

    return read_volume(data_path(f"labeled/{case}_ct.nii.gz")), read_volume(data_path(f"labeled/{case}_organs.nii.gz"))
