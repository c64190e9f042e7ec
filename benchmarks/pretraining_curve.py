"""What pretraining buys, as curves: test Dice of the accuracy benchmark's rows against the backbone's pretraining
steps (0 = random init), one line per method and regime.

Reads ``benchmarks/results/finetune_accuracy/report.json`` (rows of ``finetune_accuracy.py``: the frozen
context-probe rows on the random-init backbone count as 0 steps; the others carry ``backbone_steps``, e.g. rows
run with ``--backbone benchmarks/results/pretraining/diffusion_bpr_20k/backbone_step10000.safetensors --tag 10k``)
and writes ``benchmarks/results/finetune_accuracy/pretraining_curve.png`` and ``.md``.

    .venv/bin/python benchmarks/pretraining_curve.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OUT = Path(__file__).resolve().parent / "results" / "finetune_accuracy"
FAMILIES = {"frozen_context": "frozen context probe", "frozen_context_random": "frozen context probe",
            "pretrained": "fine-tuned", "random": "fine-tuned"}  # fmt: skip


def points(rows: list[dict]) -> dict[tuple[str, str], list[tuple[int, float, str]]]:
    """(family, regime/draw) -> [(pretraining steps, mean Dice, row name)], sorted by steps."""
    curves: dict[tuple[str, str], list[tuple[int, float, str]]] = defaultdict(list)
    for row in rows:
        family = FAMILIES.get(row["method"])
        if family is None:
            continue
        random_init = row["method"] in ("frozen_context_random", "random")
        steps = 0 if random_init else row.get("backbone_steps")
        if steps is None:
            continue
        setting = row["regime"] if row["regime"] == "full" else f"2 cases, draw {row['draw']}"
        curves[(family, setting)].append((int(steps), float(row["groups"]["mean"]), row["name"]))
    return {key: sorted(value) for key, value in sorted(curves.items())}


def main() -> int:
    rows = json.loads((OUT / "report.json").read_text())
    curves = points(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = ["# Test mean Dice (13 organs, 5 test cases) against pretraining steps", "",
             "| method | training cases | pretraining steps | mean Dice | row |", "|---|---|---:|---:|---|"]  # fmt: skip
    for (family, setting), values in curves.items():
        ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=f"{family}, {setting}")
        lines += [f"| {family} | {setting} | {steps} | {dice:.3f} | {name} |" for steps, dice, name in values]
    ax.set_xlabel("diffusion + BPR pretraining steps (0: random init)")
    ax.set_ylabel("test mean Dice (13 BTCV organs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(OUT / "pretraining_curve.png", dpi=100, bbox_inches="tight")
    (OUT / "pretraining_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
