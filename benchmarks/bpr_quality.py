"""Quality of a Body Part Regressor: monotonicity, anatomical consistency and invariance.

Usage::

    python benchmarks/bpr_quality.py [--weights FILE] [--data DIR] [--out DIR] [--quick] [--mode M] [--threads N]

Measured on the real CT of ``../shared/data`` (labels are used for evaluation only):

* **monotonicity** — Spearman ρ between each coordinate channel and the physical position along its axis
  (x R→L, y A→P, z I→S), over body voxels of each scan (BTCV, 3D-IRCADb, unlabeled); goal z ≥ 0.98.
* **anatomical consistency** — each organ's centroid in BPR coordinates, per patient; the spread across patients
  (standard deviation per axis and RMS distance to the mean centroid, mm-equivalent), next to a naive baseline:
  the position normalised by the body's bounding box on the working grid, scaled by the mean body extent (mm).
  The shipped BPR saw the BTCV images (never their labels) in training; 3D-IRCADb was held out.
* **invariance** — the same physical voxel (inside the body) seen (a) in two overlapping fields of view (the
  upper and lower two thirds of the scan, whole pipeline), (b) by the raw network in two single patches shifted
  by half a patch, (c) after resampling the input to another grid (2×2×4 mm, shifted origin), (d) with HU
  clipped to [-125, 275] and quantised to 8 bits like the BTCV copies (slice design, (b): two crops of every
  slice whose centres are 50 mm apart along x and along y, inside the training shifts, and a quarter crop
  (112 mm) apart, beyond them): |Δ| (vector norm, mm-equivalent),
  mean / p95 and the fraction within 5 mm.

Writes ``benchmarks/results/bpr_quality.{json,md}``. Takes several minutes on 2 CPU cores (``--quick``: a few
scans only, for a smoke run; prints only unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from DiffusionSegLib.bpr import default_bpr_path, load_bpr, predict_working_coordinates  # noqa: E402
from DiffusionSegLib.bpr.inference import default_mode  # noqa: E402
from DiffusionSegLib.bpr.sampling import TrainingVolume  # noqa: E402
from DiffusionSegLib.bpr.slice_model import SliceBodyPartRegressor, body_crop_centres_mm, slice_offsets  # noqa: E402
from DiffusionSegLib.checkpoint import file_sha256, git_commit, library_version, load_weights  # noqa: E402
from DiffusionSegLib.data.datasets import find_images, find_labeled_cases  # noqa: E402
from DiffusionSegLib.data.volume import read_volume  # noqa: E402
from DiffusionSegLib.preprocess import PreprocessConfig, prepare_volume, resample_onto  # noqa: E402
from DiffusionSegLib.preprocess.spatial import body_bounding_box, to_canonical_orientation  # noqa: E402

AXES = ("x", "y", "z")
BODY_HU = -100.0
RNG = np.random.default_rng(0)


def _body_mask(working: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(working) > BODY_HU


def _positions_mm(image: sitk.Image) -> np.ndarray:
    """Physical (x, y, z) of every voxel, shape (3, D, H, W) (canonical grids: identity direction)."""
    size = image.GetSize()
    axes = [image.GetOrigin()[a] + image.GetSpacing()[a] * np.arange(size[a]) for a in range(3)]
    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return np.stack([xx, yy, zz])


def monotonicity(coords: np.ndarray, working: sitk.Image, samples: int = 20000) -> tuple[list[float], list[float]]:
    """Spearman ρ of each channel with its physical axis, and its slope (mm-equivalent per mm), over body voxels."""
    body = _body_mask(working)
    positions = _positions_mm(working)
    index = np.flatnonzero(body)
    index = RNG.choice(index, min(samples, index.size), replace=False)
    rho = [float(spearmanr(coords[a].ravel()[index], positions[a].ravel()[index])[0]) for a in range(3)]
    slope = [float(np.polyfit(positions[a].ravel()[index], coords[a].ravel()[index], 1)[0]) for a in range(3)]
    return rho, slope


def organ_centroids(coords: np.ndarray, working: sitk.Image, labels: sitk.Image, organs) -> dict:
    """Per organ: centroid in BPR coordinates and in the bounding-box baseline (normalised 0..1 per axis)."""
    on_working = resample_onto(to_canonical_orientation(labels), working, "nearest", 0)
    label_array = sitk.GetArrayFromImage(on_working)
    start, size = body_bounding_box(working, BODY_HU, 0.0)
    index_zyx = np.indices(label_array.shape)
    out = {}
    for organ in organs:
        mask = label_array == organ.value
        if mask.sum() < 10:
            continue
        ours = [float(coords[a][mask].mean()) for a in range(3)]
        normalised = []
        for a in range(3):
            axis_index = index_zyx[2 - a][mask].mean()
            normalised.append(float((axis_index - start[a]) / max(size[a] - 1, 1)))
        out[organ.name] = {"ours_mm": ours, "bbox_fraction": normalised}
    extent_mm = [size[a] * working.GetSpacing()[a] for a in range(3)]
    return {"organs": out, "body_extent_mm": extent_mm}


def consistency(per_case: dict[str, dict]) -> dict:
    """Spread across patients of each organ centroid: ours vs the bounding-box baseline (mm-equivalent)."""
    mean_extent = np.mean([c["body_extent_mm"] for c in per_case.values()], axis=0)
    organs = sorted({name for c in per_case.values() for name in c["organs"]})
    table = {}
    for organ in organs:
        cases = [c["organs"][organ] for c in per_case.values() if organ in c["organs"]]
        if len(cases) < 3:
            continue
        ours = np.array([c["ours_mm"] for c in cases])
        base = np.array([c["bbox_fraction"] for c in cases]) * mean_extent
        table[organ] = {
            "patients": len(cases),
            "ours_std_mm": ours.std(0).round(1).tolist(), "baseline_std_mm": base.std(0).round(1).tolist(),
            "ours_rms_mm": round(float(np.sqrt(ours.var(0).sum())), 1),
            "baseline_rms_mm": round(float(np.sqrt(base.var(0).sum())), 1),
        }  # fmt: skip
    return table


def _summary(norm: np.ndarray) -> dict:
    """Mean, p95 and share within 5 mm of per-voxel |Δ| (mm-equivalent)."""
    return {"mean_mm": round(float(norm.mean()), 2), "p95_mm": round(float(np.percentile(norm, 95)), 2),
            "within_5mm": round(float((norm <= 5.0).mean()), 4), "voxels": int(norm.size)}  # fmt: skip


def _difference(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> dict:
    return _summary(np.sqrt(((a - b) ** 2).sum(0))[mask])


def _two_slice_crops(model, hu: torch.Tensor, body: np.ndarray, shift_mm: float) -> dict:
    """Slice design: |Δ offset| between two crops of the same slice (centred on the body, and moved by
    ``shift_mm`` along x and y), per body voxel."""
    cfg = model.config
    volume = TrainingVolume.from_array(hu, cfg.spacing_mm, cfg.window_hu, cfg.pool_zyx)
    centre = body_crop_centres_mm(hu, cfg.spacing_mm)
    first = slice_offsets(model, volume, centre)
    second = slice_offsets(model, volume, centre + torch.tensor([shift_mm, shift_mm, 0.0]))
    per_slice = torch.linalg.vector_norm(first - second, dim=1).numpy()
    return _summary(np.repeat(per_slice, body.reshape(body.shape[0], -1).sum(1)))


def invariance(model, working: sitk.Image, coords: np.ndarray, mode: str) -> dict:
    cfg = model.config
    body = _body_mask(working)
    array = sitk.GetArrayFromImage(working)
    hu = torch.from_numpy(array).float()
    results = {}
    # (a) two overlapping sub-volumes (upper and lower two thirds: other fields of view), whole pipeline
    depth = array.shape[0]
    if depth >= 6:
        cut_low, cut_high = depth // 3, depth - depth // 3
        upper = predict_working_coordinates(array[cut_low:], model, mode=mode)[0].numpy()
        lower = predict_working_coordinates(array[:cut_high], model, mode=mode)[0].numpy()
        overlap = slice(cut_low, cut_high)
        results["two_fields_of_view"] = _difference(upper[:, : cut_high - cut_low], lower[:, overlap], body[overlap])
    # (b) the raw network on two single patches shifted by half a patch along every axis (slice design: two crops
    # of every slice, centres a quarter crop apart along x and y)
    if isinstance(model, SliceBodyPartRegressor):  # inside the training shifts (75 mm per axis), and a quarter crop
        results["two_patches_network"] = _two_slice_crops(model, hu, body, 50.0)
        results["two_patches_network_quarter_crop"] = _two_slice_crops(model, hu, body,
                                                                       cfg.slice_size_px * cfg.slice_step_mm / 4)
    patch = np.array(getattr(cfg, "patch_size_vox", (0, 0, 0)))
    shift = patch // 2
    if patch.all() and np.all(np.array(hu.shape) >= patch + shift):
        from DiffusionSegLib.preprocess import scale_hu

        with torch.no_grad():
            first = model(scale_hu(hu[: patch[0], : patch[1], : patch[2]], cfg.window_hu)[None, None])[0].numpy()
            window = tuple(slice(s, s + p) for s, p in zip(shift, patch))
            second = model(scale_hu(hu[window], cfg.window_hu)[None, None])[0].numpy()
        overlap = tuple(slice(s, p) for s, p in zip(shift, patch))
        back = tuple(slice(0, p - s) for s, p in zip(shift, patch))
        if body[overlap].any():
            results["two_patches_network"] = _difference(first[(slice(None), *overlap)],
                                                         second[(slice(None), *back)], body[overlap])  # fmt: skip
    # (c) the same scan resampled to another grid (coarser, origin shifted by a fraction of a voxel)
    grid = sitk.Image([max(2, int(n * s / t)) for n, s, t in zip(working.GetSize(), working.GetSpacing(), (2, 2, 4))],
                      sitk.sitkFloat32)  # fmt: skip
    grid.SetSpacing((2.0, 2.0, 4.0))
    grid.SetOrigin(tuple(o + 0.37 * s for o, s in zip(working.GetOrigin(), working.GetSpacing())))
    resampled = resample_onto(working, grid, "linear", -1024.0)
    other = predict_working_coordinates(resampled, model, mode=mode)[0]
    other_image = sitk.GetImageFromArray(other.permute(1, 2, 3, 0).numpy(), isVector=True)
    other_image.CopyInformation(resampled)
    on_working = sitk.GetArrayFromImage(resample_onto(other_image, working, "linear", np.nan)).transpose(3, 0, 1, 2)
    inside = body & np.all(np.isfinite(on_working), 0)
    results["resampled_2x2x4mm"] = _difference(coords, np.nan_to_num(on_working), inside)
    # (d) clipped to the BTCV window and quantised to 8 bits (only meaningful for full-range scans)
    if np.mean(array < -200) > 0.01:  # full-range scans only (BTCV copies are clipped already)
        clipped = np.round((np.clip(array, -125, 275) + 125) / 400 * 255) / 255 * 400 - 125
        clipped_coords = predict_working_coordinates(clipped.astype(np.float32), model, mode=mode)[0].numpy()
        results["clipped_btcv_window"] = _difference(coords, clipped_coords, body)
    return results


def evaluate(weights: Path, data: Path, quick: bool, mode: str | None) -> dict:
    model, cfg = load_bpr(weights)
    mode = mode or default_mode(model)
    _, _, metadata = load_weights(weights, kind="bpr")
    pre = PreprocessConfig(spacing_mm=cfg.spacing_mm)
    labeled = [c for c in find_labeled_cases(data / "btcv")]
    labeled += [c for c in find_labeled_cases(data / "labeled", "organs") if c.case_id.startswith("ircadb")]
    unlabeled = find_images(data / "unlabeled")
    if quick:
        labeled, unlabeled = labeled[:3] + labeled[-1:], unlabeled[:1]
    report: dict = {"monotonicity": {}, "scale": {}, "centroids": {}, "invariance": {}, "seconds": {}}
    invariance_cases = {c.case_id for c in labeled[:3]} | {"ircadb1.01", "ircadb1.17"}
    for item in [*labeled, *unlabeled]:
        name = getattr(item, "case_id", None) or Path(item).name.split(".")[0]
        path = getattr(item, "image", item)
        start = time.perf_counter()
        prepared = prepare_volume(read_volume(path), pre)
        coords = predict_working_coordinates(prepared.image, model, mode=mode)[0].numpy()
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        rho, slope = monotonicity(coords, prepared.image)
        report["monotonicity"][name] = [round(r, 4) for r in rho]
        report["scale"][name] = [round(s, 3) for s in slope]
        if hasattr(item, "label"):
            report["centroids"][name] = organ_centroids(coords, prepared.image, read_volume(item.label), item.labels)
        if name in invariance_cases:
            report["invariance"][name] = invariance(model, prepared.image, coords, mode)
        print(f"{name:28s} rho x/y/z {report['monotonicity'][name]}  {report['seconds'][name]:.1f} s", flush=True)
    report["consistency"] = consistency(report["centroids"])
    z = [r[2] for r in report["monotonicity"].values()]
    spreads = report["consistency"].values()
    report["summary"] = {
        "z_rho_min": round(min(z), 4), "z_rho_median": round(float(np.median(z)), 4),
        "median_scale_xyz": [round(float(np.median([s[a] for s in report["scale"].values()])), 3) for a in range(3)],
        "scans_z_rho_at_least_0.98": f"{sum(r >= 0.98 for r in z)}/{len(z)}",
        "organs_ours_smaller_spread": f"{sum(v['ours_rms_mm'] < v['baseline_rms_mm'] for v in spreads)}/{len(spreads)}",
        "mean_rms_spread_ours_mm": round(float(np.mean([v["ours_rms_mm"] for v in spreads])), 1),
        "mean_rms_spread_baseline_mm": round(float(np.mean([v["baseline_rms_mm"] for v in spreads])), 1),
    }  # fmt: skip
    for kind in ("two_fields_of_view", "two_patches_network", "two_patches_network_quarter_crop", "resampled_2x2x4mm",
                 "clipped_btcv_window"):
        rows = [r[kind] for r in report["invariance"].values() if kind in r]
        if rows:
            report["summary"][f"invariance_{kind}_mean_mm"] = round(float(np.mean([r["mean_mm"] for r in rows])), 2)
            within = float(np.mean([r["within_5mm"] for r in rows]))
            report["summary"][f"invariance_{kind}_within_5mm"] = round(within, 4)
    report["weights"] = {"path": str(weights), "sha256": file_sha256(weights), "config": cfg.to_dict(),
                         "extra": metadata.get("extra", {})}  # fmt: skip
    report["mode"] = mode
    report["environment"] = {"library": library_version(), "git_commit": git_commit(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "machine": platform.machine(),
                             "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    return report


def to_markdown(report: dict) -> str:
    s = report["summary"]
    lines = ["# BPR quality", "", f"Weights `{Path(report['weights']['path']).name}` (sha256 "
             f"{report['weights']['sha256'][:12]}, step {report['weights']['extra'].get('step', '?')}), git "
             f"{report['environment']['git_commit'][:10]}, {report['environment']['date']}; "
             f"mode `{report['mode']}`.", "",
             "## Summary", "", "| measure | value |", "|---|---|"]  # fmt: skip
    lines += [f"| {key} | {value} |" for key, value in s.items()]
    lines += ["", "## Monotonicity (Spearman ρ of each channel with its physical axis, body voxels) and scale "
              "(fitted mm-equivalent per mm; spreads below shrink with it)", "",
              "| scan | ρ x | ρ y | ρ z | scale x | scale y | scale z |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {r[0]:.3f} | {r[1]:.3f} | {r[2]:.3f} | " + " | ".join(f"{v:.2f}" for v in report["scale"][name])
              + " |" for name, r in report["monotonicity"].items()]  # fmt: skip
    lines += ["", "## Organ centroid spread across patients (mm-equivalent; std x/y/z and RMS; smaller is better)", "",
              "| organ | patients | ours std x/y/z | ours RMS | bbox baseline std x/y/z | baseline RMS |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for organ, v in report["consistency"].items():
        lines.append(f"| {organ} | {v['patients']} | {'/'.join(f'{x:g}' for x in v['ours_std_mm'])} | "
                     f"**{v['ours_rms_mm']:g}** | {'/'.join(f'{x:g}' for x in v['baseline_std_mm'])} | "
                     f"{v['baseline_rms_mm']:g} |")  # fmt: skip
    lines += ["", "## Invariance (|Δ coordinates| of the same voxel, mm-equivalent, body voxels)", "",
              "| scan | check | mean | p95 | within 5 mm |", "|---|---|---|---|---|"]  # fmt: skip
    for name, checks in report["invariance"].items():
        for kind, v in checks.items():
            lines.append(f"| {name} | {kind} | {v['mean_mm']:.2f} | {v['p95_mm']:.2f} | {100 * v['within_5mm']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, default=None, help="BPR weights (default: the shipped ones)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared CT data")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="a few scans only; prints unless --out is given")
    parser.add_argument("--mode", choices=("monotone", "translation", "affine", "dense"), default=None,
                        help="whole-volume aggregation of predict_working_coordinates (default: the design's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = args.weights or default_bpr_path()
    report = evaluate(weights, args.data, args.quick, args.mode)
    markdown = to_markdown(report)
    print(markdown)
    out = args.out or (None if args.quick else REPO / "benchmarks" / "results")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bpr_quality.json").write_text(json.dumps(report, indent=1))
        (out / "bpr_quality.md").write_text(markdown)
        print(f"wrote {out / 'bpr_quality.json'} and {out / 'bpr_quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
