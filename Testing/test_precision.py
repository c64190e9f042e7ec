"""Precision: explicit choices pass through, ``auto`` takes bfloat16 only where the CPU has bfloat16 units and a
cached calibration confirms it is faster and agrees; the training code imports it from the package's low floor."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from DiffusionSegLib import precision as P
from DiffusionSegLib.errors import UserInputError

PACKAGE = Path(P.__file__).resolve().parent


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSIONSEG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(P, "_RESOLVED", {})


def test_explicit_precisions_pass_through_and_unknown_ones_are_refused():
    cpu = torch.device("cpu")
    assert P.resolve_precision("float32", cpu) == "float32"
    assert P.resolve_precision("bfloat16", cpu) == "bfloat16"
    assert P.autocast_dtype("float32", cpu) is None and P.autocast_dtype("bfloat16", cpu) is torch.bfloat16
    with pytest.raises(UserInputError, match="precision"):
        P.resolve_precision("half", cpu)


def test_calibration_measures_both_precisions_and_they_agree():
    record = P.calibrate("cpu", steps=1, size=(8, 16, 16), channels=16)
    assert record["float32_s"] > 0 and record["bfloat16_s"] > 0
    assert record["relative_error"] < P.MAX_RELATIVE_ERROR
    assert record["bfloat16"] == (record["speedup"] >= P.MIN_SPEEDUP)


def test_auto_without_bf16_units_is_float32_without_calibrating(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: None)
    monkeypatch.setattr(P, "calibrate", lambda *a, **k: pytest.fail("calibrated a CPU without bfloat16 units"))
    assert P.resolve_precision("auto", torch.device("cpu")) == "float32"


@pytest.mark.parametrize("faster", [True, False])
def test_auto_with_bf16_units_follows_the_cached_calibration(monkeypatch, tmp_path, faster):
    monkeypatch.setattr(P, "cpu_bf16_units", lambda: "avx512_bf16")
    calls = []

    def fake(device, **kwargs):
        calls.append(device)
        speedup = 1.6 if faster else 0.4
        return {"float32_s": 1.0, "bfloat16_s": 1.0 / speedup, "speedup": speedup, "relative_error": 0.004,
                "bfloat16": faster}  # fmt: skip

    monkeypatch.setattr(P, "calibrate", fake)
    expected = "bfloat16" if faster else "float32"
    assert P.resolve_precision("auto", torch.device("cpu")) == expected
    assert (tmp_path / "precision.json").is_file()
    monkeypatch.setattr(P, "_RESOLVED", {})  # a new process: the cache answers, no second calibration
    assert P.resolve_precision("auto", torch.device("cpu")) == expected
    assert len(calls) == 1


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_imports_run_down_the_layers():
    """pretrain/ does not reach up into features/; precision.py depends on nothing of the package but errors and
    defaults (which imports nothing)."""
    for path in (PACKAGE / "pretrain").glob("*.py"):
        assert not any(n.startswith("DiffusionSegLib.features") for n in _imports(path)), path.name
    own = {n for n in _imports(PACKAGE / "precision.py") if n.startswith("DiffusionSegLib")}
    assert own <= {"DiffusionSegLib.errors", "DiffusionSegLib.defaults"}
    assert not {n for n in _imports(PACKAGE / "defaults.py") if n.startswith("DiffusionSegLib")}
