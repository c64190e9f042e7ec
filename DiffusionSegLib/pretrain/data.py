"""Training volumes on the working grid and random patches inside the body.

Volumes are prepared once (``prepare_volume``) and held in memory as float16 HU, with the BPR coordinate map of
the whole volume computed once by the frozen BPR (so a patch's coordinates do not depend on where the patch
was cut). Patches are drawn by a seeded numpy generator whose state is part of the training snapshot, so a
resumed run draws the same patches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from DiffusionSegLib.data.gate import read_ct
from DiffusionSegLib.errors import UserInputError
from DiffusionSegLib.preprocess import PreprocessConfig, prepare_volume, scale_hu

__all__ = ["TrainingVolume", "load_training_volumes", "PatchSampler", "PatchBatch", "AIR_HU"]

AIR_HU = -1024.0
_TISSUE_HU = -100.0  # patch centres lie on voxels above this (body tissue; above clipped-air of BTCV copies)
_MAX_CENTRES = 200_000


@dataclass
class TrainingVolume:
    """One CT on the working grid.

    Attributes:
        name: file name it came from.
        hu: (z, y, x) float16 HU values.
        centres: (N, 3) int32 voxel indices where patch centres may fall (tissue voxels).
        coords: (3, z, y, x) float16 BPR coordinates, or ``None`` when training without BPR.
    """

    name: str
    hu: np.ndarray
    centres: np.ndarray
    coords: np.ndarray | None = None


def load_training_volumes(
    paths: Sequence[str | Path],
    preprocess: PreprocessConfig,
    coordinates: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> list[TrainingVolume]:
    """Read, check and prepare CT volumes for training.

    Args:
        paths: CT files or DICOM folders.
        preprocess: working-grid settings.
        coordinates: maps a working-grid HU volume ``(1, 1, D, H, W)`` to its BPR map ``(1, 3, D, H, W)``;
            ``None`` trains without BPR.
        progress: show a progress bar.

    Raises:
        UserInputError: no paths, or a file that is not a usable CT (named in the message).
    """
    from tqdm.auto import tqdm

    if not paths:
        raise UserInputError("no training volumes given; expected CT files or folders")
    volumes = []
    for path in tqdm(list(paths), desc="preparing volumes", disable=not progress, unit="vol"):
        try:
            prepared = prepare_volume(read_ct(path), preprocess)
        except UserInputError as error:
            raise UserInputError(f"training volume {path}: {error}") from None
        hu = np.array(prepared.array, dtype=np.float32)  # a writable copy (the view belongs to the image)
        centres = np.argwhere(hu > _TISSUE_HU).astype(np.int32)
        if len(centres) == 0:
            centres = np.argwhere(np.ones_like(hu, dtype=bool)).astype(np.int32)
        if len(centres) > _MAX_CENTRES:
            keep = np.random.default_rng(0).choice(len(centres), _MAX_CENTRES, replace=False)
            centres = centres[np.sort(keep)]
        coords = None
        if coordinates is not None:
            with torch.no_grad():
                coords = coordinates(torch.from_numpy(hu)[None, None])[0].cpu().numpy().astype(np.float16)
        volumes.append(TrainingVolume(Path(path).name, hu.astype(np.float16), centres, coords))
    return volumes


@dataclass
class PatchBatch:
    """A batch of patches: ``image`` (B, 1, D, H, W) scaled to [0, 1]; ``coords`` (B, 3, D, H, W) or None;
    ``hu`` (B, 1, D, H, W) raw HU (for augmentations that need it); ``origins`` (B, 3) patch corner indices."""

    image: torch.Tensor
    coords: torch.Tensor | None
    hu: torch.Tensor
    origins: np.ndarray
    volume_indices: np.ndarray

    def to(self, device: torch.device | str) -> PatchBatch:
        return PatchBatch(
            self.image.to(device, non_blocking=True),
            None if self.coords is None else self.coords.to(device, non_blocking=True),
            self.hu.to(device, non_blocking=True),
            self.origins,
            self.volume_indices,
        )


class PatchSampler:
    """Draws random patches centred on body tissue.

    Args:
        volumes: the training volumes.
        patch_size_vox: patch size ``(D, H, W)`` in working-grid voxels (z, y, x).
        window_hu: HU window scaled to [0, 1] for the network input.
        seed: seed of the numpy generator (combine with the rank for distributed training).
        clip_probability: chance that a patch is first clipped to ``clip_window_hu`` (simulating soft-tissue-
            clipped copies such as BTCV's, so features do not depend on it).
        clip_window_hu: the clipping window.
    """

    def __init__(self, volumes: Sequence[TrainingVolume], patch_size_vox: Sequence[int], window_hu: Sequence[float],
                 seed: int = 0, clip_probability: float = 0.0,
                 clip_window_hu: Sequence[float] = (-125.0, 275.0)) -> None:  # fmt: skip
        if not volumes:
            raise UserInputError("no training volumes to sample patches from")
        if len(patch_size_vox) != 3 or any(int(p) < 1 for p in patch_size_vox):
            raise ValueError(f"patch_size_vox {tuple(patch_size_vox)} is invalid; expected three positive sizes")
        self.volumes = list(volumes)
        self.patch_size = tuple(int(p) for p in patch_size_vox)
        self.window_hu = tuple(window_hu)
        self.clip_probability = float(clip_probability)
        self.clip_window_hu = tuple(clip_window_hu)
        self.rng = np.random.default_rng(seed)
        weights = np.array([np.sqrt(v.hu.size) for v in self.volumes], dtype=np.float64)  # larger scans a bit more
        self.volume_weights = weights / weights.sum()

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def _cut(self, array: np.ndarray, origin: np.ndarray, fill: float) -> np.ndarray:
        """Cut ``patch_size`` at ``origin`` from the last three axes, padding with ``fill`` outside."""
        lead = array.shape[:-3]
        out = np.full(lead + self.patch_size, fill, dtype=np.float32)
        src, dst = [], []
        for axis, (start, size, extent) in enumerate(zip(origin, self.patch_size, array.shape[-3:], strict=True)):
            lo, hi = max(start, 0), min(start + size, extent)
            src.append(slice(lo, hi))
            dst.append(slice(lo - start, hi - start))
        out[(..., *dst)] = array[(..., *src)]
        if fill != fill:  # NaN fill means "replicate the nearest edge" (coordinate maps)
            out = _fill_nan_nearest(out)
        return out

    def sample_at(self, volume_index: int, origin: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """HU patch (1, D, H, W) and coordinates (3, D, H, W) or None, at a given corner index."""
        volume = self.volumes[volume_index]
        origin = np.asarray(origin, dtype=np.int64)
        hu = self._cut(volume.hu[None], origin, AIR_HU)
        coords = None if volume.coords is None else self._cut(volume.coords, origin, float("nan"))
        return hu, coords

    def sample(self, batch_size: int) -> PatchBatch:
        """Draw ``batch_size`` patches (each from a random volume, centred on a random tissue voxel)."""
        hus, coords, origins, indices = [], [], [], []
        half = np.asarray(self.patch_size) // 2
        for _ in range(batch_size):
            index = int(self.rng.choice(len(self.volumes), p=self.volume_weights))
            volume = self.volumes[index]
            centre = volume.centres[self.rng.integers(len(volume.centres))]
            origin = centre - half
            hu, coord = self.sample_at(index, origin)
            if self.clip_probability and self.rng.random() < self.clip_probability:
                hu = np.clip(hu, *self.clip_window_hu)
            hus.append(hu)
            coords.append(coord)
            origins.append(origin)
            indices.append(index)
        hu_tensor = torch.from_numpy(np.stack(hus))
        coord_tensor = None if coords[0] is None else torch.from_numpy(np.stack(coords))
        return PatchBatch(scale_hu(hu_tensor, self.window_hu), coord_tensor, hu_tensor, np.stack(origins),
                          np.asarray(indices))  # fmt: skip


def _fill_nan_nearest(array: np.ndarray) -> np.ndarray:
    """Replace NaN (outside the volume) by the nearest valid value along each axis in turn."""
    if not np.isnan(array).any():
        return array
    from scipy import ndimage

    mask = np.isnan(array[0])
    if mask.all():
        return np.nan_to_num(array)
    index = ndimage.distance_transform_edt(mask, return_distances=False, return_indices=True)
    return array[(slice(None), *index)]
