"""Configuration of backbone pretraining (diffusion with or without BPR, and the baselines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from DiffusionSegLib.config import config_from_dict, config_to_dict
from DiffusionSegLib.preprocess import PreprocessConfig, check_window

__all__ = [
    "PretrainConfig",
    "PretrainDataConfig",
    "BackboneConfig",
    "DiffusionConfig",
    "OptimConfig",
    "TrainingConfig",
    "METHODS",
]

METHODS = ("diffusion", "restorative", "contrastive", "random")


@dataclass
class PretrainDataConfig:
    images: list[str] = field(default_factory=list)
    """CT files, folders (every volume inside) or glob patterns."""
    window_hu: tuple[float, float] = (-1000.0, 1000.0)
    """HU window scaled to [0, 1] for the network input."""
    patch_size_vox: tuple[int, int, int] = (32, 96, 96)
    """Patch size (D, H, W) = (z, y, x) in working-grid voxels."""
    clip_probability: float = 0.25
    """Chance a patch is clipped to [-125, 275] HU first, so features do not depend on clipped copies (BTCV)."""
    val_volumes: int = 1
    """Volumes held out for the validation loss (0: none)."""
    val_patches: int = 8
    """Fixed held-out patches on which the validation loss is measured."""

    def __post_init__(self) -> None:
        self.window_hu = check_window(self.window_hu)
        if len(self.patch_size_vox) != 3 or min(self.patch_size_vox) < 1:
            raise ValueError(f"patch_size_vox {self.patch_size_vox} is invalid; expected three positive sizes")
        if not 0.0 <= self.clip_probability <= 1.0:
            raise ValueError(f"clip_probability {self.clip_probability} is outside [0, 1]")


@dataclass
class BackboneConfig:
    base_channels: int = 16
    """Channels of the finest level; doubled at each coarser level up to ``max_channels``."""
    num_scales: int = 5
    """Pyramid levels; patch sizes must be divisible by 2^(num_scales - 1)."""
    max_channels: int = 256
    """Channel cap of the coarse levels."""
    num_res_blocks: int = 2
    """Residual blocks per level in encoder and decoder (vox2vec: 2; 1 doubles the speed for CPU budgets)."""
    norm: Literal["batch", "group", "instance", "none"] = "batch"
    """Normalisation layer of the residual blocks."""
    act: Literal["relu", "silu", "gelu"] = "relu"
    """Activation of the residual blocks."""

    def __post_init__(self) -> None:
        if self.base_channels < 1 or self.num_scales < 1 or self.max_channels < self.base_channels:
            raise ValueError(f"backbone config is invalid: {self}")

    def to_dict(self) -> dict:
        return config_to_dict(self)


@dataclass
class DiffusionConfig:
    num_timesteps: int = 10
    """T, the number of diffusion steps (the paper's ablation found ~10 best)."""
    schedule: str = "ddpm_linear"
    """Beta schedule name (see ``DiffusionSegLib.diffusion``). ``ddpm_linear`` (DDPM's linspace(1e-4, 0.02, T))
    makes T set the strongest noise, as in the paper's timestep ablation (T = 10: alpha_bar_T ~ 0.9); ``linear``
    and ``cosine`` reach full noise for every T."""
    prediction_type: Literal["epsilon", "sample"] = "epsilon"
    """What the network predicts: the noise (DDPM) or the clean patch."""

    def __post_init__(self) -> None:
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps {self.num_timesteps} must be at least 1")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    """Max gradient norm (0: no clipping)."""


@dataclass
class TrainingConfig:
    steps: int = 10_000
    batch_size: int = 2
    """Patches per step per process."""
    seed: int = 0
    log_every: int = 10
    val_every: int = 200
    checkpoint_every: int = 200
    export_at: list[int] = field(default_factory=list)
    """Steps at which to also export the backbone as ``backbone_step{N}.safetensors`` (e.g. 2500 and 10000 of a
    20 000-step run), so that features can be compared against pretraining length."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = True
    """False forces float32 whatever ``precision`` says (older configs' switch)."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of the forward pass (``DiffusionSegLib.precision``): ``auto`` takes bfloat16 where it is faster
    and agrees (CUDA with bfloat16; CPUs with AMX or AVX512-BF16, confirmed by a cached calibration)."""
    channels_last: bool = True
    """channels_last_3d memory format on CUDA (ignored on CPU)."""
    progress: bool = True


@dataclass
class PretrainConfig:
    method: Literal["diffusion", "restorative", "contrastive", "random"] = "diffusion"
    """Pretraining objective: diffusion (the method), restorative / contrastive baselines, random init."""
    use_bpr: bool = True
    """Concatenate the BPR coordinate map to the network input (switch off for the ablation)."""
    bpr_weights: str = ""
    """BPR weights file; empty: the shipped default."""
    output_dir: str = "runs/pretrain"
    """Where snapshots (last.pt), the JSONL log and the exported backbone.safetensors go."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown; expected one of {list(METHODS)}")

    @property
    def in_channels(self) -> int:
        return 1 + (3 if self.use_bpr else 0)

    @property
    def time_conditioning(self) -> bool:
        return self.method == "diffusion"

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PretrainConfig:
        return config_from_dict(cls, data)
