"""What pretraining buys, as curves: test Dice of the accuracy benchmark's rows against the backbone's pretraining
steps (0 = random init), one line per method and regime.

Reads ``benchmarks/results/finetune_accuracy/report.json`` (rows of ``finetune_accuracy.py``: the frozen
context-probe rows on the random-init backbone count as 0 steps; the others carry ``backbone_steps``, e.g. rows
run with ``--backbone benchmarks/results/pretraining/diffusion_bpr_20k/backbone_step10000.safetensors --tag 10k``)
and writes ``benchmarks/results/finetune_accuracy/pretraining_curve.png`` and ``.md``. A second panel shows the
15-case fine-tuning runs' learning curves (held-out mean Dice against minutes, from each run's ``train.json``):
what pretraining buys may be speed rather than the end point.

    .venv/bin/python benchmarks/pretraining_curve.py
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from finetune_accuracy import BUDGETS, default_timesteps, machine_label

OUT = Path(__file__).resolve().parent / "results" / "finetune_accuracy"
FAMILIES = {"frozen_context": "frozen context probe", "frozen_context_random": "frozen context probe",
            "pretrained": "fine-tuned", "random": "fine-tuned"}  # fmt: skip


def _pretraining_steps(row: dict) -> int | None:
    """The row's backbone pretraining steps; 0 for the random-init rows; None for backbones pretrained with another
    diffusion T than the shipped default's (another curve: the timestep ablation's backbones) and for rows of
    another budget or trained on a CPU without AMX."""
    if row.get("backbone_timesteps") not in (None, default_timesteps()):
        return None
    if row["budget"] != BUDGETS[row["regime"]] or machine_label(row):  # another budget or machine: not comparable
        return None
    return 0 if row["method"] in ("frozen_context_random", "random") else row.get("backbone_steps")


def points(rows: list[dict]) -> dict[tuple[str, str], list[tuple[int, float, str]]]:
    """(family, regime/draw) -> [(pretraining steps, mean Dice, row name)], sorted by steps."""
    curves: dict[tuple[str, str], list[tuple[int, float, str]]] = defaultdict(list)
    for row in rows:
        family = FAMILIES.get(row["method"])
        if family is None:
            continue
        steps = _pretraining_steps(row)
        if steps is None:
            continue
        setting = row["regime"] if row["regime"] == "full" else f"2 cases, draw {row['draw']}"
        curves[(family, setting)].append((int(steps), float(row["groups"]["mean"]), row["name"]))
    return {key: sorted(value) for key, value in sorted(curves.items())}


def _measured(value) -> bool:
    return value is not None and not math.isnan(value)  # NaN: no held-out volume


def learning_curves(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Row name -> [(minutes, held-out mean Dice)] of the full-regime fine-tuning rows."""
    curves = {}
    for row in rows:
        if row["regime"] != "full" or row["method"] not in ("pretrained", "random") or _pretraining_steps(row) is None:
            continue
        train = OUT / "runs" / row["name"] / "train.json"
        if not train.is_file():
            continue
        history = json.loads(train.read_text())["history"]
        values = [(h["minutes"], h["val_dice"]) for h in history if _measured(h.get("val_dice"))]
        if values:
            curves[f"{_pretraining_steps(row)} pretraining steps ({row['name']})"] = values
    return curves


def main() -> int:
    rows = json.loads((OUT / "report.json").read_text())
    curves = points(rows)
    fig, (ax, learning) = plt.subplots(1, 2, figsize=(13, 4.5))
    lines = ["# Test mean Dice (13 organs, 5 test cases) against pretraining steps", "",
             "| method | training cases | pretraining steps | mean Dice | row |", "|---|---|---:|---:|---|"]  # fmt: skip
    for (family, setting), values in curves.items():
        ax.plot([v[0] for v in values], [v[1] for v in values], marker="o", label=f"{family}, {setting}")
        lines += [f"| {family} | {setting} | {steps} | {dice:.3f} | {name} |" for steps, dice, name in values]
    ax.set_xlabel("diffusion + BPR pretraining steps (0: random init)")
    ax.set_ylabel("test mean Dice (13 BTCV organs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lines += ["", "Fine-tuning on the 15 training cases: held-out (btcv_0029) mean Dice against minutes", "",
              "| run | 5 min | 10 min | 20 min | 40 min | best |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, values in learning_curves(rows).items():
        learning.plot([v[0] for v in values], [v[1] for v in values], marker=".", label=label)
        at = [next((d for m, d in reversed(values) if m <= limit + 0.5), float("nan")) for limit in (5, 10, 20, 40)]
        lines.append(f"| {label} | " + " | ".join(f"{d:.3f}" for d in at) + f" | {max(d for _, d in values):.3f} |")
    learning.set_xlabel("fine-tuning minutes (2 CPU cores)")
    learning.set_ylabel("held-out mean Dice (btcv_0029, working grid)")
    learning.grid(alpha=0.3)
    learning.legend(fontsize=8)
    fig.savefig(OUT / "pretraining_curve.png", dpi=100, bbox_inches="tight")
    (OUT / "pretraining_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
