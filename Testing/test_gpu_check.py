"""``benchmarks/gpu_check.sh`` (the one-call GPU check) runs end to end: its ``--tiny`` CPU mode, every stage on
real data, into one folder with its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import DATA, missing

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_every_stage_into_one_folder(tmp_path):
    if not (DATA / "btcv").is_dir():
        missing(f"BTCV scans not found in {DATA}")
    out = tmp_path / "check"
    env = {**os.environ, "PY": sys.executable, "DIFFUSIONSEG_DATA": str(DATA)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--tiny", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["environment", "segment_speed", "cohort_finetune", "cohort_segment", "cohort_score",
                            "tests"]  # fmt: skip
    assert all(s["status"] == "ok" for s in stages.values()) and summary["tiny"] and not summary["failed"]
    assert stages["environment"]["result"]["torch"]
    assert (out / "segment_speed_cpu.json").is_file() and (out / "cohort_model.safetensors").is_file()
    assert 0 <= stages["cohort_score"]["result"]["mean_dice"] <= 1
    assert "passed" in stages["tests"]["result"] and "failed" not in stages["tests"]["result"]
    assert "| cohort_finetune | ok |" in (out / "summary.md").read_text()
