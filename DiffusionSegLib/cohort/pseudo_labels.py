"""Pseudo-labels for the unlabeled scans of a cohort, propagated from the labeled ones by registration.

Every labeled scan (atlas) is registered to every unlabeled scan (:func:`register_labels`); the warped class
maps are fused by **agreement**: a voxel gets a class where every atlas gives it that class, and is *ignored*
in training (:data:`~DiffusionSegLib.probe.sampling.IGNORE`) where they disagree. With two atlases that keeps the
voxels both registrations place alike (organ cores, clear background) and leaves the uncertain borders to the
labeled scans; a wrong hard label there is what made naive self-training hurt (DESIGN.md §2).

Registrations are cached by content (the two working images, the atlas's classes and the settings), in the
run folder of a fine-tuning run, so a resumed run does not register again, and each cached result keeps the
seconds it took, so a budget that includes registration stays honest when a result is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.cohort.registration import (
    Propagation,
    RegistrationConfig,
    WorkingScan,
    anatomical_fit,
    register_labels,
)

__all__ = ["PropagationCache", "fuse", "fuse_by_agreement", "fuse_by_local_similarity",
           "ignore_background_near_organs", "local_vote_shares", "propagate", "propagation_key", "working_scan"]


def working_scan(image: sitk.Image, coordinates_mm: np.ndarray | None) -> WorkingScan:
    """A working-grid CT with the fit of its BPR coordinates ``(3, D, H, W)`` in mm (None: no BPR start)."""
    return WorkingScan(image, anatomical_fit(coordinates_mm, image) if coordinates_mm is not None else None)


def volume_scan(volume, bpr_start: bool = True) -> WorkingScan:
    """The working scan of a prepared :class:`~DiffusionSegLib.probe.sampling.LabeledVolume`, its coordinate fit
    from the BPR channels of its network inputs (none without them or without ``bpr_start``)."""
    from DiffusionSegLib.bpr import UNIT_MM

    coords = volume.inputs.num_coords
    fitted = coords == 3 and bpr_start
    return working_scan(volume.working, volume.inputs.tensor[0, 1:4].numpy() * UNIT_MM if fitted else None)


def propagation_key(target: WorkingScan, atlas: WorkingScan, atlas_classes: np.ndarray, cfg: RegistrationConfig) -> str:
    """Content hash of one registration: both working images with their grids, the atlas's classes, the
    coordinate fits and the settings."""
    digest = hashlib.sha256()
    for scan in (target, atlas):
        digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(scan.image)).tobytes())
        digest.update(json.dumps([scan.image.GetOrigin(), scan.image.GetSpacing(), scan.image.GetDirection()]).encode())
        digest.update(np.round(scan.fit, 3).tobytes() if scan.fit is not None else b"none")
    digest.update(np.ascontiguousarray(atlas_classes).tobytes())
    digest.update(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()


class PropagationCache:
    """Registrations stored as ``<key>.npz`` in a folder (None: no cache)."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = Path(folder) if folder is not None else None

    def get(self, key: str) -> Propagation | None:
        path = self.folder / f"{key}.npz" if self.folder is not None else None
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return Propagation(data["classes"], data["image"].astype(np.float32), float(data["seconds"]))
        except (OSError, ValueError, KeyError):  # a damaged cache entry is computed again
            return None

    def put(self, key: str, result: Propagation) -> None:
        if self.folder is None:
            return
        from DiffusionSegLib.checkpoint import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, classes=result.classes, image=result.image.astype(np.float16),
                                    seconds=np.float64(result.seconds))  # fmt: skip

        atomic_write(self.folder / f"{key}.npz", write)


