"""Peak memory of ``diffusionseg segment`` on a large CT (512 x 512 x 1000 voxels) next to the scan it was made from.

    .venv/bin/python benchmarks/segment_memory.py                 # shipped default model, 2 threads
    .venv/bin/python benchmarks/segment_memory.py --slices 1500 --probe P

The large CT is the full-resolution 3D-IRCADb 1.01 scan (512 x 512 x 129 at 0.57 x 0.57 x 1.6 mm) resampled
(linear, int16) to ``--slices`` thinner slices over the same extent: the same anatomy and working grid, 7.8x the
input voxels, so what grows is what ``segment`` keeps on the input grid (the CT, the running argmax, the label
map). It is written to a temporary folder and deleted afterwards (3D-IRCADb images and derivatives are never
committed). Each volume is segmented by the real command line in its own process; its peak resident memory is
the kernel's ``ru_maxrss`` of that process (``os.wait4``), the baseline is the original scan in the same run.
Results: ``benchmarks/results/segment_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = Path(os.environ.get("DIFFUSIONSEG_DATA", REPO.parent / "shared" / "data"))
SOURCE = DATA / "raw" / "ircadb1.01_ct_fullres.nii.gz"
OUT = REPO / "benchmarks" / "results"


def volume_size(path: Path) -> tuple[int, int, int]:
    """Voxel size (x, y, z) of a volume from its header."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return tuple(reader.GetSize())


def make_large_ct(source: Path, slices: int, path: Path) -> tuple[int, int, int]:
    """Resample ``source`` to ``slices`` axial slices over the same extent (int16, uncompressed NIfTI)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    size = list(image.GetSize())
    spacing = list(image.GetSpacing())
    spacing[2] = spacing[2] * (size[2] - 1) / (slices - 1)
    size[2] = slices
    large = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                          image.GetDirection(), -1024.0, sitk.sitkInt16)  # fmt: skip
    sitk.WriteImage(large, str(path), useCompression=False)
    return tuple(size)


def segment_peak_memory(volume: Path, output: Path, extra: list[str], threads: int) -> dict:
    """Run ``diffusionseg segment`` on ``volume`` in a child process: wall seconds and peak RSS (MiB)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "DiffusionSegLib", "segment", str(volume), "-o", str(output), *extra]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    stderr = child.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"segment failed on {volume.name}:\n{stderr}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss is in KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=1000, help="axial slices of the large CT (default 1000)")
    parser.add_argument("--probe", help="probe or fine-tuned model (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each segment run (default 2)")
    args = parser.parse_args()
    if not SOURCE.is_file():
        raise SystemExit(f"{SOURCE} is missing: set DIFFUSIONSEG_DATA to the shared data folder")
    extra = ["--probe", args.probe] if args.probe else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="segment_memory_") as folder:
        large = Path(folder) / f"large_{args.slices}.nii"
        size = make_large_ct(SOURCE, args.slices, large)
        for name, volume, shape in (("original", SOURCE, volume_size(SOURCE)), ("large", large, size)):
            result = segment_peak_memory(volume, Path(folder) / f"{name}.seg.nrrd", extra, args.threads)
            voxels = shape[0] * shape[1] * shape[2]
            rows.append({"volume": name, "size": list(shape), "voxels": voxels, **result,
                         "bytes_per_voxel": result["peak_rss_mib"] * 2**20 / voxels})  # fmt: skip
            print(f"{name} {shape}: {result['peak_rss_mib']:.0f} MiB peak, {result['seconds']:.1f} s")
    ratio = rows[1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    report = {"rows": rows, "peak_ratio_large_vs_original": ratio, "threads": args.threads,
              "model": args.probe or "shipped default"}  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "segment_memory.json").write_text(json.dumps(report, indent=1))
    lines = ["# Peak memory of `diffusionseg segment`", "",
             "Command: `.venv/bin/python benchmarks/segment_memory.py` (see its docstring).", "",
             "| volume | size | voxels (M) | peak RSS (MiB) | bytes / input voxel | wall (s) |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['volume']} | {' x '.join(map(str, r['size']))} | {r['voxels'] / 1e6:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['bytes_per_voxel']:.1f} | {r['seconds']:.1f} |")  # fmt: skip
    growth = rows[1]["voxels"] / rows[0]["voxels"]
    lines += ["", f"Large vs original peak: {ratio:.2f}x for {growth:.2f}x the voxels ({args.threads} threads, "
              f"model: {report['model']})."]  # fmt: skip
    (OUT / "segment_memory.md").write_text("\n".join(lines) + "\n")
    print(f"large vs original peak memory: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
