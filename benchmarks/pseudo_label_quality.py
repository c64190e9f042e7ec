"""How good are the cohort rows' pseudo-labels? (Analysis only: reads the pool scans' manual labels, which the
cohort method itself never opens.)

For a few-shot draw of ``finetune_accuracy.py`` (its 2 labeled scans), each of the first ``--cases`` unlabeled
pool scans gets the registrations the cohort row uses (``finetune_accuracy.REGISTRATIONS``; missing ones are
computed and cached there, each with the seconds it took). Their warped labels are fused by every method
fine-tuning offers (``FinetuneConfig.pseudo_fusion``): ``agreement`` and ``weighted-vote`` (unsure voxels count
as no organ), next to each single atlas and, with ``--jlf``, joint label fusion (the registration anchor's fusion,
``registration_anchor.fuse``). Each is scored on the scan's working grid against its manual labels: 13-organ
mean Dice over the organs the scan shows, the share of voxels labeled and the organ recall.

    .venv/bin/python benchmarks/pseudo_label_quality.py --draws 0 1 --cases 6 [--jlf]

Results: ``benchmarks/results/finetune_accuracy/pseudo_label_quality.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_accuracy as bench
from registration_anchor import _prepared, _scan
from registration_anchor import fuse as anchor_fusion

RESULT = bench.OUT / "pseudo_label_quality"


def scores(classes: np.ndarray, truth: np.ndarray, ignore: int, organs: int) -> dict:
    """Mean Dice over the organs ``truth`` shows, share labeled and organ recall of one pseudo-label map."""
    present = [k for k in range(1, organs + 1) if (truth == k).any()]
    dice = {k: float(2 * ((classes == k) & (truth == k)).sum() / ((classes == k).sum() + (truth == k).sum()))
            for k in present}  # fmt: skip
    recall = float(((classes == truth) & (truth > 0)).sum() / max(int((truth > 0).sum()), 1))
    return {"mean_dice": float(np.mean(list(dice.values()))), "dice": dice,
            "labeled": float((classes != ignore).mean()), "organ_recall": recall}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cases", type=int, default=6, help="pool scans per draw (the first in sorted order)")
    parser.add_argument("--jlf", action="store_true", help="also joint label fusion (~2 min a scan on 2 cores)")
    args = parser.parse_args()

    from DiffusionSegLib.cohort.pseudo_labels import PropagationCache, fuse, propagate
    from DiffusionSegLib.cohort.registration import RegistrationConfig, windowed
    from DiffusionSegLib.data.datasets import find_labeled_cases
    from DiffusionSegLib.data.labels import BTCV_LABELS
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe.sampling import IGNORE

    found = {c.case_id: c for c in find_labeled_cases(bench.DATA / "btcv")}
    training, _ = bench.split(list(found))  # the test cases are never opened here
    backbone = load_backbone(bench.REPO / "Resources" / "Models" / "backbone_default.safetensors")
    cache = PropagationCache(bench.REGISTRATIONS)
    out_file = RESULT.with_suffix(".json")
    results = json.loads(out_file.read_text()) if out_file.is_file() else {}
    for draw in args.draws:
        atlas_ids = bench.run_cases("fewshot", draw, training)
        atlases = [_prepared(found[c], backbone, BTCV_LABELS, True)[0] for c in atlas_ids]
        cfg = RegistrationConfig(seed=draw)  # the cohort row's seed is its draw
        pool = bench.cohort_cases({"method": "cohort", "regime": "fewshot", "draw": draw}, training)[: args.cases]
        per_case = {}
        for case in pool:
            target = _prepared(found[case], backbone, BTCV_LABELS, True)[0]
            row = propagate([_scan(target)], [(_scan(a), a.classes) for a in atlases], cfg, cache=cache,
                            progress=False)[0]  # fmt: skip
            truth, spacing = target.classes, target.working.GetSpacing()[::-1]
            image = windowed(target.working, cfg.window_hu)
            methods = {m: fuse(row, image, IGNORE, m, spacing_mm=spacing) for m in ("agreement", "weighted-vote")}
            for atlas_id, propagation in zip(atlas_ids, row, strict=True):
                methods[f"atlas {atlas_id} alone"] = propagation.classes
            started = time.perf_counter()
            if args.jlf:
                methods["joint label fusion (anchor)"] = anchor_fusion(target, row, "jlf")[0]
            per_case[case] = {m: scores(c, truth, IGNORE, len(BTCV_LABELS)) for m, c in methods.items()}
            per_case[case]["registration_s"] = sum(p.seconds for p in row)
            per_case[case]["jlf_s"] = time.perf_counter() - started if args.jlf else None
            print(f"d{draw} {case}: " + ", ".join(f"{m} {s['mean_dice']:.3f}" for m, s in per_case[case].items()
                                                  if isinstance(s, dict)), flush=True)  # fmt: skip
        names = [m for m in per_case[pool[0]] if isinstance(per_case[pool[0]][m], dict)]
        results[f"d{draw}"] = {
            "atlases": atlas_ids, "pool": pool, "registration": cfg.to_dict(),
            "mean": {m: {k: float(np.mean([per_case[c][m][k] for c in pool])) for k in ("mean_dice", "labeled",
                                                                                      "organ_recall")}
                     for m in names},
            "per_case": per_case}  # fmt: skip
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(results, indent=1))
    write_markdown(results, out_file.with_suffix(".md"))
    return 0


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# Pseudo-label quality on the unlabeled pool scans",
             "",
             "Each fusion of the 2 labeled scans' registrations, scored against the pool scans' manual labels "
             "(which the cohort method never reads) on the working grid: 13-organ mean Dice over the organs each "
             "scan shows (unsure voxels count as no organ), share of voxels labeled, organ recall. Produced by "
             "`benchmarks/pseudo_label_quality.py`.", ""]  # fmt: skip
    for draw, result in results.items():
        lines += [f"## {draw}: labeled {' + '.join(result['atlases'])}, pool {', '.join(result['pool'])}", "",
                  "| fusion | mean Dice | labeled | organ recall |", "|---|---:|---:|---:|"]  # fmt: skip
        for method, m in sorted(result["mean"].items(), key=lambda kv: -kv[1]["mean_dice"]):
            lines.append(f"| {method} | {m['mean_dice']:.3f} | {m['labeled']:.2f} | {m['organ_recall']:.3f} |")
        lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
