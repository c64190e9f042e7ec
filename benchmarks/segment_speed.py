"""End-to-end ``segment`` speed on a full-resolution CT: ours vs the same network through a plain MONAI pipeline.

    python benchmarks/segment_speed.py                      # shipped default backbone + probe, CPU
    python benchmarks/segment_speed.py --device cuda        # on a GPU
    python benchmarks/segment_speed.py --volume CT --probe P --backbone B --threads 2

Ours (``DiffusionSegLib.segment``): SimpleITK preprocessing (LPS, body crop, resampling to the working grid),
BPR coordinates, the backbone and probe inside MONAI sliding windows, probabilities mapped back to the input grid
one class at a time (running argmax), ``.seg.nrrd`` written.

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
             memory: MemorySampler) -> dict:  # fmt: skip
    from DiffusionSegLib.data.volume import read_volume
    from DiffusionSegLib.probe import load_probe, segment, write_segmentation
    from DiffusionSegLib.pretrain.export import load_backbone

    times: dict[str, float] = {}
    with memory.measure("ours: read", times):
        image = read_volume(volume)
    with memory.measure("ours: load models", times):
        backbone = load_backbone(backbone_path)
        probe = load_probe(probe_path, backbone)
    with memory.measure("ours: segment", times):
        result = segment(image, probe, backbone, device=str(device))
    with memory.measure("ours: write", times):
        write_segmentation(result, out_dir / "ours.seg.nrrd")
    stages = {"prepare + BPR": result.seconds["prepare"], "backbone + probe": result.seconds["features"],
              "to input grid": result.seconds["to_input_grid"]}  # fmt: skip
    return {"image": image, "labels": result.labels, "times": times, "segment_stages": stages,
            "working_size": list(reversed(result.working_size)), "backbone": backbone, "probe": probe}  # fmt: skip


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
    ours, base = result["ours"], result["monai"]
    gib = 1024**3
    lines = [
        "# End-to-end segmentation speed",
        "",
        f"`python benchmarks/segment_speed.py {' '.join(a['argv'])}` — torch {m['torch']}, "
        f"{m['gpu'] or m['cpu']}, {m['threads']} threads, git {m['git_sha']}, {m['date']}.",
        "",
        f"Input: `{a['volume_name']}` {' x '.join(map(str, result['input_size']))} voxels; backbone "
        f"`{a['backbone_name']}`, probe `{a['probe_name']}` ({result['num_classes']} classes). Working grids (z, y, x): "
        f"ours {' x '.join(map(str, ours['working_size']))} (cropped to the body), MONAI's "
        f"{' x '.join(map(str, base['grid']))} (not cropped).",
        "",
        "| path | stage | seconds | peak RSS (GiB) |",
        "| --- | --- | ---: | ---: |",
    ]
    for path, entry in (("ours", ours), ("MONAI baseline", base)):
        for stage, seconds in entry["times"].items():
            peak = result["memory_peaks"].get(stage, 0) / gib
            cuda = result["memory_peaks"].get(stage + " (cuda)")
            extra = f" (CUDA {cuda / gib:.2f})" if cuda is not None else ""
            lines.append(f"| {path} | {stage.split(': ', 1)[1]} | {seconds:.2f} | {peak:.2f}{extra} |")
        lines.append(f"| **{path}** | **total** | **{sum(entry['times'].values()):.2f}** | |")
    lines += ["", "Inside our `segment`: " + ", ".join(f"{k} {v:.2f} s" for k, v in ours["segment_stages"].items()),
              "", f"**Ours / MONAI baseline: {result['speedup']:.2f}x faster end to end**; labels agree on "
              f"{100 * result['agreement']:.2f}% of voxels ({100 * result['agreement_foreground']:.1f}% of the voxels "
              "either path labels as an organ).", ""]  # fmt: skip
    f = result["flops"]
    lines += [f"Network: {f['per_window'] / 1e9:.2f} GFLOP per window x {f['windows_ours']} windows = "
              f"{f['ours_total'] / 1e12:.2f} TFLOP for our path ({f['windows_monai']} windows, "
              f"{f['monai_total'] / 1e12:.2f} TFLOP for the baseline, which does not crop to the body). Achieved "
              f"{f['ours_rate'] / 1e9:.0f} GFLOP/s in the backbone + probe stage = "
              f"{100 * f['ours_rate'] / f['ceiling']:.0f}% of the measured conv3d ceiling "
              f"({f['ceiling'] / 1e9:.0f} GFLOP/s, forward + backward of large 3x3x3 convolutions)."]  # fmt: skip
    lines += ["", "Label agreement is a sanity check, not a target: the baseline resamples without anti-aliasing (our "
              "preprocessing smooths before downsampling, as in pretraining) and on a grid aligned differently, so "
              "the input voxels differ; a weak probe turns such input differences into label differences.",
              "", "Peak RSS is the whole process's resident memory during the stage (models and earlier arrays "
              "included). CPU timings on a shared machine are noisy; compare rows of one run."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from DiffusionSegLib.probe.segment import _count_windows
    from DiffusionSegLib.features import window_size
    from DiffusionSegLib.probe import find_probe_backbone
    from DiffusionSegLib.resources import default_probe_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volume", type=Path, default=DEFAULT_VOLUME, help="CT to segment")
    parser.add_argument("--probe", type=Path, default=None, help="probe or model (default: the shipped default)")
    parser.add_argument("--backbone", type=Path, default=None, help="backbone (default: the one the probe recorded)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-baseline", action="store_true", help="time our path only")
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
                             "device": args.device}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        print("ours ...", flush=True)
        ours = run_ours(args.volume, probe_path, backbone_path, device, Path(tmp), memory)
        print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in ours["times"].items()), flush=True)
        base = None
        if not args.skip_baseline:
            print("MONAI baseline ...", flush=True)
            base = run_monai_baseline(args.volume, ours["backbone"], ours["probe"], device, Path(tmp), memory)
            print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in base["times"].items()), flush=True)
    memory.close()
    backbone, probe = ours["backbone"], ours["probe"]
    cfg = probe.config.feature_config()
    roi = window_size(backbone, cfg)
    per_window = network_flops(backbone, probe, roi, device)
    print("conv3d ceiling ...", flush=True)
    ceiling = conv3d_ceiling(device, channels_last=True, quick=True, timer="wall")["flops_per_s"]
    windows_ours = _count_windows(ours["working_size"], roi, cfg.overlap)
    result.update({
        "input_size": list(ours["image"].GetSize()), "num_classes": probe.num_classes,
        "ours": {k: ours[k] for k in ("times", "segment_stages", "working_size")},
        "memory_peaks": memory.peaks,
        "flops": {"per_window": per_window, "windows_ours": windows_ours, "ours_total": per_window * windows_ours,
                  "ours_rate": per_window * windows_ours / ours["segment_stages"]["backbone + probe"],
                  "ceiling": ceiling},
    })  # fmt: skip
    total_ours = sum(ours["times"].values())
    print(f"ours: {total_ours:.2f} s end to end", flush=True)
    if base is not None:
        import SimpleITK as sitk

        a, b = sitk.GetArrayViewFromImage(ours["labels"]), sitk.GetArrayViewFromImage(base["labels"])
        either = (a > 0) | (b > 0)
        windows_monai = _count_windows(base["grid"], roi, cfg.overlap)
        result["monai"] = {k: base[k] for k in ("times", "grid")}
        result["speedup"] = sum(base["times"].values()) / total_ours
        result["agreement"] = float(np.mean(a == b))
        result["agreement_foreground"] = float(np.mean(a[either] == b[either])) if either.any() else 1.0
        result["flops"].update({"windows_monai": windows_monai, "monai_total": per_window * windows_monai})
        print(f"MONAI baseline: {sum(base['times'].values()):.2f} s; ours is {result['speedup']:.2f}x faster; "
              f"labels agree on {100 * result['agreement']:.2f}% of voxels", flush=True)  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"segment_speed_{args.device}{args.tag}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {stem}.md and .json", flush=True)
    return result


if __name__ == "__main__":
    main()
