"""Show a volume's geometry, intensity statistics and whether it looks like CT."""

from __future__ import annotations

import argparse
import json

from DiffusionSegLib.data.volume import read_volume, volume_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", help="NIfTI / NRRD / MHA file or a DICOM series folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    info = volume_info(read_volume(args.volume))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"volume       {args.volume}")
    print(f"size         {' x '.join(map(str, info['size']))} voxels ({info['pixel_type']})")
    print(f"spacing      {' x '.join(f'{s:g}' for s in info['spacing_mm'])} mm")
    print(f"extent       {' x '.join(f'{e:g}' for e in info['extent_mm'])} mm")
    print(f"origin       ({', '.join(f'{o:g}' for o in info['origin_mm'])}) mm")
    print(f"orientation  {info.get('orientation', '?')} (direction {info['direction']})")
    if info["nonfinite_voxels"]:
        print(f"non-finite   {info['nonfinite_voxels']} NaN or infinite voxels (statistics below are of the others)")
    if "intensity" in info:
        i = info["intensity"]
        print(f"intensity    min {i['min']:g}  p1 {i['p1']:g}  median {i['median']:g}  p99 {i['p99']:g}  "
              f"max {i['max']:g}  mean {i['mean']:g}  std {i['std']:g}")  # fmt: skip
    print(f"looks like CT {'yes' if info['looks_like_ct'] else 'no'}: {info['ct_check']}")
    return 0
