"""Which weight of the network should ``segment`` give a scan of the model's training cohort? (Chooses
``DiffusionSegLib.defaults.COHORT_FUSION_WEIGHT`` on training data only.)

For few-shot draws d0 and d1 of ``finetune_accuracy.py``, the pool-cohort model ``cohort_margin_fewshot_d<draw>``
(2 labeled pool scans, the 13 other pool scans as its unlabeled cohort) segments pool scans of its cohort, and its
class probabilities on the working grid are fused with the scan's registrations as ``segment`` does
(:mod:`DiffusionSegLib.cohort.fusion`: the locally weighted vote of the cached registrations of the draw's 2
labeled scans, ``RegistrationConfig(seed=draw)``): ``p = w · p_network + (1 − w) · p_registration``, argmax. Each
``w`` is scored against the pool scans' manual labels (read here only to score; the cohort method never reads
them) on the working grid: 13-organ mean Dice over the organs the scan shows (no largest-component clean-up). The
5 test scans are never opened.

The working image ``segment`` prepares for the fine-tuned model (``prepare_volume(image,
backbone.pretrain.preprocess)``) is checked to be the one ``finetune`` registered on (same cohort-file key).

    .venv/bin/python benchmarks/cohort_fusion.py --runs RUNS_DIR --cache REGISTRATIONS_DIR

Registrations are read from ``--cache`` only (a missing one is an error; nothing is written there). Results:
``benchmarks/results/finetune_accuracy/cohort_fusion.{json,md}``.
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

RESULT = bench.OUT / "cohort_fusion"
WEIGHTS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
POOL_SCANS = ("btcv_0001", "btcv_0002", "btcv_0003", "btcv_0005", "btcv_0006", "btcv_0007")


def mean_dice(classes: np.ndarray, truth: np.ndarray, organs: int) -> float:
    """Mean Dice over the organs ``truth`` shows (an organ the prediction misses scores 0)."""
    scores = [2.0 * float(((classes == k) & (truth == k)).sum()) / float((classes == k).sum() + (truth == k).sum())
              for k in range(1, organs + 1) if (truth == k).any()]  # fmt: skip
    return float(np.mean(scores))


def network_probabilities(image, probe, backbone) -> tuple[np.ndarray, object]:
    """The model's softmax on its working grid, computed as ``segment`` does (prepare, BPR coordinates, sliding
    window of backbone and head), and the prepared volume."""
    import torch

    from DiffusionSegLib.features import FeatureExtractor, PyramidPredictor, bpr_coordinates, build_inputs
    from DiffusionSegLib.features import resolve_device, sliding_window_apply
    from DiffusionSegLib.precision import autocast_context, resolve_precision
    from DiffusionSegLib.preprocess import prepare_volume

    cfg = probe.config.feature_config()
    compute = resolve_device(cfg.device)
    precision = resolve_precision("auto", compute)
    prepared = prepare_volume(image, backbone.pretrain.preprocess)
    with torch.no_grad(), autocast_context(precision, compute):
        coords = bpr_coordinates(prepared.image, backbone, None, compute) if backbone.use_bpr else None
    inputs = build_inputs(prepared.image, backbone, cfg, coords=coords, device=compute)
    extractor = FeatureExtractor(backbone, cfg, inputs.num_coords).to(compute)
    head = probe.head.to(compute).eval()
    predictor = PyramidPredictor(extractor, lambda pyramid: head(pyramid), disagreement=False,
                                 groups=[probe.num_classes])  # fmt: skip
    with torch.no_grad(), autocast_context(precision, compute):
        logits = sliding_window_apply(inputs, predictor, backbone, cfg, out_channels=probe.num_classes)
    return torch.softmax(logits[0].float(), dim=0).numpy(), prepared


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", type=Path, default=bench.OUT / "runs", help="folder of the benchmark's run folders")
    parser.add_argument("--cache", type=Path, default=bench.REGISTRATIONS, help="the registration cache (read only)")
    parser.add_argument("--scans", nargs="+", default=list(POOL_SCANS), help="pool scans of the cohort to score")
    args = parser.parse_args()

    from DiffusionSegLib.cohort.fusion import fuse_with_network, registration_vote, working_key
    from DiffusionSegLib.cohort.pseudo_labels import PropagationCache, propagation_key
    from DiffusionSegLib.cohort.registration import RegistrationConfig, windowed
    from DiffusionSegLib.data.datasets import find_labeled_cases
    from DiffusionSegLib.data.labels import BTCV_LABELS
    from DiffusionSegLib.data.volume import read_volume
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import load_probe

    found = {c.case_id: c for c in find_labeled_cases(bench.DATA / "btcv")}
    training, test = bench.split(list(found))
    if set(args.scans) & set(test) or not set(args.scans) <= set(training):
        raise SystemExit(f"only pool scans choose the weight; not {sorted(set(args.scans) - set(training))}")
    base = load_backbone(bench.REPO / "Resources" / "Models" / "backbone_default.safetensors")
    cache = PropagationCache(args.cache)
    organs = len(BTCV_LABELS)
    results = {"weights": list(WEIGHTS), "draws": {}}
    started = time.perf_counter()
    for draw in args.draws:
        row = {"method": "cohort_margin", "regime": "fewshot", "draw": draw}
        atlas_ids = bench.run_cases("fewshot", draw, training)
        cohort = bench.cohort_cases(row, training)
        scans = [c for c in args.scans if c in cohort]
        folder = args.runs / f"cohort_margin_fewshot_d{draw}"
        key = json.loads((folder / "key.json").read_text())
        assert key["cases"] == atlas_ids and key["unlabeled"] == cohort, (key["cases"], atlas_ids)
        trained = load_backbone(folder / "model.backbone.safetensors")
        probe = load_probe(folder / "model.safetensors", trained)
        atlases = [_prepared(found[c], base, BTCV_LABELS, True)[0] for c in atlas_ids]
        cfg = RegistrationConfig(seed=draw)  # the cohort row's seed is its draw
        per_scan = {}
        for case in scans:
            target = _prepared(found[case], base, BTCV_LABELS, True)[0]  # as finetune prepared the cohort scan
            row_results = []
            for atlas in atlases:
                cached = cache.get(propagation_key(_scan(target), _scan(atlas), atlas.classes, cfg))
                if cached is None:
                    raise SystemExit(f"registration of {atlas.name} onto {case} (seed {draw}) is not in {args.cache}")
                row_results.append(cached)
            probabilities, prepared = network_probabilities(read_volume(found[case].image), probe, trained)
            same_grid = working_key(prepared.image) == working_key(target.working)
            assert same_grid, f"{case}: segment's working image is not the one finetune registered on"
            spacing = target.working.GetSpacing()[::-1]
            vote = registration_vote(row_results, windowed(target.working, cfg.window_hu), spacing_mm=spacing)
            truth = target.classes
            scores = {f"{w:g}": mean_dice(fuse_with_network(probabilities.copy(), vote, w).argmax(0), truth, organs)
                      for w in WEIGHTS}  # fmt: skip
            per_scan[case] = {"dice": scores, "same_working_image": same_grid}
            print(f"d{draw} {case}: " + ", ".join(f"w={w} {s:.3f}" for w, s in scores.items()), flush=True)
        results["draws"][f"d{draw}"] = {
            "atlases": atlas_ids, "scans": scans, "registration": cfg.to_dict(),
            "model": str(folder.name),
            "mean": {f"{w:g}": float(np.mean([per_scan[c]["dice"][f"{w:g}"] for c in scans])) for w in WEIGHTS},
            "per_scan": per_scan}  # fmt: skip
    results["mean"] = {f"{w:g}": float(np.mean([d["mean"][f"{w:g}"] for d in results["draws"].values()]))
                       for w in WEIGHTS}  # fmt: skip
    results["best_weight"] = float(max(WEIGHTS, key=lambda w: results["mean"][f"{w:g}"]))
    results["seconds"] = time.perf_counter() - started
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_markdown(results, RESULT.with_suffix(".md"))
    print(f"best w = {results['best_weight']:g}", flush=True)
    return 0


def write_markdown(results: dict, path: Path) -> None:
    weights = [f"{w:g}" for w in results["weights"]]
    lines = ["# Cohort fusion: the network's weight for scans of its training cohort", "",
             "`segment` of a scan in the model's training cohort mixes `p = w · p_network + (1 − w) · "
             "p_registration` on the working grid (the registrations' locally weighted vote: the winning class its "
             "share, the runner-up the rest). Model: `cohort_margin_fewshot_d<draw>` of `finetune_accuracy.py` (2 "
             "labeled pool scans, the 13 other pool scans unlabeled); scored on cohort pool scans against their "
             "manual labels (13-organ mean Dice over the organs each scan shows, working grid, no largest-component "
             "clean-up). w = 1 is the network alone, w = 0 the registrations alone (the network only where no atlas "
             "voted). The 5 test scans are never opened. Produced by `benchmarks/cohort_fusion.py`.", "",
             "| draw (labeled scans) | " + " | ".join(f"w = {w}" for w in weights) + " |",
             "|---|" + "---:|" * len(weights)]  # fmt: skip
    for draw, result in results["draws"].items():
        best = max(weights, key=lambda w: result["mean"][w])
        lines.append(f"| {draw} ({' + '.join(result['atlases'])}; {len(result['scans'])} scans) | "
                     + " | ".join(f"**{result['mean'][w]:.3f}**" if w == best else f"{result['mean'][w]:.3f}"
                                  for w in weights) + " |")  # fmt: skip
    best = f"{results['best_weight']:g}"
    lines.append("| **mean** | " + " | ".join(f"**{results['mean'][w]:.3f}**" if w == best
                                              else f"{results['mean'][w]:.3f}" for w in weights) + " |")  # fmt: skip
    lines += ["", f"Best: w = {best} ({results['mean'][best]:.3f} against {results['mean']['1']:.3f} for the network "
              f"alone and {results['mean']['0']:.3f} for the registrations alone). Scans: "
              + "; ".join(f"{d}: {', '.join(r['scans'])}" for d, r in results["draws"].items()) + ".", "",
              "Per scan:", "", "| draw | scan | " + " | ".join(f"w = {w}" for w in weights) + " |",
              "|---|---|" + "---:|" * len(weights)]  # fmt: skip
    for draw, result in results["draws"].items():
        for case, scan in result["per_scan"].items():
            lines.append(f"| {draw} | {case} | " + " | ".join(f"{scan['dice'][w]:.3f}" for w in weights) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