def propagate(targets: Sequence[WorkingScan], atlases: Sequence[tuple[WorkingScan, np.ndarray]],
              cfg: RegistrationConfig | None = None, *, cache: PropagationCache | None = None,
              progress: bool = True, report: Callable[[float, str], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> list[list[Propagation]] | None:  # fmt: skip
    """Register every atlas to every target.

    Args:
        targets: the unlabeled scans.
        atlases: ``(scan, classes)`` of the labeled scans, classes on the scan's working grid.
        cfg: registration settings.
        cache: where registrations are kept and reused.
        progress: show a tqdm bar.
        report: called as ``(fraction, message)`` after each registration.
        should_stop: polled before each registration; True returns None (what was registered stays cached).

    Returns:
        ``result[t][a]``: atlas ``a`` on target ``t``; None when stopped.
    """
    from tqdm.auto import tqdm

    cfg = cfg or RegistrationConfig()
    cache = cache or PropagationCache(None)
    total = len(targets) * len(atlases)
    out: list[list[Propagation]] = []
    with tqdm(total=total, desc="register", disable=not progress, leave=False) as bar:
        for t, target in enumerate(targets):
            row = []
            for a, (atlas, classes) in enumerate(atlases):
                if should_stop is not None and should_stop():
                    return None
                key = propagation_key(target, atlas, classes, cfg)
                result = cache.get(key)
                if result is None:
                    result = register_labels(target, atlas, classes, cfg)
                    cache.put(key, result)
                row.append(result)
                bar.update(1)
                if report is not None:
                    done = t * len(atlases) + a + 1
                    report(done / total, f"registering labeled scans to unlabeled scan {t + 1}/{len(targets)}")
            out.append(row)
    return out


def fuse_by_agreement(propagations: Sequence[Propagation], ignore: int) -> np.ndarray:
    """One class map from several atlases: the class where all agree, ``ignore`` where they do not."""
    classes = np.stack([p.classes for p in propagations])
    agree = (classes == classes[0]).all(axis=0)
    return np.where(agree, classes[0], np.uint8(ignore)).astype(np.uint8)


def local_vote_shares(propagations: Sequence[Propagation], target: np.ndarray, *, spacing_mm: Sequence[float],
                      sigma_mm: float = 6.0, power: float = 2.0) -> np.ndarray:  # fmt: skip
    """Each class's share of the locally weighted vote, ``(K, D, H, W)`` for classes ``0..K-1`` (``K``: the largest
    class any atlas places, plus 1); the shares of a voxel add up to 1, or are all 0 where every atlas abstains.
    Arguments and weights as :func:`fuse_by_local_similarity`."""
    from scipy import ndimage

    sigma = tuple(sigma_mm / float(s) for s in spacing_mm)
    target = np.asarray(target, dtype=np.float32)
    weights = np.stack([(ndimage.gaussian_filter((p.image.astype(np.float32) - target) ** 2, sigma) + 1e-4)
                        ** -power for p in propagations])  # fmt: skip
    classes = np.stack([p.classes for p in propagations])
    present = [set(np.unique(c).tolist()) for c in classes]
    for a, has in enumerate(present):  # abstain where another atlas places an organ this one has no label of
        for b, other in enumerate(present):
            for organ in other - has - {0}:
                weights[a][classes[b] == organ] = 0.0
    votes = np.stack([np.where(classes == k, weights, 0.0).sum(axis=0) for k in range(int(classes.max()) + 1)])
    return votes / np.maximum(votes.sum(axis=0), 1e-12)


def fuse_by_local_similarity(propagations: Sequence[Propagation], target: np.ndarray, ignore: int, *,
                             spacing_mm: Sequence[float], sigma_mm: float = 6.0, power: float = 2.0,
                             confidence: float = 0.7) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Locally weighted voting: each atlas votes for its class at a voxel with a weight that grows as its warped
    image matches the target's around that voxel, so where two registrations disagree the one that aligned the
    anatomy there wins instead of the voxel being lost (agreement's rule).

    An atlas whose labels lack an organ that another atlas places at a voxel abstains there: a labeled scan
    without a gallbladder would otherwise outvote the one that shows it with the liver or background it warps
    onto that place.

    Args:
        propagations: the atlases on the target's grid (class maps and windowed images in [0, 1]).
        target: ``(D, H, W)`` the target's image, windowed to [0, 1] like the atlases'.
        ignore: the value of a voxel no class reaches ``confidence`` at.
        spacing_mm: voxel size along (D, H, W), in mm.
        sigma_mm: Gaussian width of the neighbourhood the local squared difference is averaged over.
        power: weight = (local mean squared difference + eps) ** -power (Artaechevarria et al., 2009).
        confidence: the share of the vote a class needs to be the voxel's label.

    Returns:
        ``(classes, probability)``: uint8 labels (``ignore`` where unsure) and the winning class's vote share.
    """
    share = local_vote_shares(propagations, target, spacing_mm=spacing_mm, sigma_mm=sigma_mm, power=power)
    winner, probability = share.argmax(axis=0).astype(np.uint8), share.max(axis=0)
    return np.where(probability >= confidence, winner, np.uint8(ignore)).astype(np.uint8), probability


def fuse(propagations: Sequence[Propagation], target: np.ndarray, ignore: int, method: str, *,
         spacing_mm: Sequence[float]) -> np.ndarray:  # fmt: skip
    """The pseudo-labels of one target by ``method``: ``"agreement"`` or ``"weighted-vote"``."""
    if method == "agreement":
        return fuse_by_agreement(propagations, ignore)
    if method == "weighted-vote":
        return fuse_by_local_similarity(propagations, target, ignore, spacing_mm=spacing_mm)[0]
    raise ValueError(f"fusion {method!r} is unknown; expected 'agreement' or 'weighted-vote'")


def ignore_background_near_organs(classes: np.ndarray, margin_mm: float, spacing_mm: Sequence[float],
                                  ignore: int) -> np.ndarray:  # fmt: skip
    """Pseudo-labels whose background is kept only farther than ``margin_mm`` from every voxel that is not
    background (an organ, or ``ignore``: where atlases disagree or the network is unsure); nearer, ``ignore``.

    Registration and self-training name an organ precisely but miss about half of its voxels and call them
    background (organ recall 0.43-0.49 on the pool scans, README): those wrong background labels sit next to the
    organs they miss, and without this band they teach the network that the organ's edge is background.

    Args:
        classes: (D, H, W) class indices with ``ignore`` where there is no label.
        margin_mm: width of the band; 0 returns ``classes`` unchanged.
        spacing_mm: voxel size along (D, H, W), in mm.
        ignore: the ignored value.
    """
    if margin_mm <= 0:
        return classes
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(classes == 0, sampling=tuple(float(s) for s in spacing_mm))
    return np.where((classes == 0) & (distance <= margin_mm), np.uint8(ignore), classes).astype(classes.dtype)
