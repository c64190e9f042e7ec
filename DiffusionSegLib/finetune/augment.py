"""Training patches for fine-tuning: class-balanced cuts with spatial and intensity augmentation.

Spatial: MONAI ``RandAffine`` (rotation, zoom; no flips: kidneys and adrenals are sided) on a cut 1.35x larger
than the training patch, so rotated corners hold real anatomy.

Intensity, in this order, on the windowed image (the window maps to [0, 1]):

* **contrast-phase simulation** (:func:`simulate_enhancement`): every organ in the patch gets a random mean HU
  drawn from a plausible range, its border smoothed, then the window's clipping. A CT's contrast phase moves
  organs' HU by up to ~200 HU while fat, air and bone stay: in the shared BTCV scans the liver lies at
  27-142 HU and the kidneys at 22-258 HU (medians). Global intensity transforms cannot imitate that, and a
  network trained on two unenhanced scans otherwise finds nothing in an enhanced one;
* gamma (MONAI ``RandAdjustContrast``), scale and shift, Gaussian blur and Gaussian noise (the nnU-Net set);
* a random offset of the patch's BPR coordinates (a coarse prior: one organ's coordinates differ between
  patients by tens of mm).

All randomness comes from the caller's ``numpy`` generator, so a resumed run repeats the same patches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from DiffusionSegLib.finetune.config import FinetuneConfig

__all__ = ["PatchAugment", "simulate_enhancement"]

CUT_GROWTH = 1.35
"""Cut size over training patch size when rotating or zooming (covers a 15 degree rotation's corners)."""


def simulate_enhancement(image: torch.Tensor, classes: torch.Tensor, target_mean: np.ndarray,
                         sigma_vox: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Move each organ's mean intensity to a target, as another contrast phase would.

    Args:
        image: (D, H, W) windowed image in [0, 1].
        classes: (D, H, W) class indices (0 = background, left unchanged).
        target_mean: target mean per class index in window units (entry 0 unused; NaN leaves a class unchanged).
        sigma_vox: Gaussian smoothing of the offset field in voxels, so that organ borders stay partial-volume
            blurred rather than becoming label-shaped steps.

    Returns:
        The image with the organ offsets added, clipped to [0, 1] (the window saturates as a real scan's does).
    """
    from monai.transforms import GaussianSmooth

    offsets = torch.zeros(len(target_mean), dtype=image.dtype)
    flat_image, flat_classes = image.reshape(-1), classes.reshape(-1).long()
    for c in range(1, len(target_mean)):
        if math.isnan(float(target_mean[c])):
            continue
        inside = flat_classes == c
        if bool(inside.any()):
            offsets[c] = float(target_mean[c]) - float(flat_image[inside].mean())
    indices = classes.long()
    field = offsets[torch.where(indices < len(target_mean), indices, 0)]  # unknown voxels (IGNORE) stay
    if sigma_vox > 0:
        field = torch.as_tensor(GaussianSmooth(sigma=sigma_vox)(field[None]))[0]
    return (image + field).clamp(0.0, 1.0)


def _plain(data) -> torch.Tensor:
    """A MONAI transform's output as a plain tensor (no metadata tracking)."""
    from monai.utils import convert_to_tensor

    return convert_to_tensor(data, track_meta=False)


class PatchAugment:
    """Cut a class-balanced patch of a :class:`~DiffusionSegLib.probe.sampling.LabeledVolume` and augment it.

    Args:
        cfg: the fine-tuning settings (augmentation ranges and probabilities).
        window_hu: the backbone's HU window (converts ``cfg.enhancement_hu`` into window units).
        num_classes: classes including background.
    """

    def __init__(self, cfg: FinetuneConfig, window_hu: tuple[float, float], num_classes: int) -> None:
        from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandGaussianNoise, RandGaussianSmooth

        self.cfg = cfg
        self.num_classes = int(num_classes)
        low, high = (float(v) for v in window_hu)
        self.enhancement_range = tuple((hu - low) / (high - low) for hu in cfg.enhancement_hu)
        grow = CUT_GROWTH if (cfg.rotate_deg or cfg.scale) else 1.0
        self.cut_size = tuple(math.ceil(s * grow) for s in cfg.patch_size_vox)
        angle = math.radians(cfg.rotate_deg)
        self.affine = RandAffine(prob=cfg.augment_probability, rotate_range=(angle, angle, angle),
                                 scale_range=(cfg.scale,) * 3, spatial_size=cfg.patch_size_vox,
                                 padding_mode="border", cache_grid=False, lazy=False)  # fmt: skip
        sigma = tuple(cfg.blur_sigma_vox)
        self.gamma = RandAdjustContrast(prob=cfg.gamma_probability, gamma=tuple(cfg.gamma_range))
        self.degrade = Compose([RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=cfg.blur_probability),
                                RandGaussianNoise(prob=cfg.noise_probability, std=cfg.noise_std)])  # fmt: skip

    def __call__(self, volume, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(window, classes)``: the network input (C, D, H, W) and the class map (1, D, H, W) of one patch."""
        from DiffusionSegLib.probe.sampling import cut_patch, sample_patch_origins

        cfg = self.cfg
        origin = sample_patch_origins(volume.classes, self.cut_size, 1, rng)[0]
        window, classes = cut_patch(volume, origin, self.cut_size)
        self.affine.set_random_state(seed=int(rng.integers(2**31)))
        self.affine.randomize(None)
        # plain tensors, not MONAI MetaTensors: their per-op metadata tracking made each training step of the
        # network 1.25x slower (measured in float32: 1.59 s -> 1.27 s per step)
        window = _plain(self.affine(window[0], randomize=False, mode="bilinear")).float().clone()
        classes = _plain(self.affine(classes[0].float(), randomize=False, mode="nearest",
                                     padding_mode="zeros")).round().long()  # fmt: skip
        image = window[0]
        if rng.uniform() < cfg.enhancement_probability:
            targets = rng.uniform(*self.enhancement_range, self.num_classes)
            image = simulate_enhancement(image, classes[0], targets)
        self.gamma.set_random_state(seed=int(rng.integers(2**31)))
        image = _plain(self.gamma(image[None]))[0]
        factor = 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale)
        shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift)
        image = image * float(factor) + float(shift)
        self.degrade.set_random_state(seed=int(rng.integers(2**31)))
        window[0] = _plain(self.degrade(image[None]))[0].float()
        coords = volume.inputs.num_coords
        if coords and not cfg.use_coordinates:
            window[1 : 1 + coords] = 0.0
        elif coords:  # channels 1..3 are (x, y, z) in network units (UNIT_MM)
            from DiffusionSegLib.bpr import UNIT_MM

            jitter = rng.uniform(-1.0, 1.0, 3) * np.asarray(cfg.coordinate_jitter_mm) / UNIT_MM
            window[1 : 1 + coords] += torch.as_tensor(jitter[:coords], dtype=torch.float32).view(-1, 1, 1, 1)
        return window, classes
