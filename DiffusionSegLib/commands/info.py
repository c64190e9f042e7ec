"""Show what a file is: a CT volume (geometry, intensity statistics, whether it looks like CT) or a DiffusionSeg
model file (``.safetensors``: its kind, organs, training scans and settings, read from its metadata alone)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from DiffusionSegLib.data.volume import read_volume, volume_info

MODEL_SETTINGS = {
    "probe": ("head", "hidden_channels", "steps", "patch_size_vox", "timestep", "num_noise_draws", "window_vox"),
    "finetune": ("init", "spacing_mm", "patch_size_vox", "budget_minutes", "steps", "lr", "use_coordinates",
                 "pseudo_labels", "pseudo_background_margin_mm", "seed", "precision"),
    "backbone": ("method", "use_bpr", "spacing_mm", "num_timesteps", "patch_size_vox", "steps"),
    "bpr": ("design", "spacing_mm", "channels", "steps"),
}
"""The settings ``info`` lists for each kind of model file."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", metavar="FILE", help="a CT (NIfTI / NRRD / MHA file or a DICOM series folder) or a "
                        "model file (.safetensors: probe, fine-tuned model, backbone or BPR)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _names(paths) -> list[str]:
    return [Path(str(p)).name for p in paths or []]


def model_info(path: str | Path) -> dict:
    """What a model file holds, from its safetensors metadata: ``{"file", "kind", "description", "organs",
    "training_scans", "unlabeled_scans", "settings", "backbone", "version", "git_commit"}``.

    Raises:
        UserInputError: not a DiffusionSeg weights file.
    """
    from DiffusionSegLib.checkpoint import read_weights_header

    config, metadata = read_weights_header(path)
    kind, extra = metadata.get("kind"), metadata.get("extra") or {}
    info = {"file": str(path), "kind": kind, "organs": [], "training_scans": None, "unlabeled_scans": [],
            "settings": {}, "backbone": None, "version": metadata.get("version"),
            "git_commit": metadata.get("git_commit")}  # fmt: skip
    if kind == "probe":
        record = config.get("finetune") or {}
        probe = config.get("probe") or {}
        info["organs"] = [label.get("name", "?") for label in config.get("labels", [])]
        backbone = config.get("backbone") or {}
        info["backbone"] = {"file": Path(str(backbone.get("path", ""))).name, "sha256": backbone.get("sha256"),
                            "method": backbone.get("method"), "use_bpr": backbone.get("use_bpr")}  # fmt: skip
        if record:
            info["kind"] = "fine-tuned"
            info["description"] = "fine-tuned model (backbone and head trained end to end; its backbone beside it)"
            cases = record.get("cases") or []
            info["training_scans"] = _names(c for c in cases if not str(c).startswith("unlabeled: "))
            info["unlabeled_scans"] = _names(str(c).removeprefix("unlabeled: ") for c in cases
                                             if str(c).startswith("unlabeled: "))  # fmt: skip
            settings = dict(record.get("finetune") or {})
            settings.setdefault("pseudo_background_margin_mm", 0.0)  # absent in a record: 0 (see FinetuneConfig)
            info["settings"] = {k: settings[k] for k in MODEL_SETTINGS["finetune"] if k in settings}
            info["settings"]["steps_trained"] = record.get("steps")
        else:
            info["description"] = "probe (a head on a frozen backbone)"
            info["settings"] = {k: probe[k] for k in MODEL_SETTINGS["probe"] if k in probe}
            cases = extra.get("cases")
            info["training_scans"] = _names(cases) if cases else None
    elif kind == "backbone":
        pretrain = config.get("pretrain") or {}
        settings = {"method": pretrain.get("method", extra.get("method")), "use_bpr": pretrain.get("use_bpr"),
                    "spacing_mm": (pretrain.get("preprocess") or {}).get("spacing_mm"),
                    "num_timesteps": (pretrain.get("diffusion") or {}).get("num_timesteps"),
                    "patch_size_vox": (pretrain.get("data") or {}).get("patch_size_vox"), "steps": extra.get("steps")}
        info["settings"] = {k: v for k, v in settings.items() if v is not None}
        if extra.get("finetuned_from"):
            info["description"] = "fine-tuned backbone (the network of a fine-tuned model)"
            info["training_scans"] = _names((extra.get("finetune") or {}).get("cases") or extra.get("cases"))
        else:
            info["description"] = "pretrained backbone (unlabeled CT: " + (
                "diffusion + BPR coordinates)" if pretrain.get("use_bpr") else f"{settings['method']})")
            info["training_scans"] = list(((pretrain.get("data") or {}).get("images")) or []) or None
    elif kind == "bpr":
        info["description"] = "Body Part Regressor (dense anatomical coordinates, trained without labels)"
        settings = dict(config, design=config.get("design", "patch"), steps=extra.get("step", config.get("steps")))
        info["settings"] = {k: settings[k] for k in MODEL_SETTINGS["bpr"] if k in settings}
        info["training_scans"] = _names(extra.get("training_volumes")) or None
    else:
        info["description"] = f"weights of kind {kind!r}"
    return info


def _print_model(info: dict) -> None:
    def value(v) -> str:
        return " x ".join(f"{x:g}" for x in v) if isinstance(v, list) and all(isinstance(x, float) for x in v) \
            else " ".join(map(str, v)) if isinstance(v, list) else str(v)  # fmt: skip

    print(f"model        {info['file']}")
    print(f"kind         {info['kind']}: {info['description']}")
    if info["organs"]:
        print(f"organs       {len(info['organs'])}: {', '.join(info['organs'])}")
    scans = info["training_scans"]
    if not scans:
        print("trained on   not recorded in the file")
    elif all(Path(s).name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")) for s in scans):
        print(f"trained on   {len(scans)} scan(s): {', '.join(scans)}")
    else:  # a pretraining config's data: folders and patterns
        print(f"trained on   the CT of: {', '.join(scans)}")
    if info["unlabeled_scans"]:
        print(f"unlabeled    {len(info['unlabeled_scans'])} scan(s): {', '.join(info['unlabeled_scans'])}")
    if info["backbone"]:
        b = info["backbone"]
        print(f"backbone     {b['file'] or '?'} ({b['method']}{' + BPR' if b['use_bpr'] else ''}, sha256 "
              f"{str(b['sha256'])[:12]})")  # fmt: skip
    for name, v in info["settings"].items():
        print(f"  {name:<28} {value(v)}")
    print(f"written by   DiffusionSeg {info['version']} (commit {str(info['git_commit'])[:12]})")


def run(args: argparse.Namespace) -> int:
    if str(args.volume).lower().endswith(".safetensors"):
        info = model_info(args.volume)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_model(info)
        return 0
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
