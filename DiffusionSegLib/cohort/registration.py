"""Atlas registration on the fine-tuning working grid, started from the BPR's anatomical coordinates.

A labeled scan (the *atlas*) is registered to another scan of the cohort (the *target*) and its label map is
warped onto the target: multi-atlas label propagation (Wang et al. 2013), the classical few-shot answer. ANTs
(``antspyx``) does the registration: affine, then SyN (symmetric diffeomorphic, mutual information); both scans
are the working-grid CT windowed to [0, 1], so intensities are comparable across contrast phases.

Why the BPR start: ANTs' default start aligns the intensity centres of mass, which is meaningless when fields of
view differ (a chest-to-pelvis scan against an abdomen-only one: measured, an empty label map). The BPR gives
every voxel anatomical coordinates; fitting ``anatomy = scale · position + offset`` per axis in each scan and
composing the two fits gives an initial transform that puts the same anatomy on top of each other, whatever
the scans cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.errors import UserInputError

__all__ = [
    "Propagation",
    "RegistrationConfig",
    "WorkingScan",
    "anatomical_fit",
    "initial_transform",
    "register_labels",
    "require_ants",
]  # fmt: skip

_SCALE_RANGE = (0.7, 1.4)
"""Cranio-caudal scale between two patients from the coordinate fits, clipped: bodies differ by tens of %, not
more; a wider fitted ratio means a poorly covered scan."""


@dataclass(frozen=True)
class RegistrationConfig:
    """How an atlas is registered to a target (recorded with every model trained from propagated labels)."""

    transform: str = "SyN"
    """ANTs ``type_of_transform``: ``"SyN"`` (affine then deformable; the default a Slicer user of ANTs gets),
    ``"SyNRA"`` (rigid + affine + deformable), ``"Affine"`` (no deformation, fast)."""
    bpr_start: bool = True
    """Start from the BPR coordinates' fit (else ANTs' centre-of-mass start)."""
    window_hu: tuple[float, float] = (-125.0, 275.0)
    """HU window scaled to [0, 1] before registration (the soft-tissue window of the shared BTCV copies)."""
    seed: int = 0
    """ANTs' random seed (its metric sampling)."""

    def to_dict(self) -> dict:
        return {"transform": self.transform, "bpr_start": self.bpr_start, "window_hu": list(self.window_hu),
                "seed": self.seed}  # fmt: skip


@dataclass
class WorkingScan:
    """A CT on the working grid (canonical LPS, identity direction) with its anatomical coordinate fit.

    Attributes:
        image: float32 HU on the working grid.
        fit: ``(scale, offset)`` per axis x, y, z: anatomy ≈ scale · physical position + offset (mm), over body
            voxels (see :func:`anatomical_fit`); None without a BPR.
    """

    image: sitk.Image
    fit: np.ndarray | None = None


def require_ants():
    """The ``ants`` module, or a one-line error saying how to install it."""
    try:
        import ants
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise UserInputError("learning from unlabeled scans registers them with ANTs, which is not installed; "
                             "install it with: pip install antspyx") from error  # fmt: skip
    return ants


def anatomical_fit(coordinates: np.ndarray, image: sitk.Image, body_hu: float = -100.0) -> np.ndarray:
    """Per axis, the least-squares line ``anatomy = scale · position + offset`` over the body's voxels.

    Args:
        coordinates: BPR coordinates on ``image``'s grid, ``(3, D, H, W)`` in mm-equivalent units (x, y, z).
        image: the working-grid HU image (identity direction) whose voxels they belong to.
        body_hu: voxels above this are body.

    Returns:
        ``(3, 2)`` array of ``(scale, offset)``; x and y scales are 1 (the coordinates are physical within a
        slice), z's scale is clipped to a plausible range.
    """
    array = sitk.GetArrayViewFromImage(image)
    body = array > body_hu
    if not body.any():
        body = np.ones_like(body)
    origin, spacing = np.asarray(image.GetOrigin()), np.asarray(image.GetSpacing())
    fit = np.zeros((3, 2))
    for axis in range(3):
        index_axis = 2 - axis  # numpy axes are (z, y, x)
        shape = [1, 1, 1]
        shape[index_axis] = array.shape[index_axis]
        position = origin[axis] + spacing[axis] * np.arange(array.shape[index_axis]).reshape(shape)
        p = np.broadcast_to(position, array.shape)[body].astype(np.float64)
        c = np.asarray(coordinates[axis])[body].astype(np.float64)
        scale = 1.0
        if axis == 2 and p.std() > 0:
            scale = float(((p - p.mean()) * (c - c.mean())).mean() / p.var())
            scale = min(max(scale, 0.5), 2.0)
        fit[axis] = (scale, float(np.mean(c - scale * p)))
    return fit


