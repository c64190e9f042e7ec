"""Configuration of end-to-end fine-tuning (saved with the fine-tuned model)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from DiffusionSegLib.config import config_from_dict, config_to_dict
from DiffusionSegLib.defaults import PSEUDO_BACKGROUND_MARGIN_MM

__all__ = ["FinetuneConfig", "INITS", "PSEUDO_LABELS", "REGISTRATIONS"]

INITS = ("pretrained", "random")
REGISTRATIONS = ("SyN", "SyNRA", "Affine")
PSEUDO_FUSIONS = ("agreement", "weighted-vote")
PSEUDO_LABELS = ("registration", "self-training", "registration+self-training")


@dataclass
class FinetuneConfig:
    """How a backbone and a segmentation head are trained end to end on labeled CT."""

    init: Literal["pretrained", "random"] = "pretrained"
    """Start from the backbone's pretrained weights, or from a random initialisation of the same network."""
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    """Working voxel size (x, y, z) of the fine-tuned model (recorded in its backbone file, so ``segment``
    prepares CTs the same way). 3 mm, measured against the backbone's 1.5 x 1.5 x 3 mm pretraining grid on 15 BTCV
    cases at 25 CPU-minutes each: held-out mean Dice 0.710 against 0.587 (4x fewer voxels, more anatomy per patch;
    README, "Working grid, measured")."""
    patch_size_vox: tuple[int, int, int] = (64, 64, 64)
    """Training patch and inference window (D, H, W) in working voxels; multiples of the backbone's divisor."""
    batch_size: int = 2
    """Patches per step."""
    budget_minutes: float = 15.0
    """Wall-clock budget of training and validation (0: use ``steps``). The cosine learning-rate schedule follows
    the share of the budget spent, so it spans the budget whatever the machine's rate; a resumed run continues
    from the saved time."""
    steps: int = 0
    """Optimiser steps when ``budget_minutes`` is 0 (or a cap on the steps within the budget; 0: no cap)."""
    lr: float = 1e-3
    """Peak AdamW learning rate (after warm-up), decayed by a cosine to 0 at the last step."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 1e-5
    """AdamW weight decay."""
    backbone_lr_scale: float = 1.0
    """The backbone's learning rate as a share of the head's (1: one rate for all; below 1 keeps the pretrained
    weights closer to where pretraining left them)."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (0: off). Validation, the kept checkpoint and the written model
    use the average; its decay warms up as min(ema_decay, (1 + n) / (10 + n)) over the first n updates."""
    rotate_deg: float = 15.0
    """Random rotation about each axis, uniform in [-rotate_deg, rotate_deg] (0: none). No flips: kidneys and
    adrenals are sided."""
    scale: float = 0.15
    """Random zoom per axis in [1 - scale, 1 + scale] (0: none)."""
    augment_probability: float = 0.8
    """Chance a patch is rotated and zoomed."""
    intensity_scale: float = 0.1
    """Random intensity scaling of the windowed image, factor in [1 - s, 1 + s]."""
    intensity_shift: float = 0.1
    """Random intensity shift of the windowed image (its range is [0, 1]), in [-s, s]."""
    enhancement_hu: tuple[float, float] = (20.0, 250.0)
    """Contrast-phase simulation: each organ in a patch gets a random mean HU in this range (the shared BTCV scans'
    organ medians span 22-258 HU between unenhanced and arterial phases)."""
    enhancement_probability: float = 0.5
    """Chance a patch's organs are re-enhanced (0: off)."""
    gamma_range: tuple[float, float] = (0.7, 1.5)
    """Random gamma of the windowed image (MONAI ``RandAdjustContrast``; nnU-Net's range)."""
    gamma_probability: float = 0.3
    """Chance of a gamma change."""
    blur_sigma_vox: tuple[float, float] = (0.5, 1.0)
    """Gaussian blur sigma range in voxels (a smoother reconstruction kernel)."""
    blur_probability: float = 0.2
    """Chance of a blur."""
    noise_std: float = 0.03
    """Largest standard deviation of added Gaussian noise, in window units (0.03 = 12 HU for a 400 HU window)."""
    noise_probability: float = 0.15
    """Chance of noise."""
    use_coordinates: bool = True
    """Feed the BPR coordinates (for a backbone pretrained with them). Off: the coordinate channels are zero in
    training and the stem's weights for them are zeroed in the written model, so its output does not depend on
    them (measured because exact coordinates let a few-shot network memorise where its training organs lay)."""
    coordinate_jitter_mm: tuple[float, float, float] = (30.0, 30.0, 80.0)
    """Random offset added to a patch's BPR coordinates, uniform in [-j, j] per axis (x, y, z) in mm. The
    coordinates of one organ differ between patients by tens of mm (most along z); without the jitter a network
    trained on few scans memorises their exact values and fails on other patients (measured: 2 training scans,
    test mean Dice 0.03)."""
    unlabeled_share: float = 0.5
    """Share of each batch cut from the unlabeled scans (their propagated pseudo-labels) when unlabeled scans are
    given; the rest comes from the labeled scans, so a few true labels are not outvoted by many propagated ones."""
    pseudo_labels: str = "registration"
    """Where the unlabeled scans' labels come from: ``"registration"`` (each labeled scan registered to each
    unlabeled one, warped labels kept where all agree) or ``"self-training"`` (the network trains on the labeled
    scans alone for ``self_training_start`` of the run, then labels the unlabeled scans itself, keeping the voxels
    it predicts with at least ``pseudo_confidence``; no registration) or ``"registration+self-training"``
    (registration's labels until ``self_training_start`` of the run, then the network, taught by them and the
    labeled scans, relabels the unlabeled scans with its confident voxels: a second round in the same budget)."""
    self_training_start: float = 0.5
    """Share of the run (of the budget, or of the steps) before self-training labels the unlabeled scans (trained
    until then on the labeled scans alone, or with registration's labels too)."""
    pseudo_confidence: float = 0.9
    """Self-training keeps a voxel's predicted class where its softmax probability is at least this; the rest is
    left out of the loss."""
    pseudo_background_margin_mm: float = PSEUDO_BACKGROUND_MARGIN_MM
    """Background pseudo-labels are kept only farther than this from every pseudo-labeled organ voxel and every
    unsure voxel (registration: where the atlases disagree; self-training: below ``pseudo_confidence``); nearer,
    they are left out of the loss (:func:`~DiffusionSegLib.cohort.pseudo_labels.ignore_background_near_organs`).
    0: every background pseudo-label counts. Default 12 mm, the measured best
    (:data:`DiffusionSegLib.defaults.PSEUDO_BACKGROUND_MARGIN_MM`); without unlabeled scans it does nothing, and
    :meth:`as_trained` records it as 0."""
    pseudo_fusion: str = "agreement"
    """How the registered labeled scans' labels are fused into one pseudo-label map per unlabeled scan:
    ``"agreement"`` (a label where all atlases agree, the rest left out of the loss) or ``"weighted-vote"`` (each
    atlas votes with a weight from how well its warped image matches the scan around the voxel; a label where one
    class has 70 % of the vote; an atlas without an organ abstains where another places it:
    :func:`~DiffusionSegLib.cohort.pseudo_labels.fuse_by_local_similarity`)."""
    registration: str = "SyN"
    """How labeled scans are registered to the unlabeled ones (ANTs ``type_of_transform``: ``"SyN"``,
    ``"SyNRA"``, ``"Affine"``)."""
    registration_bpr_start: bool = True
    """Start each registration from the BPR coordinates (else ANTs' centre-of-mass start)."""
    val_volumes: int = 1
    """Labeled volumes held out to choose the checkpoint (used when at least 3 volumes are given; with fewer,
    the last model is kept, the end of the cosine schedule)."""
    val_every: int = 100
    """Steps between validations (mean Dice of the held-out volume, whole-volume sliding window)."""
    checkpoint_every: int = 50
    """Steps between resumable snapshots (``last.pt`` in the run folder)."""
    timestep: int = 0
    """Diffusion step t of the input (as in feature extraction; t = 0 is the clean image for T = 10)."""
    overlap: float = 0.25
    """Sliding-window overlap at validation and inference."""
    seed: int = 0
    """Seed of initialisation, patch sampling and augmentation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the network trains."""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """Arithmetic of the forward pass (``torch.autocast``; weights, optimiser and loss stay float32). ``auto``:
    bfloat16 where it is faster and agrees (``DiffusionSegLib.precision``: CUDA with bfloat16, CPUs with AMX or
    AVX512-BF16 confirmed by a cached calibration), else float32; the choice is recorded in the model's metadata.
    Measured on 2 AMX cores: a step of the default backbone 1.18 s in float32, 0.71 s in bfloat16."""

    def __post_init__(self) -> None:
        from DiffusionSegLib.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is unknown; expected one of {list(PRECISIONS)}")
        if self.init not in INITS:
            raise ValueError(f"init {self.init!r} is unknown; expected one of {list(INITS)}")
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)  # type: ignore[assignment]
        self.patch_size_vox = tuple(int(s) for s in self.patch_size_vox)  # type: ignore[assignment]
        self.coordinate_jitter_mm = tuple(float(s) for s in self.coordinate_jitter_mm)  # type: ignore[assignment]
        for name in ("enhancement_hu", "gamma_range", "blur_sigma_vox"):
            pair = tuple(float(v) for v in getattr(self, name))
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ValueError(f"{name} {getattr(self, name)} is invalid; expected (low, high) with low <= high")
            setattr(self, name, pair)
        if min(self.gamma_range) <= 0 or min(self.blur_sigma_vox) < 0 or self.noise_std < 0:
            raise ValueError("gamma_range must be positive; blur_sigma_vox and noise_std must not be negative")
        for name in ("enhancement_probability", "gamma_probability", "blur_probability", "noise_probability"):
            if not 0 <= float(getattr(self, name)) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} must lie in [0, 1]")
        if len(self.coordinate_jitter_mm) != 3 or min(self.coordinate_jitter_mm) < 0:
            raise ValueError(f"coordinate_jitter_mm {self.coordinate_jitter_mm} is invalid; expected three sizes >= 0")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm {self.spacing_mm} is invalid; expected three positive sizes in mm")
        if len(self.patch_size_vox) != 3 or min(self.patch_size_vox) < 1:
            raise ValueError(f"patch_size_vox {self.patch_size_vox} is invalid; expected three positive sizes")
        for name in ("batch_size", "val_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be a positive integer")
        if self.budget_minutes < 0 or self.steps < 0 or self.warmup_steps < 0 or self.val_volumes < 0:
            raise ValueError("budget_minutes, steps, warmup_steps and val_volumes must not be negative")
        if self.budget_minutes == 0 and self.steps == 0:
            raise ValueError("give a budget in minutes or a number of steps")
        if self.lr <= 0 or not 0 <= self.augment_probability <= 1 or not 0 <= self.overlap < 1:
            raise ValueError(f"lr {self.lr} must be positive, augment_probability {self.augment_probability} in "
                             f"[0, 1] and overlap {self.overlap} in [0, 1)")  # fmt: skip
        if not 0 <= self.unlabeled_share <= 1:
            raise ValueError(f"unlabeled_share {self.unlabeled_share} must lie in [0, 1]")
        if self.pseudo_labels not in PSEUDO_LABELS:
            raise ValueError(f"pseudo_labels {self.pseudo_labels!r} is unknown; expected one of {list(PSEUDO_LABELS)}")
        if not 0 < self.self_training_start < 1 or not 0 < self.pseudo_confidence <= 1:
            raise ValueError(f"self_training_start {self.self_training_start} must lie in (0, 1) and pseudo_confidence "
                             f"{self.pseudo_confidence} in (0, 1]")  # fmt: skip
        if self.pseudo_background_margin_mm < 0:
            raise ValueError(f"pseudo_background_margin_mm {self.pseudo_background_margin_mm} must not be negative")
        if self.pseudo_fusion not in PSEUDO_FUSIONS:
            raise ValueError(f"pseudo_fusion {self.pseudo_fusion!r} is unknown; expected one of {list(PSEUDO_FUSIONS)}")
        if self.registration not in REGISTRATIONS:
            raise ValueError(f"registration {self.registration!r} is unknown; expected one of {list(REGISTRATIONS)}")
        if not 0 <= self.ema_decay < 1 or self.backbone_lr_scale <= 0:
            raise ValueError(f"ema_decay {self.ema_decay} must lie in [0, 1) and backbone_lr_scale "
                             f"{self.backbone_lr_scale} must be positive")  # fmt: skip
        if not 0 <= self.scale < 1 or self.rotate_deg < 0 or self.intensity_scale < 0 or self.intensity_shift < 0:
            raise ValueError("scale must lie in [0, 1); rotate_deg and the intensity ranges must not be negative")

    def as_trained(self, unlabeled: bool) -> FinetuneConfig:
        """These settings as a run with (``unlabeled``) or without unlabeled scans uses them: without, the
        pseudo-label margin does nothing and is recorded as 0 (so the run's record and reuse key say what acted)."""
        if unlabeled or self.pseudo_background_margin_mm == 0:
            return self
        return dataclasses.replace(self, pseudo_background_margin_mm=0.0)

    def to_dict(self) -> dict:
        # fields added after runs were recorded: left out at their defaults so the recorded runs' keys still match
        data = config_to_dict(self, omit_at_default=("backbone_lr_scale", "ema_decay", "unlabeled_share",
                                                     "registration", "registration_bpr_start", "pseudo_labels",
                                                     "self_training_start", "pseudo_confidence",
                                                     "pseudo_fusion"))  # fmt: skip
        # the margin is written when it is not 0 (its default when runs were first recorded), whatever today's
        # default: a record without it means 0, one with it the margin it names (12 mm rows keep their keys)
        if data["pseudo_background_margin_mm"] == 0:
            del data["pseudo_background_margin_mm"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneConfig:
        return config_from_dict(cls, {"pseudo_background_margin_mm": 0.0, **data})  # absent: recorded before 12 mm
