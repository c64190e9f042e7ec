"""Configuration of a few-shot probe: the head, the frozen features it reads, and how it is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from DiffusionSegLib.config import config_from_dict, config_to_dict
from DiffusionSegLib.features import FeatureConfig

__all__ = ["ProbeConfig", "HEADS", "QUICK_PROBE"]

HEADS = ("linear", "nonlinear", "context")

QUICK_PROBE = {"head": "context", "reads_input": True, "hidden_channels": 32, "steps": 600, "patience": 8,
               "val_every": 25}  # fmt: skip
"""The quick in-app probe (``train-probe --quick``, the Slicer "context" head): the spatial-context head reading
the CT and its coordinates next to the frozen pyramid, 32 channels wide (a step 2.5x cheaper than 64), stopped
when its held-out loss has not improved for 8 validations; from 2 labeled scans it trains in under 3 minutes on
2 CPU cores (README, "Quick probe")."""


@dataclass
class ProbeConfig:
    """Everything that defines a probe (saved with its weights)."""

    head: Literal["linear", "nonlinear", "context"] = "nonlinear"
    """Head on the frozen pyramid: a linear map (1x1x1 conv per level), a light non-linear FPN decoder of 1x1x1
    blocks, or ``context``: the same decoder with 3x3x3 blocks on the coarser levels (spatial context)."""
    hidden_channels: int = 64
    """Width of the non-linear head."""
    reads_input: bool = False
    """The head also reads the CT's intensity and BPR coordinates at full resolution, next to the frozen pyramid
    (``FeatureConfig.with_input``)."""
    timestep: int = 0
    """Diffusion step t at which the CT is noised before the backbone (see ``FeatureConfig.timestep``)."""
    noise_seed: int = 0
    """Seed of the whole-volume noise field (fixed: the same CT always gives the same features)."""
    num_noise_draws: int = 1
    """Noise fields: training patches cycle through them, inference averages over them (>1: uncertainty)."""
    patch_size_vox: tuple[int, int, int] = (32, 64, 64)
    """Training patch (D, H, W) in working voxels; multiples of the backbone's size divisor."""
    patches_per_volume: int = 24
    """Patches cut from each labeled volume into the feature cache (class-balanced, nnU-Net style)."""
    val_fraction: float = 0.2
    """Share of cached patches held out for early stopping when no whole volume is held out."""
    max_val_patches: int = 32
    """Cap on the held-out patches (validation runs every ``val_every`` steps over all of them)."""
    val_volumes: int = 0
    """Labeled volumes held out for early stopping instead (used only when more volumes remain to train on)."""
    steps: int = 300
    """Optimiser steps on the cached features."""
    train_crop_vox: tuple[int, int, int] | None = (16, 32, 32)
    """Each training step reads random crops of this size (D, H, W) from the cached patches' features instead of
    whole patches (None: whole patches). The 1x1x1 heads lose no context to a crop (the context head only at
    the crop's border); it makes a step ~8x cheaper, which buys a batch of many different places. Multiples of
    the backbone's size divisor; clipped to ``patch_size_vox``."""
    batch_size: int = 8
    """Patches (or crops) per step."""
    lr: float = 1e-2
    """AdamW learning rate (the heads are small and the features frozen: a high rate converges in ~100 steps)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    val_every: int = 25
    """Steps between validations; the best head so far is kept."""
    patience: int = 0
    """Stop after this many validations without improvement (0: never stop early)."""
    lr_drops: int = 0
    """On such a plateau, go back to the best head and divide the learning rate by 10, up to this many times,
    before stopping (0: stop at the first plateau). The constant rate that converges fast is also noisy: the
    15-case probe's held-out loss was still falling when its first plateau stopped it."""
    seed: int = 0
    """Seed of patch sampling, head initialisation and batch order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the backbone and head run."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of the backbone while caching features (``DiffusionSegLib.precision``); a trained probe records
    the resolved choice. The head trains in float32."""
    window_vox: tuple[int, int, int] | None = None
    """Sliding-window size at inference; None: the backbone's pretraining patch size."""
    overlap: float = 0.25
    """Sliding-window overlap at inference."""

    def __post_init__(self) -> None:
        from DiffusionSegLib.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is unknown; expected one of {list(PRECISIONS)}")
        if self.head not in HEADS:
            raise ValueError(f"head {self.head!r} is unknown; expected one of {list(HEADS)}")
        self.patch_size_vox = tuple(int(s) for s in self.patch_size_vox)  # type: ignore[assignment]
        if len(self.patch_size_vox) != 3 or min(self.patch_size_vox) < 1:
            raise ValueError(f"patch_size_vox {self.patch_size_vox} is invalid; expected three positive sizes")
        if self.train_crop_vox is not None:
            self.train_crop_vox = tuple(int(s) for s in self.train_crop_vox)  # type: ignore[assignment]
            if len(self.train_crop_vox) != 3 or min(self.train_crop_vox) < 1:
                raise ValueError(f"train_crop_vox {self.train_crop_vox} is invalid; expected three positive sizes")
        for name in ("hidden_channels", "num_noise_draws", "patches_per_volume", "batch_size", "val_every",
                     "max_val_patches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be a positive integer")
        if self.steps < 0 or self.patience < 0 or self.lr_drops < 0 or self.val_volumes < 0 or self.timestep < 0:
            raise ValueError(f"steps {self.steps}, patience {self.patience}, lr_drops {self.lr_drops}, val_volumes "
                             f"{self.val_volumes} and timestep {self.timestep} must not be negative")  # fmt: skip
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction} is outside [0, 1)")
        if self.lr <= 0:
            raise ValueError(f"lr {self.lr} must be positive")
        self.feature_config()  # checks window and overlap

    @property
    def train_crop(self) -> tuple[int, int, int] | None:
        """The crop actually used: ``train_crop_vox`` clipped to the patch size (None: whole patches)."""
        if self.train_crop_vox is None:
            return None
        return tuple(min(c, p) for c, p in zip(self.train_crop_vox, self.patch_size_vox))  # type: ignore[return-value]

    def feature_config(self, **overrides: object) -> FeatureConfig:
        """The :class:`FeatureConfig` of this probe (timestep, noise, window), with optional overrides."""
        options: dict = {"timestep": self.timestep, "noise_seed": self.noise_seed,
                         "num_noise_draws": self.num_noise_draws, "window_vox": self.window_vox,
                         "overlap": self.overlap, "device": self.device, "with_input": self.reads_input}  # fmt: skip
        options.update(overrides)
        return FeatureConfig(**options)

    def head_channels(self, backbone_channels, use_bpr: bool) -> list[int]:
        """Channels per pyramid level that this probe's head reads from a backbone with ``backbone_channels``."""
        from DiffusionSegLib.features import pyramid_channels

        return pyramid_channels(backbone_channels, self.reads_input, 3 if use_bpr else 0)

    def to_dict(self) -> dict:
        return config_to_dict(self, omit_at_default=("lr_drops",))  # added after probes were recorded

    @classmethod
    def from_dict(cls, data: dict) -> ProbeConfig:
        return config_from_dict(cls, data)
