"""The 2-atlas registration anchor of the few-shot benchmark: what a Slicer user can do with no training at all.

For each few-shot draw of ``finetune_accuracy.py`` (the same 2 labeled pool scans), each labeled scan is
registered to each test scan with ANTs (affine then SyN, Mattes mutual information; BPR-coordinate start,
:mod:`DiffusionSegLib.cohort.registration`) on the 3 mm working grid, intensities windowed to [-125, 275] HU and
scaled to [0, 1]; the warped labels are fused by joint label fusion (``ants.joint_label_fusion``, Wang et al.
2013; ``max_lab_plus_one=True``, inside the target's body), taken back to the test scan's original grid label by
label and scored as every benchmark row is (Dice per organ, 13 organs). A 1-atlas row per 1-scan draw takes the
single warped map as it is.

Registrations are shared with the cohort rows through ``finetune_accuracy.REGISTRATIONS`` (each keeps the
seconds it took). Results: ``benchmarks/results/finetune_accuracy/registration_anchor.{json,md}``.

    .venv/bin/python benchmarks/registration_anchor.py [--draws 0 1 2 3] [--fusion jlf|agreement|vote]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_accuracy as bench

log = logging.getLogger("registration_anchor")
RESULT = bench.OUT / "registration_anchor"


def _prepared(case, backbone, labels, with_labels: bool):
    """A case on the fine-tuning working grid: (LabeledVolume, PreparedVolume), coordinates from the backbone's BPR."""
    import SimpleITK as sitk

    from DiffusionSegLib.data.volume import read_volume
    from DiffusionSegLib.features import FeatureConfig
    from DiffusionSegLib.finetune import FinetuneConfig
    from DiffusionSegLib.finetune.train import finetune_backbone_bundle
    from DiffusionSegLib.preprocess import prepare_volume
    from DiffusionSegLib.probe.sampling import prepare_labeled_volume

    trainable = finetune_backbone_bundle(backbone, FinetuneConfig())
    image = read_volume(case.image)
    label = read_volume(case.label) if with_labels else sitk.Image(image.GetSize(), sitk.sitkUInt8)
    if not with_labels:
        label.CopyInformation(image)
    volume = prepare_labeled_volume(image, label, labels, trainable, FeatureConfig(timestep=0), case.case_id)
    return volume, prepare_volume(image, trainable.pretrain.preprocess), image


def _scan(volume):
    from DiffusionSegLib.cohort.pseudo_labels import volume_scan

    return volume_scan(volume)


