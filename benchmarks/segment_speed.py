"""End-to-end ``segment`` speed on a full-resolution CT: ours vs the same network through a plain MONAI pipeline.

    python benchmarks/segment_speed.py                      # shipped default backbone + probe, CPU
    python benchmarks/segment_speed.py --device cuda        # on a GPU
    python benchmarks/segment_speed.py --volume CT --probe P --backbone B --threads 2

Ours (``DiffusionSegLib.segment``): preparation (LPS, body crop, anti-aliased resampling to the working grid, read
once from a view of the input's voxels), BPR coordinates (windows batched), the backbone and probe inside MONAI
sliding windows, class probabilities turned into labels on the input grid (read off the working-grid labels,
blended only near borders), the field of view, ``.seg.nrrd`` written. It runs in float32 and under bfloat16
autocast (``--precisions``; ``auto``'s choice on this machine is recorded), and once more by the reference path
(``segment(..., reference_path=True)``, float32: float32 copy, reorientation, crop and whole-image anti-aliasing
filter before ``sitk.Resample``, the BPR one window per forward pass with its fitted map resampled back, every
class resampled through physical space, the full-resolution body-axis map — what ``segment`` did before the fast
paths): its stage times are the "before" of the same run, and its labels are what the fast path must reproduce
(voxel agreement and per-organ Dice are reported). ``--cli`` also times the command line in a fresh process
(``diffusionseg segment`` and ``diffusionseg --help``).

Baseline, in the same run, with the same backbone, probe, BPR, window, overlap and noise: what a MONAI user would
write — ``LoadImaged`` → ``Orientationd`` → ``Spacingd`` (no body crop), BPR coordinates,
``monai.inferers.sliding_window_inference``, all class probabilities inverted to the input grid with
``Invertd``-style ``Compose.inverse``, argmax, ``SaveImage``-equivalent NIfTI write.

For each stage: wall time and peak resident memory (sampled every 5 ms; CUDA: peak allocated); for the
network stage: FLOPs per volume (FlopCounterMode on one window × windows) and the achieved rate against the
measured conv3d ceiling (``benchmarks/backbone_throughput.py``). Results: ``benchmarks/results/segment_speed*``.
Labels of the two paths are compared (agreement in % of voxels), so a faster path cannot be a different one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from backbone_throughput import conv3d_ceiling, machine_info  # noqa: E402

DATA = Path(os.environ.get("DIFFUSIONSEG_DATA", REPO.parent / "shared" / "data"))
DEFAULT_VOLUME = DATA / "raw" / "ircadb1.01_ct_fullres.nii.gz"


class MemorySampler:
    """Peak resident memory (and CUDA allocated memory) of this process per named stage."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device, self.interval = device, interval_s
        self.stage, self.peaks, self._stop = None, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            stage = self.stage
            if stage is not None:
                self.peaks[stage] = max(self.peaks.get(stage, 0), self.rss_bytes())
            time.sleep(self.interval)

    @contextmanager
    def measure(self, name: str, times: dict):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.stage = name
        self.peaks[name] = self.rss_bytes()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                self.peaks[name + " (cuda)"] = torch.cuda.max_memory_allocated()
            times[name] = time.perf_counter() - start
            self.peaks[name] = max(self.peaks[name], self.rss_bytes())
            self.stage = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def run_ours(volume: Path, probe_path: Path, backbone_path: Path, device: torch.device, out_dir: Path,
             memory: MemorySampler, precision: str = "float32", reference_path: bool = False,
             label: str = "ours") -> dict:  # fmt: skip
    from DiffusionSegLib.data.volume import read_volume
    from DiffusionSegLib.probe import load_probe, segment, write_segmentation
    from DiffusionSegLib.pretrain.export import load_backbone

    times: dict[str, float] = {}
    with memory.measure(f"{label}: read", times):
        image = read_volume(volume)
    with memory.measure(f"{label}: load models", times):
        backbone = load_backbone(backbone_path)
        probe = load_probe(probe_path, backbone)
    with memory.measure(f"{label}: segment", times):  # the reference path is the code before the fast paths
        result = segment(image, probe, backbone, device=str(device), precision=precision,
                         reference_path=reference_path)  # fmt: skip
    with memory.measure(f"{label}: write", times):
        write_segmentation(result, out_dir / f"{label.replace(' ', '_')}.seg.nrrd")
    stages = {name: result.seconds.get(key, 0.0) for key, name in SEGMENT_STAGES.items()}
    return {"image": image, "labels": result.labels, "times": times, "segment_stages": stages,
            "precision": result.precision, "working_size": list(reversed(result.working_size)),
            "backbone": backbone, "probe": probe}  # fmt: skip


