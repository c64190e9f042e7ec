"""Run the main job on the bundled sample CT with the shipped defaults and say what was written.

Until the default backbone and probe are shipped, the demo runs the preprocessing pipeline (orientation, body
crop, resampling), checks that its inverse lands exactly on the input grid, and writes the anatomical
coordinate map of the shipped Body Part Regressor on the input grid.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.data.volume import read_volume, same_grid, volume_info, write_volume
from DiffusionSegLib.preprocess import prepare_volume, to_input_grid
from DiffusionSegLib.resources import sample_ct_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output-dir", default="diffusionseg-demo", help="folder for the outputs")
    parser.add_argument("--input", default=None, help="a CT to use instead of the bundled sample")


def run(args: argparse.Namespace) -> int:
    timings: dict[str, float] = {}
    out_dir = Path(args.output_dir)
    source = Path(args.input) if args.input else sample_ct_path()

    start = time.perf_counter()
    image = read_volume(source)
    timings["read"] = time.perf_counter() - start
    info = volume_info(image)
    print(f"input     {source}: {' x '.join(map(str, info['size']))} voxels, "
          f"{' x '.join(f'{s:g}' for s in info['spacing_mm'])} mm, {info['orientation']}")  # fmt: skip

    start = time.perf_counter()
    prepared = prepare_volume(image)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    body = sitk.Cast(prepared.image > prepared.config.body_threshold_hu, sitk.sitkUInt8)
    body_on_input = to_input_grid(body, prepared, "nearest")
    timings["map back"] = time.perf_counter() - start
    if not same_grid(body_on_input, image):
        raise RuntimeError("the inverse pipeline did not land on the input grid")

    from DiffusionSegLib.bpr import load_bpr, predict_body_coordinates

    start = time.perf_counter()
    bpr, _ = load_bpr()
    timings["load BPR"] = time.perf_counter() - start
    start = time.perf_counter()
    coordinates = predict_body_coordinates(prepared, bpr)
    timings["coordinates"] = time.perf_counter() - start

    start = time.perf_counter()
    coords_path = write_volume(coordinates, out_dir / "coordinates.nii.gz")
    working_path = write_volume(prepared.image, out_dir / "working_volume.nii.gz")
    mask_path = write_volume(body_on_input, out_dir / "body_mask.nii.gz")
    timings["write"] = time.perf_counter() - start

    fraction = float(np.mean(sitk.GetArrayViewFromImage(body_on_input)))
    print(f"wrote     {working_path}: working grid {' x '.join(map(str, prepared.image.GetSize()))} voxels at "
          f"{' x '.join(f'{s:g}' for s in prepared.config.spacing_mm)} mm (HU, LPS, cropped to the body)")  # fmt: skip
    print(f"wrote     {mask_path}: body mask on the exact input grid ({100 * fraction:.1f}% of voxels)")
    print(f"wrote     {coords_path}: anatomical coordinates (3 components: R→L, A→P, I→S, mm) on the input grid")
    print("timings   " + ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in timings.items()))
    print("note      no default backbone and probe are shipped yet: the demo ran preprocessing and coordinates only")
    return 0