def fuse(target_volume, propagations, method: str) -> tuple[np.ndarray, float]:
    """One class map on the target's working grid from the warped atlases, and the seconds the fusion took."""
    import ants
    import SimpleITK as sitk

    from DiffusionSegLib.cohort.registration import ants_image, windowed
    from DiffusionSegLib.probe.sampling import IGNORE

    started = time.perf_counter()
    if len(propagations) == 1:
        return propagations[0].classes, 0.0
    if method == "agreement":
        from DiffusionSegLib.cohort.pseudo_labels import fuse_by_agreement

        fused = fuse_by_agreement(propagations, IGNORE)
        return np.where(fused == IGNORE, 0, fused).astype(np.uint8), time.perf_counter() - started
    if method == "vote":  # per voxel the most frequent class (ties: the first atlas's)
        stack = np.stack([p.classes for p in propagations])
        counts = np.stack([(stack == c).sum(0) for c in range(int(stack.max()) + 1)])
        return counts.argmax(0).astype(np.uint8), time.perf_counter() - started
    image = target_volume.working
    target = ants_image(windowed(image, (-125.0, 275.0)), image)
    mask = ants_image(sitk.GetArrayViewFromImage(image) > -100.0, image)
    result = ants.joint_label_fusion(target, mask, atlas_list=[ants_image(p.image, image) for p in propagations],
                                     beta=4, rad=2, label_list=[ants_image(p.classes, image) for p in propagations],
                                     max_lab_plus_one=True)  # fmt: skip
    fused = np.ascontiguousarray(result["segmentation"].numpy().transpose(2, 1, 0)).round().astype(np.int64)
    # the segmentation holds the atlases' label values (class indices here); max_lab_plus_one gives background
    # the value max + 1 inside the mask
    top = max(int(p.classes.max()) for p in propagations)
    fused[(fused > top) | (fused < 0)] = 0
    return fused.astype(np.uint8), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, nargs="*", default=list(bench.DRAWS))
    parser.add_argument("--one-scan-draws", type=int, nargs="*", default=list(bench.ONE_SCAN_DRAWS))
    parser.add_argument("--fusion", default="jlf", choices=("jlf", "agreement", "vote"))
    parser.add_argument("--bpr-start", default=1, type=int, choices=(0, 1), help="start from BPR coordinates")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import SimpleITK as sitk

    from DiffusionSegLib.cohort.pseudo_labels import PropagationCache, propagate
    from DiffusionSegLib.cohort.registration import RegistrationConfig
    from DiffusionSegLib.data.datasets import find_labeled_cases
    from DiffusionSegLib.data.labels import BTCV_LABELS
    from DiffusionSegLib.evaluate.metrics import organ_metrics, size_group_means
    from DiffusionSegLib.preprocess import to_input_grid
    from DiffusionSegLib.pretrain.export import load_backbone

    found = {c.case_id: c for c in find_labeled_cases(bench.DATA / "btcv")}
    training, test = bench.split(list(found))
    backbone = load_backbone(bench.REPO / "Resources" / "Models" / "backbone_default.safetensors")
    cfg = RegistrationConfig(bpr_start=bool(args.bpr_start))
    cache = PropagationCache(bench.REGISTRATIONS)
    lookup = np.zeros(len(BTCV_LABELS) + 1, dtype=np.int16)
    lookup[1:] = [o.value for o in BTCV_LABELS]
    targets = {c: _prepared(found[c], backbone, BTCV_LABELS, with_labels=False) for c in test}
    rows = [("fewshot", d, bench.run_cases("fewshot", d, training)) for d in args.draws]
    rows += [("oneshot", d, bench.run_cases("oneshot", d, training)) for d in args.one_scan_draws]
    suffix = "" if args.bpr_start else "_comstart"
    out_file = RESULT.with_name(f"{RESULT.name}_{args.fusion}{suffix}.json")
    results = json.loads(out_file.read_text()) if out_file.is_file() else {}
    for regime, draw, atlases_ids in rows:
        name = f"registration_{regime}_d{draw}"
        atlases = [_prepared(found[c], backbone, BTCV_LABELS, with_labels=True)[0] for c in atlases_ids]
        per_case = {}
        for case_id, (volume, prepared, image) in targets.items():
            propagations = propagate([_scan(volume)], [(_scan(a), a.classes) for a in atlases], cfg, cache=cache,
                                     progress=False)[0]  # fmt: skip
            classes, fusion_s = fuse(volume, propagations, args.fusion)
            working = sitk.GetImageFromArray(lookup[classes])
            working.CopyInformation(volume.working)
            labels = to_input_grid(working, prepared, "labels")
            reference = sitk.ReadImage(str(found[case_id].label))
            scores = organ_metrics(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(reference), BTCV_LABELS,
                                   image.GetSpacing())  # fmt: skip
            dice = {o: s["dice"] for o, s in scores.items()}
            registration_s = sum(p.seconds for p in propagations)
            per_case[case_id] = {"dice": dice, "groups": size_group_means(dice), "registration_s": registration_s,
                                 "fusion_s": fusion_s}  # fmt: skip
            log.info("%s %s: mean Dice %.3f (registration %.0f s, fusion %.0f s)", name, case_id,
                     per_case[case_id]["groups"]["mean"], registration_s, fusion_s)  # fmt: skip
        organs = [o.name for o in BTCV_LABELS]
        results[name] = {
            "regime": regime, "draw": draw, "cases": atlases_ids, "fusion": args.fusion, "registration": cfg.to_dict(),
            "mean": float(np.mean([c["groups"]["mean"] for c in per_case.values()])),
            "groups": {g: float(np.nanmean([c["groups"][g] for c in per_case.values()])) for g in ("big", "medium", "small")},
            "per_organ": {o: float(np.nanmean([c["dice"][o] for c in per_case.values()])) for o in organs},
            "seconds_per_scan": float(np.mean([c["registration_s"] + c["fusion_s"] for c in per_case.values()])),
            "per_case": per_case}  # fmt: skip
        log.info("%s: mean Dice %.3f", name, results[name]["mean"])
        out_file.write_text(json.dumps(results, indent=1))
    write_markdown(results, out_file.with_suffix(".md"))
    return 0


def write_markdown(results: dict, path: Path) -> None:
    short = ["spleen", "right kidney", "left kidney", "liver", "stomach", "aorta", "pancreas"]
    lines = ["# Registration anchor (no training), fixed BTCV split, 5 test cases on their original grid", "",
             "Command: `.venv/bin/python benchmarks/registration_anchor.py` (see its docstring).", "",
             "| row | atlases | fusion | s per test scan (2 CPU cores) | Big | Medium | Small | Mean (13) | "
             + " | ".join(short) + " |", "|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(short)]  # fmt: skip
    for name, r in sorted(results.items()):
        g = r["groups"]
        lines.append(f"| {name} | {', '.join(c[-4:] for c in r['cases'])} | {r['fusion'] if len(r['cases']) > 1 else '– (1 atlas)'} | {r['seconds_per_scan']:.0f} "
                     f"| {g['big']:.3f} | {g['medium']:.3f} | {g['small']:.3f} | {r['mean']:.3f} | "
                     + " | ".join(f"{r['per_organ'][o]:.3f}" for o in short) + " |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