SEGMENT_STAGES = {"prepare": "prepare", "bpr": "BPR", "features": "backbone + probe", "field_of_view": "field of view",
                  "to_input_grid": "to input grid", "cleanup": "cleanup", "total": "segment total"}  # fmt: skip


def label_agreement(labels, reference) -> dict:
    """Voxel agreement of two label images and, per organ of either, Dice."""
    import SimpleITK as sitk

    a, b = sitk.GetArrayViewFromImage(labels), sitk.GetArrayViewFromImage(reference)
    dice = {}
    for value in sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0}):
        x, y = a == value, b == value
        dice[int(value)] = float(2 * np.sum(x & y) / (x.sum() + y.sum()))
    return {"agreement": float(np.mean(a == b)), "min_dice": min(dice.values(), default=1.0), "dice": dice}


def cli_seconds(volume: Path, probe_path: Path, out_dir: Path, threads: int) -> dict:
    """Wall time of the command line in a fresh process: ``diffusionseg --help`` and ``diffusionseg segment``."""
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    base = [sys.executable, "-m", "DiffusionSegLib.cli"]
    out = {}
    for name, args in (("help", ["--help"]),
                       ("segment", ["segment", str(volume), "--probe", str(probe_path), "-o",
                                    str(out_dir / "cli.seg.nrrd")])):  # fmt: skip
        start = time.perf_counter()
        subprocess.run(base + args, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # fmt: skip
        out[name] = time.perf_counter() - start
    return out


def run_monai_baseline(volume: Path, backbone, probe, device: torch.device, out_dir: Path,
                       memory: MemorySampler) -> dict:  # fmt: skip
    """The same network through a standard MONAI pipeline (see the module docstring)."""
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    from DiffusionSegLib.bpr import load_bpr
    from DiffusionSegLib.bpr.inference import coordinate_channels
    from DiffusionSegLib.data.volume import write_volume
    from DiffusionSegLib.features import FeatureExtractor, PyramidPredictor, backbone_bpr_path, build_inputs, window_size

    import SimpleITK as sitk

    times: dict[str, float] = {}
    spacing = tuple(backbone.pretrain.preprocess.spacing_mm)
    transforms = Compose([LoadImaged("image", reader="NibabelReader"), EnsureChannelFirstd("image"),
                          Orientationd("image", axcodes="LPS"),  # LPS arrays, as SimpleITK
                          Spacingd("image", pixdim=spacing, mode="bilinear", padding_mode="border")])  # fmt: skip
    with memory.measure("MONAI: load + resample", times):
        data = transforms({"image": str(volume)})
        hu_xyz = data["image"][0].as_tensor()
        hu_zyx = hu_xyz.permute(2, 1, 0).contiguous()
    cfg = probe.config.feature_config(device=str(device))
    with memory.measure("MONAI: BPR", times):
        coords = None
        if backbone.use_bpr:
            coords = coordinate_channels(hu_zyx, load_bpr(backbone_bpr_path(backbone))[0], device=device)
        inputs = build_inputs(hu_zyx, backbone, cfg, coords=coords, device=device)
    with memory.measure("MONAI: sliding_window_inference", times):
        extractor = FeatureExtractor(backbone, cfg, inputs.num_coords).to(device)
        predictor = PyramidPredictor(extractor, probe.head.to(device).eval())
        with torch.no_grad():
            logits = sliding_window_inference(inputs.tensor, roi_size=window_size(backbone, cfg), sw_batch_size=4,
                                              predictor=predictor, overlap=cfg.overlap, mode=cfg.blend,
                                              sw_device=device, device="cpu")  # fmt: skip
        probabilities = torch.softmax(logits[0], dim=0).permute(0, 3, 2, 1).contiguous()  # (C, x, y, z)
        del logits, inputs
    with memory.measure("MONAI: invert to input grid", times):
        out = MetaTensor(probabilities, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
        inverted = transforms.inverse({"image": out})["image"]
        labels_xyz = inverted.argmax(0).to(torch.uint8).numpy()
        del out, inverted, probabilities
    with memory.measure("MONAI: write", times):
        values = np.asarray([0] + [o.value for o in probe.labels], np.uint8)  # class index -> organ id
        labels = sitk.GetImageFromArray(values[labels_xyz.transpose(2, 1, 0)])
        header = sitk.ImageFileReader()  # the input's geometry, without reading its voxels again
        header.SetFileName(str(volume))
        header.ReadImageInformation()
        labels.SetOrigin(header.GetOrigin())
        labels.SetSpacing(header.GetSpacing())
        labels.SetDirection(header.GetDirection())
        write_volume(labels, out_dir / "monai.nii.gz")
    return {"labels": labels, "times": times, "grid": list(hu_zyx.shape)}


def network_flops(backbone, probe, window: tuple[int, int, int], device: torch.device) -> int:
    """FLOPs of the backbone + probe on one window (FlopCounterMode: convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    from DiffusionSegLib.features import FeatureExtractor, PyramidPredictor

    cfg = probe.config.feature_config(device=str(device))
    extractor = FeatureExtractor(backbone, cfg).to(device)
    predictor = PyramidPredictor(extractor, probe.head.to(device).eval())
    channels = 1 + extractor.num_coords + (extractor.num_draws if extractor.diffusion else 0)
    window_input = torch.zeros(1, channels, *window, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        predictor(window_input)
    return int(counter.get_total_flops())


def markdown(result: dict) -> str:
    m, a = result["machine"], result["args"]
    gib = 1024**3
    runs = dict(sorted(result["runs"].items(), key=lambda item: not item[0].startswith("reference")))
    lines = [
        "# End-to-end segmentation speed",
        "",
        f"`python benchmarks/segment_speed.py {' '.join(a['argv'])}` — torch {m['torch']}, "
        f"{m['gpu'] or m['cpu']}, {m['threads']} threads, git {m['git_sha']}, {m['date']}; "
        f"median of {a['repeats']} run(s) per fast path.",
        "",
        f"Input: `{a['volume_name']}` {' x '.join(map(str, result['input_size']))} voxels; backbone "
        f"`{a['backbone_name']}`, probe `{a['probe_name']}` ({result['num_classes']} classes); working grid (z, y, x) "
        f"{' x '.join(map(str, result['working_size']))}. `precision=\"auto\"` chooses **{result['auto']}** here.",
        "",
        "| stage (seconds) | " + " | ".join(runs) + (" | reference / fast float32 |" if "reference float32" in runs
                                                      and "fast float32" in runs else " |"),
        "| --- |" + " ---: |" * (len(runs) + ("reference float32" in runs and "fast float32" in runs)),
    ]  # fmt: skip
    stage_names = list(SEGMENT_STAGES.values())
    for stage in stage_names + ["read", "load models", "write", "in process, end to end"]:
        values = [run["stages"].get(stage) for run in runs.values()]
        row = f"| {'**' + stage + '**' if stage.startswith(('segment', 'in process')) else stage} | " + " | ".join(
            "" if v is None else f"{v:.2f}" for v in values) + " |"  # fmt: skip
        if "reference float32" in runs and "fast float32" in runs:
            ref, fast = runs["reference float32"]["stages"].get(stage), runs["fast float32"]["stages"].get(stage)
            row += f" {ref / fast:.1f}x |" if ref and fast and fast > 0.005 else " |"
        lines.append(row)
    lines += ["", "Peak resident memory (GiB) while segmenting: " + ", ".join(
        f"{name} {run['peak_segment'] / gib:.2f}" for name, run in runs.items()) + "."]  # fmt: skip
    if result.get("agreement"):
        lines += ["", "Labels against the reference path (float32) of the same run:", ""]
        for name, agreement in result["agreement"].items():
            lines.append(f"* {name}: {100 * agreement['agreement']:.4f}% of voxels agree; lowest organ Dice "
                         f"{agreement['min_dice']:.4f}")  # fmt: skip
    if result.get("cli"):
        c = result["cli"]
        lines += ["", f"Command line, fresh process: `diffusionseg segment` {c['segment']:.2f} s wall (start-up, "
                  f"reading, models, segmentation, writing; precision auto), `diffusionseg --help` {c['help']:.2f} s."]
    if result.get("monai"):
        base = result["monai"]
        lines += ["", "| MONAI baseline stage | seconds | peak RSS (GiB) |", "| --- | ---: | ---: |"]
        for stage, seconds in base["times"].items():
            peak = result["memory_peaks"].get(stage, 0) / gib
            lines.append(f"| {stage.split(': ', 1)[1]} | {seconds:.2f} | {peak:.2f} |")
        lines += [f"| **total** | **{sum(base['times'].values()):.2f}** | |", "",
                  f"**Ours (fast, {result['ours_run']}) / MONAI baseline: {result['speedup']:.2f}x faster end to end** "
                  f"(MONAI grid {' x '.join(map(str, base['grid']))}, not cropped); labels agree on "
                  f"{100 * result['monai_agreement']:.2f}% of voxels "
                  f"({100 * result['monai_agreement_foreground']:.1f}% "
                  "of the voxels either path labels as an organ). The baseline resamples without anti-aliasing and "
                  "on a grid aligned differently, so its labels are a sanity check, not a target."]  # fmt: skip
    f = result["flops"]
    lines += ["", f"Network: {f['per_window'] / 1e9:.2f} GFLOP per window x {f['windows_ours']} windows = "
              f"{f['ours_total'] / 1e12:.2f} TFLOP; achieved {f['ours_rate'] / 1e9:.0f} GFLOP/s in float32 = "
              f"{100 * f['ours_rate'] / f['ceiling']:.0f}% of the measured conv3d ceiling "
              f"({f['ceiling'] / 1e9:.0f} GFLOP/s)."]  # fmt: skip
    lines += ["", "CPU timings on a shared machine are noisy: compare columns of one run (the reference path is the "
              "code before the fast path, run in the same process)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _median_run(runs: list[dict]) -> dict:
    """One run's record with every stage time replaced by the median over ``runs``."""
    out = dict(runs[-1])
    out["segment_stages"] = {k: float(np.median([r["segment_stages"][k] for r in runs]))
                             for k in runs[0]["segment_stages"]}  # fmt: skip
    out["times"] = {k: float(np.median([r["times"][k] for r in runs])) for k in runs[0]["times"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    import SimpleITK as sitk

    from DiffusionSegLib.features import window_size
    from DiffusionSegLib.precision import resolve_precision
    from DiffusionSegLib.probe import find_probe_backbone
    from DiffusionSegLib.probe.segment import _count_windows
    from DiffusionSegLib.resources import default_probe_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volume", type=Path, default=DEFAULT_VOLUME, help="CT to segment")
    parser.add_argument("--probe", type=Path, default=None, help="probe or model (default: the shipped default)")
    parser.add_argument("--backbone", type=Path, default=None, help="backbone (default: the one the probe recorded)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--precisions", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="precisions of the fast path to time")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="runs of each fast path (medians are reported)")
    parser.add_argument("--skip-reference", action="store_true", help="no reference path (no label check)")
    parser.add_argument("--skip-baseline", action="store_true", help="no MONAI baseline")
    parser.add_argument("--skip-cli", action="store_true", help="do not time the command line")
    parser.add_argument("--no-warmup", action="store_true", help="no untimed warm-up run first")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. _h100)")
    args = parser.parse_args(argv)
    if not args.volume.is_file():
        parser.error(f"{args.volume} not found (set DIFFUSIONSEG_DATA or pass --volume)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    probe_path = args.probe or default_probe_path()
    backbone_path = Path(args.backbone or find_probe_backbone(probe_path))
    memory = MemorySampler(device)
    result: dict = {"machine": machine_info(device),
                    "args": {"argv": sys.argv[1:] if argv is None else argv, "volume_name": args.volume.name,
                             "probe_name": probe_path.name, "backbone_name": backbone_path.name,
                             "device": args.device, "repeats": args.repeats}}  # fmt: skip
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_warmup:  # one-time costs (first BPR and torch calls, caches) must not fall on the first path
            print("warm-up (float32, untimed) ...", flush=True)
            run_ours(args.volume, probe_path, backbone_path, device, Path(tmp), memory, "float32", label="warm-up")
        for precision in args.precisions:
            name = f"fast {precision}"
            print(f"{name} ...", flush=True)
            repeated = [run_ours(args.volume, probe_path, backbone_path, device, Path(tmp), memory, precision,
                                 label=name) for _ in range(max(1, args.repeats))]  # fmt: skip
            runs[name] = _median_run(repeated)
            print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in runs[name]["segment_stages"].items()), flush=True)
        if not args.skip_reference:
            print("reference path (float32) ...", flush=True)
            runs["reference float32"] = run_ours(args.volume, probe_path, backbone_path, device, Path(tmp), memory,
                                                 "float32", reference_path=True, label="reference float32")  # fmt: skip
            print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in runs["reference float32"]["segment_stages"].items()),
                  flush=True)  # fmt: skip
        ours_name = next(iter(runs))
        ours = runs[ours_name]
        base = None
        if not args.skip_baseline:
            print("MONAI baseline ...", flush=True)
            base = run_monai_baseline(args.volume, ours["backbone"], ours["probe"], device, Path(tmp), memory)
            print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in base["times"].items()), flush=True)
        if not args.skip_cli:
            print("command line ...", flush=True)
            result["cli"] = cli_seconds(args.volume, probe_path, Path(tmp), args.threads)
            print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in result["cli"].items()), flush=True)
    memory.close()
    backbone, probe = ours["backbone"], ours["probe"]
    cfg = probe.config.feature_config()
    roi = window_size(backbone, cfg)
    per_window = network_flops(backbone, probe, roi, device)
    print("conv3d ceiling ...", flush=True)
    ceiling = conv3d_ceiling(device, channels_last=True, quick=True, timer="wall")["flops_per_s"]
    windows_ours = _count_windows(ours["working_size"], roi, cfg.overlap)
    network_seconds = runs.get("fast float32", ours)["segment_stages"]["backbone + probe"]
    result.update({
        "input_size": list(ours["image"].GetSize()), "num_classes": probe.num_classes,
        "working_size": ours["working_size"], "auto": resolve_precision("auto", device), "ours_run": ours_name,
        "runs": {name: {"stages": run["segment_stages"] | {
                     "read": run["times"][f"{name}: read"], "load models": run["times"][f"{name}: load models"],
                     "write": run["times"][f"{name}: write"], "in process, end to end": sum(run["times"].values())},
                     "peak_segment": memory.peaks.get(f"{name}: segment", 0), "precision": run["precision"]}
                 for name, run in runs.items()},
        "memory_peaks": memory.peaks,
        "flops": {"per_window": per_window, "windows_ours": windows_ours, "ours_total": per_window * windows_ours,
                  "ours_rate": per_window * windows_ours / network_seconds, "ceiling": ceiling},
    })  # fmt: skip
    if "reference float32" in runs:
        reference = runs["reference float32"]["labels"]
        result["agreement"] = {name: label_agreement(run["labels"], reference) for name, run in runs.items()
                               if name != "reference float32"}  # fmt: skip
        for name, agreement in result["agreement"].items():
            print(f"{name}: labels agree with the reference on {100 * agreement['agreement']:.4f}% of voxels, lowest "
                  f"organ Dice {agreement['min_dice']:.4f}", flush=True)  # fmt: skip
    total_ours = sum(ours["times"].values())
    print(f"{ours_name}: {total_ours:.2f} s end to end in process", flush=True)
    if base is not None:
        a, b = sitk.GetArrayViewFromImage(ours["labels"]), sitk.GetArrayViewFromImage(base["labels"])
        either = (a > 0) | (b > 0)
        result["monai"] = {k: base[k] for k in ("times", "grid")}
        result["speedup"] = sum(base["times"].values()) / total_ours
        result["monai_agreement"] = float(np.mean(a == b))
        result["monai_agreement_foreground"] = float(np.mean(a[either] == b[either])) if either.any() else 1.0
        print(f"MONAI baseline: {sum(base['times'].values()):.2f} s; ours is {result['speedup']:.2f}x faster",
              flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"segment_speed_{args.device}{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.md and .json", flush=True)
    return result


if __name__ == "__main__":
    main()
