"""Choose between fine-tuning settings without the test cases: score few-shot models on training-pool cases they
were not trained on (the benchmark's 15 training cases minus each model's own), never on the 5 test cases.
Full-regime models saw the whole pool; they are scored on their held-out case (btcv_0029, the last of their
cases), which chose their checkpoint but was never trained on.

    .venv/bin/python benchmarks/finetune_select.py ROW [ROW ...] [--cases 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_accuracy as bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", help="benchmark rows (run folders) to compare")
    parser.add_argument("--cases", type=int, default=3, help="validation cases per model (default 3)")
    args = parser.parse_args()
    from DiffusionSegLib.checkpoint import file_sha256
    from DiffusionSegLib.data.datasets import find_labeled_cases
    from DiffusionSegLib.data.labels import BTCV_LABELS

    found = {c.case_id: c for c in find_labeled_cases(bench.DATA / "btcv")}
    training, _ = bench.split(list(found))
    record = bench.OUT / "selection.json"
    results = json.loads(record.read_text()) if record.is_file() else {}
    for row in args.rows:
        folder = bench.OUT / "runs" / row
        used = json.loads((folder / "key.json").read_text())["cases"]
        validation = [c for c in training if c not in used][: args.cases] or used[-1:]
        model = next(p for p in (folder / "model.safetensors", folder / "model.pt") if p.is_file())
        scores = bench.evaluate(model, [(c, found[c].image, found[c].label, BTCV_LABELS) for c in validation], [])
        results[row] = {"cases": validation, "model_sha256": file_sha256(model),
                        "mean": float(np.mean([s["groups"]["mean"] for s in scores["test"].values()]))}
        print(row, results[row], flush=True)
    record.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
