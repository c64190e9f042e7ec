"""External test of the shipped models: segment 3D-IRCADb scans (never used in training) and score the organs
their manual masks hold that the probe knows (spleen, kidneys, liver), on each case's own grid.

    python benchmarks/shipped_probe_external.py [--probe P] [--backbone B] [--data ../shared/data/labeled]

Writes ``benchmarks/results/shipped_probe_external.{json,md}`` (scores only; no image or mask is written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("DIFFUSIONSEG_DATA", REPO.parent / "shared" / "data"))


def main(argv: list[str] | None = None) -> dict:
    import SimpleITK as sitk

    from DiffusionSegLib.data.datasets import find_labeled_cases
    from DiffusionSegLib.data.volume import read_volume
    from DiffusionSegLib.evaluate.metrics import organ_metrics
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import find_probe_backbone, load_probe, segment
    from DiffusionSegLib.resources import default_probe_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probe", type=Path, default=None, help="probe or model (default: the shipped default)")
    parser.add_argument("--backbone", type=Path, default=None, help="its backbone (default: found by hash)")
    parser.add_argument("--data", type=Path, default=DATA / "labeled", help="folder with the ircadb* cases")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    args = parser.parse_args(argv)
    probe_path = args.probe or default_probe_path()
    backbone = load_backbone(args.backbone or find_probe_backbone(probe_path))
    probe = load_probe(probe_path, backbone)
    cases = [c for c in find_labeled_cases(args.data, "organs") if c.case_id.startswith("ircadb")]
    if not cases:
        parser.error(f"no 3D-IRCADb cases in {args.data}")
    rows = []
    for case in cases:
        ct, reference = read_volume(case.image), read_volume(case.label)
        present = set(np.unique(sitk.GetArrayViewFromImage(reference)).tolist())  # legends also list absent organs
        ids = {organ.value for organ in case.labels} & present
        shared = [organ for organ in probe.labels if organ.value in ids]
        start = time.perf_counter()
        result = segment(ct, probe, backbone, largest_component=True)
        seconds = time.perf_counter() - start
        metrics = organ_metrics(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(reference),
                                shared, reference.GetSpacing())  # fmt: skip
        rows.append({"case": case.case_id, "seconds": seconds, "metrics": metrics})
        print(case.case_id, ", ".join(f"{k} {v['dice']:.3f}" for k, v in metrics.items()), f"({seconds:.1f} s)",
              flush=True)  # fmt: skip
    lines = ["# Shipped probe on 3D-IRCADb (external test, manual masks)", "",
             f"`python benchmarks/shipped_probe_external.py {' '.join(sys.argv[1:] if argv is None else argv)}` — "
             f"probe `{probe_path.name}`, backbone `{Path(backbone.path).name}`, largest component per organ.", "",
             "| case | organ | Dice | HD95 (mm) |", "| --- | --- | ---: | ---: |"]  # fmt: skip
    for row in rows:
        for organ, m in row["metrics"].items():
            hd = "–" if m["hd95_mm"] is None or not np.isfinite(m["hd95_mm"]) else f"{m['hd95_mm']:.1f}"
            lines.append(f"| {row['case']} | {organ} | {m['dice']:.3f} | {hd} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shipped_probe_external.md").write_text("\n".join(lines) + "\n")
    (args.out / "shipped_probe_external.json").write_text(json.dumps(rows, indent=2, default=float) + "\n")
    print(f"wrote {args.out / 'shipped_probe_external.md'}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
