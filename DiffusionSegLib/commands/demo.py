"""Run the main job on the bundled sample CT with the shipped defaults and say what was written.

The shipped 13-organ BTCV model (``finetune_btcv13_default``, fine-tuned end to end from the diffusion + BPR
backbone) segments the sample CT (or ``--input``) as ``segment`` does (each organ's largest component);
the demo writes the label map (NIfTI and Slicer ``.seg.nrrd``), the BPR coordinate map and a PNG preview
(axial and coronal overlays), all on the exact input grid, and prints how long each stage took.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.data.gate import read_ct, refuse_writing_over
from DiffusionSegLib.data.volume import same_grid, volume_info, write_volume
from DiffusionSegLib.errors import UserInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from DiffusionSegLib.commands import options

    options.add_output(parser, required=False, default="diffusionseg-demo", help="folder for the outputs (default "
                       "diffusionseg-demo)", old=("--output-dir",))  # fmt: skip
    parser.add_argument("--input", default=None, help="a CT to use instead of the bundled sample")
    parser.add_argument("--probe", default=None, help="a model to use instead of the shipped 13-organ BTCV model "
                        "(finetune_btcv13_default)")  # fmt: skip
    options.add_backbone(parser, default=None, help="its backbone (default: the one the model records)")
    options.add_device(parser)
    options.add_precision(parser)


OUTPUT_NAMES = ("segmentation.nii.gz", "segmentation.seg.nrrd", "coordinates.nii.gz", "preview.png")
"""What the demo writes into its output folder."""

SEGMENT_STAGES = {"prepare": "preprocess", "bpr": "BPR", "features": "backbone + probe",
                  "to_input_grid": "to input grid", "cleanup": "largest components"}  # fmt: skip
"""``segment``'s timed stages and their names in the demo's report."""


class _Stages:
    """Wall time of each named stage, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, function, *args, **kwargs):
        start = time.perf_counter()
        value = function(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return value


def _preview(image: sitk.Image, labels: sitk.Image, organs, path: Path, title: str) -> Path:
    from DiffusionSegLib.evaluate.plots import plot_overlay_preview

    ct_lps, labels_lps = sitk.DICOMOrient(image, "LPS"), sitk.DICOMOrient(labels, "LPS")
    return plot_overlay_preview(sitk.GetArrayFromImage(ct_lps), sitk.GetArrayFromImage(labels_lps), organs, path,
                                spacing_mm=ct_lps.GetSpacing(), title=title)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.bpr import load_bpr
    from DiffusionSegLib.features import backbone_bpr_path, resolve_device
    from DiffusionSegLib.pretrain.export import load_backbone
    from DiffusionSegLib.probe import find_probe_backbone, load_probe, segment, write_segmentation
    from DiffusionSegLib.resources import default_probe_path, sample_ct_path

    from DiffusionSegLib.defaults import SEGMENT_OPTIONS

    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"output folder '{out_dir}' is a file; expected a folder (it is created if missing)")
    for name in OUTPUT_NAMES:
        refuse_writing_over(out_dir / name, (args.input, args.probe, args.backbone), "demo output")
    source = Path(args.input) if args.input else sample_ct_path()
    stages = _Stages()
    started = time.perf_counter()

    image = stages.run("read", read_ct, source)
    info = volume_info(image)
    print(f"input     {source}: {' x '.join(map(str, info['size']))} voxels, "
          f"{' x '.join(f'{s:g}' for s in info['spacing_mm'])} mm, {info['orientation']}", flush=True)  # fmt: skip

    probe_path = Path(args.probe) if args.probe else default_probe_path()
    backbone = stages.run("load models", load_backbone, args.backbone or find_probe_backbone(probe_path))
    probe = stages.run("load models", load_probe, probe_path, backbone)
    bpr = stages.run("load models", load_bpr, backbone_bpr_path(backbone))[0] if backbone.use_bpr else None
    print(f"models    backbone {backbone.path.name} ({backbone.pretrain.method}"
          f"{' + BPR' if backbone.use_bpr else ''}), probe {probe_path.name} ({len(probe.labels)} organs, "
          f"{probe.config.head} head)", flush=True)  # fmt: skip

    result = segment(image, probe, backbone, **SEGMENT_OPTIONS, device=args.device, bpr=bpr,
                     coordinates=backbone.use_bpr, precision=args.precision)  # the map the backbone was fed; a backbone without BPR has none
    for stage, name in SEGMENT_STAGES.items():
        stages.seconds[name] = result.seconds[stage]
    if not same_grid(result.labels, image):
        raise RuntimeError("the segmentation did not land on the input grid")

    nifti = stages.run("write", write_segmentation, result, out_dir / "segmentation.nii.gz")
    seg_nrrd = stages.run("write", write_segmentation, result, out_dir / "segmentation.seg.nrrd")
    coords_path = None
    if result.coordinates is not None:
        coords_path = stages.run("write", write_volume, result.coordinates, out_dir / "coordinates.nii.gz")
    png = stages.run("preview", _preview, image, result.labels, result.organs, out_dir / "preview.png",
                     f"DiffusionSeg: {source.name}")  # fmt: skip
    total = time.perf_counter() - started

    array = sitk.GetArrayViewFromImage(result.labels)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    found = [(o.name, float(np.count_nonzero(array == o.value)) * voxel_ml) for o in result.organs]
    print(f"organs    {', '.join(f'{name} {ml:.0f} ml' for name, ml in found)}")
    if result.not_found:
        print(f"          not found: {', '.join(result.not_found)}")
    print(f"wrote     {nifti}: label map on the exact input grid (ids as in the BTCV legend)")
    print(f"wrote     {seg_nrrd}: Slicer segmentation (named, coloured segments with terminology)")
    if coords_path is not None:
        print(f"wrote     {coords_path}: anatomical coordinates (3 components: R→L, A→P, I→S, mm) on the input grid")
    print(f"wrote     {png}: axial and coronal overlays")
    print("timings   " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in stages.seconds.items()))
    print(f"total     {total:.1f} s on {resolve_device(args.device).type}, model loading included")
    return 0
