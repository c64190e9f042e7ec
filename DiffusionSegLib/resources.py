"""Where the shipped resources (sample CT, default weights) live.

They sit in the repository's ``Resources/`` folder, beside the library; ``DIFFUSIONSEG_RESOURCES`` overrides it
(e.g. inside a Slicer extension build, where the layout differs).
"""

from __future__ import annotations

import os
from pathlib import Path

from DiffusionSegLib.errors import UserInputError

__all__ = ["resources_dir", "sample_ct_path", "default_backbone_path", "default_probe_path", "SAMPLE_CT_NAME",
           "DEFAULT_BACKBONE_NAME", "DEFAULT_PROBE_NAME"]

SAMPLE_CT_NAME = "totalseg_example_ct.nii.gz"
DEFAULT_BACKBONE_NAME = "backbone_default.safetensors"
DEFAULT_PROBE_NAME = "finetune_btcv13_default.safetensors"


def resources_dir() -> Path:
    """The folder holding the shipped resources."""
    override = os.environ.get("DIFFUSIONSEG_RESOURCES")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "Resources"


def sample_ct_path() -> Path:
    """The bundled sample CT (TotalSegmentator example, abdomen/pelvis at 3 mm, Apache-2.0)."""
    path = resources_dir() / "SampleData" / SAMPLE_CT_NAME
    if not path.is_file():
        raise UserInputError(f"the bundled sample CT is missing: {path} (set DIFFUSIONSEG_RESOURCES to Resources/)")
    return path


def _shipped_model(name: str, what: str) -> Path:
    path = resources_dir() / "Models" / name
    if not path.is_file():
        raise UserInputError(f"the shipped {what} is missing: {path} (set DIFFUSIONSEG_RESOURCES to Resources/)")
    return path


def default_backbone_path() -> Path:
    """The shipped default backbone (diffusion + BPR pretraining, ``configs/pretrain_default.toml``)."""
    return _shipped_model(DEFAULT_BACKBONE_NAME, "default backbone")


def default_probe_path() -> Path:
    """The shipped default model: the 13 BTCV abdominal organs, fine-tuned end to end from the default backbone
    (its fine-tuned backbone lies beside it, ``finetune_btcv13_default.backbone.safetensors``)."""
    return _shipped_model(DEFAULT_PROBE_NAME, "default 13-organ model")
