"""Shared fixtures (helpers live in helpers.py, importable from every test as ``from helpers import ...``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from features.tiny_backbone import make_backbone
from helpers import DATA, missing, read_labeled_case


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        missing(f"shared CT data not found at {DATA} (set DIFFUSIONSEG_DATA to the data folder)")
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


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A tiny diffusion + BPR backbone file, loaded (one per test module)."""
    return make_backbone(tmp_path_factory.mktemp("bb") / "backbone.safetensors")


@pytest.fixture(scope="module")
def case():
    """3D-IRCADb 1.01: (CT, 13-organ label map) with its manual liver, spleen and kidney masks."""
    return read_labeled_case("ircadb1.01")
