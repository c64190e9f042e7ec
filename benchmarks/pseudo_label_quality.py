"""How good are the cohort rows' pseudo-labels? (Analysis only: reads the pool scans' manual labels, which the
cohort method itself never opens.)

For a few-shot draw of ``finetune_accuracy.py``, each of its 13 unlabeled pool scans gets the registrations the
cohort row used (from ``finetune_accuracy.REGISTRATIONS``; run the row first), fused by agreement; printed per scan:
the share of voxels labeled, the precision of the labeled organ voxels, the share of true organ voxels that got
their organ, and each single atlas's mean Dice.

    .venv/bin/python benchmarks/pseudo_label_quality.py DRAW
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_accuracy as bench
from registration_anchor import _prepared, _scan


def main() -> int:
    from DiffusionSegLib.cohort.pseudo_labels import PropagationCache, fuse_by_agreement, propagation_key
    from DiffusionSegLib.cohort.registration import RegistrationConfig
    from DiffusionSegLib.data.datasets import find_labeled_cases
    from DiffusionSegLib.data.labels import BTCV_LABELS
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe.sampling import IGNORE

    draw = int(sys.argv[1])
    found = {c.case_id: c for c in find_labeled_cases(bench.DATA / "btcv")}
    training, _ = bench.split(list(found))
    backbone = load_backbone(bench.REPO / "Resources" / "Models" / "backbone_default.safetensors")
    atlases = [_prepared(found[c], backbone, BTCV_LABELS, True)[0] for c in bench.run_cases("fewshot", draw, training)]
    cache, cfg = PropagationCache(bench.REGISTRATIONS), RegistrationConfig(seed=draw)  # the row's seed is its draw
    rows = []
    for case in bench.cohort_cases({"method": "cohort", "regime": "fewshot", "draw": draw}, training):
        target = _prepared(found[case], backbone, BTCV_LABELS, True)[0]
        found_props = [cache.get(propagation_key(_scan(target), _scan(a), a.classes, cfg)) for a in atlases]
        if any(p is None for p in found_props):
            print(case, "not registered yet (run the cohort row first)")
            continue
        fused, truth = fuse_by_agreement(found_props, IGNORE), target.classes
        organ = (fused != IGNORE) & (fused > 0)
        precision = float((fused[organ] == truth[organ]).mean()) if organ.any() else float("nan")
        recall = float(((fused == truth) & (truth > 0)).sum() / max(int((truth > 0).sum()), 1))
        single = [float(np.mean([2 * ((p.classes == k) & (truth == k)).sum() / max((p.classes == k).sum()
                                                                                 + (truth == k).sum(), 1)
                                 for k in range(1, len(BTCV_LABELS) + 1) if (truth == k).any()]))
                  for p in found_props]  # fmt: skip
        rows.append((float((fused != IGNORE).mean()), precision, recall, *single))
        print(f"{case}: labeled {rows[-1][0]:.2f}, organ precision {precision:.3f}, organ recall {recall:.3f}, "
              "single-atlas Dice " + " / ".join(f"{d:.3f}" for d in single), flush=True)  # fmt: skip
    if rows:
        means = np.mean(rows, axis=0)
        print(f"mean: labeled {means[0]:.2f}, organ precision {means[1]:.3f}, organ recall {means[2]:.3f}, "
              "single-atlas Dice " + " / ".join(f"{d:.3f}" for d in means[3:]))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