def initial_transform(fixed_fit: np.ndarray, moving_fit: np.ndarray) -> sitk.AffineTransform:
    """The transform mapping a fixed-scan point to the moving-scan point of the same anatomy (ITK's direction
    for a registration's initial transform): ``p_m = (s_f p_f + t_f - t_m) / s_m`` per axis, the
    cranio-caudal ratio ``s_f / s_m`` clipped to :data:`_SCALE_RANGE`."""
    ratio = fixed_fit[:, 0] / moving_fit[:, 0]
    ratio[2] = min(max(ratio[2], _SCALE_RANGE[0]), _SCALE_RANGE[1])
    translation = (fixed_fit[:, 1] - moving_fit[:, 1]) / moving_fit[:, 0]
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(np.diag(ratio).ravel().tolist())
    transform.SetTranslation(translation.tolist())
    return transform


def ants_image(array: np.ndarray, reference: sitk.Image):
    """A ``(D, H, W)`` array on ``reference``'s grid as a float32 ANTs image (ANTs indexes x, y, z)."""
    ants = require_ants()
    return ants.from_numpy(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)),
                           origin=list(reference.GetOrigin()), spacing=list(reference.GetSpacing()),
                           direction=np.asarray(reference.GetDirection()).reshape(3, 3))  # fmt: skip


def windowed(image: sitk.Image, window_hu) -> np.ndarray:
    """The HU image windowed and scaled to [0, 1], ``(D, H, W)`` float32."""
    low, high = window_hu
    return np.clip((sitk.GetArrayViewFromImage(image).astype(np.float32) - low) / (high - low), 0.0, 1.0)


def _write_ants_affine(transform: sitk.AffineTransform, folder) -> str:
    """The initial transform as an ITK transform file ANTs reads."""
    import os

    path = os.path.join(folder, "initial.mat")
    sitk.WriteTransform(transform, path)
    return path


@dataclass
class Propagation:
    """An atlas registered to a target: its class map and its windowed image, both on the target's grid.

    Attributes:
        classes: ``(D, H, W)`` uint8 class indices (0 where the atlas does not reach).
        image: ``(D, H, W)`` float32 windowed atlas image in [0, 1] (for intensity-weighted fusion).
        seconds: wall time of the registration when it was computed (kept with a cached result).
    """

    classes: np.ndarray
    image: np.ndarray
    seconds: float


def register_labels(target: WorkingScan, atlas: WorkingScan, atlas_classes: np.ndarray,
                    cfg: RegistrationConfig | None = None) -> Propagation:  # fmt: skip
    """Register ``atlas`` to ``target`` and warp its class map and image onto the target's working grid.

    Args:
        target: the scan to label (the fixed image).
        atlas: the labeled scan (the moving image).
        atlas_classes: ``(D, H, W)`` class indices on the atlas's working grid.
        cfg: registration settings.
    """
    import tempfile
    import time

    ants = require_ants()
    cfg = cfg or RegistrationConfig()
    started = time.perf_counter()
    fixed = ants_image(windowed(target.image, cfg.window_hu), target.image)
    moving = ants_image(windowed(atlas.image, cfg.window_hu), atlas.image)
    labels = ants_image(atlas_classes, atlas.image)
    with tempfile.TemporaryDirectory(prefix="diffusionseg-reg-") as folder:
        options = {"random_seed": cfg.seed}
        if cfg.bpr_start and target.fit is not None and atlas.fit is not None:
            options["initial_transform"] = [_write_ants_affine(initial_transform(target.fit, atlas.fit), folder)]
        result = ants.registration(fixed, moving, type_of_transform=cfg.transform, outprefix=folder + "/reg_",
                                   **options)  # fmt: skip
        # the start is collapsed into ANTs' affine (antsRegistration -z 1)
        warped = ants.apply_transforms(fixed, labels, transformlist=result["fwdtransforms"],
                                       interpolator="genericLabel")  # fmt: skip
        classes = np.ascontiguousarray(warped.numpy().transpose(2, 1, 0)).round().astype(np.uint8)
        image = np.ascontiguousarray(result["warpedmovout"].numpy().transpose(2, 1, 0)).astype(np.float32)
    return Propagation(classes, image, time.perf_counter() - started)
