"""The final answer for a scan of a model's training cohort: the network fused with the scan's registrations.

``finetune --unlabeled`` registers every labeled scan onto every unlabeled one. The network and the registrations
err in different places, so for those scans ``segment`` uses both: beside the model ``x.safetensors``,
``finetune`` writes ``x.cohort.npz`` (:func:`cohort_path`), holding per cohort scan the registrations' locally
weighted vote (:func:`~DiffusionSegLib.cohort.pseudo_labels.local_vote_shares`, whatever fusion trained the
network) in compact form (:class:`RegistrationVote`), under the content hash of the scan's working image
(:func:`working_key`: the working grid ``segment`` prepares for that model is the one ``finetune`` registered
on). ``segment`` of a scan whose working image has a vote there mixes, on the working grid,
``p = w · p_network + (1 − w) · p_registration`` (:func:`fuse_with_network`) before the argmax; any other scan
gets the network alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = ["COHORT_SUFFIX", "ModelCohort", "RegistrationVote", "cohort_path", "find_cohort", "fuse_with_network",
           "registration_vote", "working_key", "write_cohort"]

log = logging.getLogger(__name__)

COHORT_SUFFIX = ".cohort.npz"
FORMAT = "diffusionseg-cohort-1"


def cohort_path(model_path: str | os.PathLike) -> Path:
    """Where the cohort file of model file ``x.safetensors`` goes: ``x.cohort.npz``."""
    path = Path(model_path)
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return path.with_name(f"{stem}{COHORT_SUFFIX}")


def working_key(image: sitk.Image) -> str:
    """Content hash of a working-grid image: its voxels (float32 bytes) and its origin, spacing and direction."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image), dtype=np.float32).tobytes())
    digest.update(json.dumps([image.GetOrigin(), image.GetSpacing(), image.GetDirection()]).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class RegistrationVote:
    """The registrations' class probabilities of one scan on its working grid, in three bytes a voxel.

    Attributes:
        winner: ``(D, H, W)`` uint8, the class with the largest share of the vote.
        share: ``(D, H, W)`` uint8, its share in 1/255 (0: every atlas abstained there; no vote).
        runner_up: ``(D, H, W)`` uint8, the class with the second largest share (the winner where no other
            class got a vote). The rest of the vote, ``1 − share``, goes to it: with two atlases (each votes
            one class) that is the vote exactly; with more it is the vote of the two leading classes.
        atlases: how many registrations voted.
    """

    winner: np.ndarray
    share: np.ndarray
    runner_up: np.ndarray
    atlases: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.winner.shape)


def registration_vote(propagations: Sequence, target: np.ndarray, *, spacing_mm: Sequence[float]) -> RegistrationVote:
    """The locally weighted vote of the registrations of one scan (``propagations`` and ``target`` as
    :func:`~DiffusionSegLib.cohort.pseudo_labels.local_vote_shares`) in compact form."""
    from DiffusionSegLib.cohort.pseudo_labels import local_vote_shares

    shares = local_vote_shares(propagations, target, spacing_mm=spacing_mm)
    winner = shares.argmax(axis=0)
    best = np.take_along_axis(shares, winner[None], 0)[0]
    np.put_along_axis(shares, winner[None], -1.0, 0)  # in place: the winner out, the runner-up leads
    runner_up = shares.argmax(axis=0)
    second = np.take_along_axis(shares, runner_up[None], 0)[0]
    runner_up = np.where(second > 0, runner_up, winner)
    return RegistrationVote(winner.astype(np.uint8), np.round(best * 255.0).astype(np.uint8),
                            runner_up.astype(np.uint8), len(propagations))  # fmt: skip


def fuse_with_network(probabilities: np.ndarray, vote: RegistrationVote, weight: float) -> np.ndarray:
    """``weight · p_network + (1 − weight) · p_registration`` in place on ``probabilities`` ``(C, D, H, W)``
    (softmax of the network on the working grid); ``p_registration`` gives the winner its share and the
    runner-up the rest. Where no atlas voted the network's probabilities stay as they are. Returns the fused
    array (``probabilities`` itself when it is contiguous)."""
    if probabilities.shape[1:] != vote.shape:
        raise ValueError(f"the vote's grid {vote.shape} is not the network's {probabilities.shape[1:]}")
    probabilities = np.ascontiguousarray(probabilities)
    share = vote.share.reshape(-1).astype(np.float32) / 255.0
    voted = share > 0
    flat = probabilities.reshape(probabilities.shape[0], -1)  # a view: the fusion writes into ``probabilities``
    flat *= np.where(voted, np.float32(weight), np.float32(1.0))[None]
    columns = np.flatnonzero(voted)
    rest = np.float32(1.0 - weight)
    flat[vote.winner.reshape(-1)[columns], columns] += rest * share[columns]
    flat[vote.runner_up.reshape(-1)[columns], columns] += rest * (1.0 - share[columns])
    return probabilities


def write_cohort(path: str | os.PathLike, votes: Sequence[tuple[str, str, RegistrationVote]], backbone_sha256: str,
                 num_classes: int, registration: dict) -> Path:  # fmt: skip
    """Write a model's cohort file atomically: ``votes`` as ``(working key, scan name, vote)``, for the
    fine-tuned backbone ``backbone_sha256`` (a model trained again leaves a file of another backbone unused)."""
    from DiffusionSegLib.checkpoint import atomic_write

    arrays = {}
    for i, (_, _, vote) in enumerate(votes):
        arrays |= {f"winner_{i}": vote.winner, f"share_{i}": vote.share, f"runner_up_{i}": vote.runner_up}
    header = {"format": FORMAT, "backbone_sha256": backbone_sha256, "num_classes": int(num_classes),
              "registration": registration, "keys": [k for k, _, _ in votes], "names": [n for _, n, _ in votes],
              "atlases": [v.atlases for _, _, v in votes]}  # fmt: skip

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, header=np.asarray(json.dumps(header)), **arrays)

    return atomic_write(path, write)


class ModelCohort:
    """A model's cohort file, read: its header at once, a scan's vote when asked for (:meth:`vote`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        with np.load(self.path) as data:
            header = json.loads(str(data["header"]))
        if header.get("format") != FORMAT:
            raise ValueError(f"not a cohort file of format {FORMAT}")
        self.backbone_sha256 = str(header["backbone_sha256"])
        self.num_classes = int(header["num_classes"])
        self.registration = dict(header.get("registration") or {})
        self.names = list(header["names"])
        self._index = {key: i for i, key in enumerate(header["keys"])}
        self._atlases = list(header["atlases"])

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def vote(self, key: str) -> RegistrationVote | None:
        """The vote of the scan whose working image has ``key`` (:func:`working_key`), or None (not in the cohort)."""
        i = self._index.get(key)
        if i is None:
            return None
        with np.load(self.path) as data:
            return RegistrationVote(data[f"winner_{i}"], data[f"share_{i}"], data[f"runner_up_{i}"], self._atlases[i])


def find_cohort(model_path: str | os.PathLike | None) -> ModelCohort | None:
    """The cohort file beside model file ``model_path`` (:func:`cohort_path`), read; None when there is none (or
    it is damaged: a warning, and the network alone segments)."""
    if model_path is None:
        return None
    path = cohort_path(model_path)
    if not path.is_file():
        return None
    try:
        return ModelCohort(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("'%s' is not a usable cohort file (%s); the network alone segments", path.name,
                    str(error).splitlines()[0][:200] if str(error) else type(error).__name__)  # fmt: skip
        return None
