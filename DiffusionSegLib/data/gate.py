"""The input gate: every command and Slicer job reads its CTs, label maps and output paths through these
functions before any work, so a bad input is refused in one line (what was wrong, what was expected) and
nothing is written.

* :func:`read_ct`: readable and not damaged (:mod:`~DiffusionSegLib.data.integrity`), 3D, scalar, positive
  spacing, a direction matrix that is a rotation (:func:`check_direction`: a NIfTI's sform too), finite (NIfTI NaNs included, which ITK hides), not constant, CT-like intensities with spatial
  structure (see :func:`~DiffusionSegLib.data.volume.check_ct`), at least :data:`MIN_EXTENT_MM` along every axis;
* :func:`read_label_map`: on its CT's grid, integer ids, only ids its legend names;
* :func:`check_output_path`: a known suffix in a folder that exists and can be written, and not one of the
  command's inputs nor another of its outputs, however the path is spelled (relative, ``..``, a symbolic or
  hard link, another case on a case-insensitive disk: see :func:`same_file`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.data.labels import OrganLabel
from DiffusionSegLib.data.volume import WRITE_SUFFIXES, check_ct, check_label_map, read_volume
from DiffusionSegLib.errors import UserInputError

__all__ = ["MAX_EXTENT_MM", "MIN_EXTENT_MM", "check_direction", "check_extent", "check_label_ids", "check_output_path", "read_ct", "read_label_map",
           "refuse_writing_over", "same_file"]


MIN_EXTENT_MM = 30.0
"""The smallest extent a CT may have along any of its axes: a few centimetres of anatomy. The networks see
windows of 10 cm and more at 3-4 mm voxels; a scan of a few slices (a scout, a 9 mm slab) holds too little of
any organ to segment and would come back empty without a word."""


def read_ct(path: str | os.PathLike, name: str | None = None) -> sitk.Image:
    """Read a CT and refuse it unless the pipeline can use it (see the module docstring)."""
    image = read_volume(path)
    name = name or f"'{Path(path).name}'"
    check_ct(image, name)  # a 2D or 4D image is refused here, before its direction is read as 3x3
    check_direction(image, name, path)
    check_extent(image, name)
    return image


SHEAR_TOLERANCE = 1e-3
"""The largest cosine between two of a CT's axes (0.06 degrees from square): a rounding of a rotation stays far
below it, a sheared header far above."""


def _shear(matrix: np.ndarray) -> tuple[int, int, float] | None:
    """The most skewed pair of axes (columns) of a 3x3 matrix and their angle in degrees, or None when they are
    orthogonal within :data:`SHEAR_TOLERANCE` (columns are normalised: voxel sizes do not count)."""
    norms = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(matrix)) or np.any(norms == 0):
        return (0, 1, float("nan"))
    unit = matrix / norms
    gram = unit.T @ unit
    worst, pair = 0.0, (0, 1)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if abs(gram[a, b]) > worst:
            worst, pair = abs(gram[a, b]), (a, b)
    if worst <= SHEAR_TOLERANCE:
        return None
    return (*pair, float(np.degrees(np.arccos(np.clip(gram[pair], -1.0, 1.0)))))


def _nifti_sform(path: Path) -> np.ndarray | None:
    """The 3x3 part of a NIfTI file's sform when its sform_code says it is used, else None."""
    import struct

    from DiffusionSegLib.data.integrity import gunzip

    name = path.name.lower()
    if not path.is_file() or not name.endswith((".nii", ".nii.gz")):
        return None
    with open(path, "rb") as handle:
        head = handle.read(348 if name.endswith(".nii") else 1 << 16)
    if head[:2] == b"\x1f\x8b":
        import zlib

        head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 348)
    if len(head) < 348:
        return None
    for endian in "<>":
        if struct.unpack(f"{endian}i", head[:4])[0] == 348:
            if struct.unpack(f"{endian}h", head[254:256])[0] <= 0:
                return None
            rows = struct.unpack(f"{endian}12f", head[280:328])
            return np.asarray(rows, dtype=np.float64).reshape(3, 4)[:, :3]
    return None


def check_direction(image: sitk.Image, name: str = "CT", path: str | os.PathLike | None = None) -> None:
    """Refuse a direction matrix that is not a rotation (sheared axes): the image's own (NRRD, MHA), and a NIfTI
    file's sform, which ITK silently replaces by the qform when it is sheared."""
    what = None
    skew = _shear(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3))
    if skew is not None:
        what = "direction matrix"
    elif path is not None:
        sform = _nifti_sform(Path(path))
        skew = _shear(sform) if sform is not None else None
        what = "sform (which ITK would silently replace by the qform)" if skew is not None else None
    if skew is not None:
        a, b, angle = skew
        raise UserInputError(f"{name}: its {what} is not a rotation: axes {'ijk'[a]} and {'ijk'[b]} meet at "
                             f"{angle:.1f} degrees; expected orthogonal axes (a sheared or damaged header): fix the "
                             "header")  # fmt: skip


MAX_EXTENT_MM = 3000.0
"""The largest extent a CT may have along any axis: a whole body is under 2 m. A larger one comes from voxel sizes
that cannot be right (a damaged header), and resampling it to the working grid would not fit in memory."""


def check_extent(image: sitk.Image, name: str = "CT", minimum_mm: float = MIN_EXTENT_MM) -> None:
    """Refuse a scan shorter than ``minimum_mm`` or longer than :data:`MAX_EXTENT_MM` along any axis, saying the
    limit."""
    for axis, size, spacing in zip("xyz", image.GetSize(), image.GetSpacing(), strict=False):
        if size * spacing > MAX_EXTENT_MM:
            raise UserInputError(f"{name} covers {size * spacing:.3g} mm along its {axis} axis ({size} voxels of "
                                 f"{spacing:.3g} mm); expected at most {MAX_EXTENT_MM:g} mm: its voxel sizes "
                                 "cannot be right")  # fmt: skip
        if size * spacing < minimum_mm:
            raise UserInputError(f"{name} covers only {size * spacing:.3g} mm along its {axis} axis ({size} voxels of "
                                 f"{spacing:.3g} mm); expected at least {minimum_mm:g} mm along every axis: too "
                                 "little anatomy for the model")  # fmt: skip


def check_label_ids(labels: sitk.Image, legend: Sequence[OrganLabel], name: str = "label map") -> None:
    """Refuse label ids that the legend does not name (0 is background)."""
    ids = np.unique(sitk.GetArrayViewFromImage(labels))
    known = {0} | {int(organ.value) for organ in legend}
    foreign = [int(i) if float(i).is_integer() else float(i) for i in ids if i not in known]
    if foreign:
        shown = ", ".join(str(i) for i in foreign[:8]) + (", ..." if len(foreign) > 8 else "")
        raise UserInputError(f"{name} holds ids {shown} that its legend does not name; expected 0 (background) "
                             f"and the legend's ids {sorted(known - {0})}")  # fmt: skip


def read_label_map(path: str | os.PathLike, ct: sitk.Image, legend: Sequence[OrganLabel] | None = None,
                   name: str | None = None) -> sitk.Image:  # fmt: skip
    """Read a label map and refuse it unless it is an integer map on ``ct``'s grid with the legend's ids."""
    name = name or f"label map '{Path(path).name}'"
    labels = read_volume(path)
    check_label_map(labels, ct, name)
    if legend is not None:
        check_label_ids(labels, legend, name)
    return labels


def check_output_path(path: str | os.PathLike, suffixes: Sequence[str] = WRITE_SUFFIXES, what: str = "output",
                      inputs: Iterable[str | os.PathLike | None] = (),
                      outputs: Mapping[str, str | os.PathLike | None] | None = None) -> Path:  # fmt: skip
    """Refuse an output path before any work: unknown suffix, missing or unwritable folder, a folder, one of
    ``inputs`` (the files the command reads) or one of its other ``outputs`` ({what: path}); ``None`` paths are
    ignored."""
    path = Path(path)
    if not path.name.lower().endswith(tuple(suffixes)):
        raise UserInputError(f"cannot write {what} '{path}': expected a name ending in {', '.join(suffixes)}")
    if path.is_dir():
        raise UserInputError(f"cannot write {what} '{path}': it is a folder; expected a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserInputError(f"cannot write {what} '{path}': folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserInputError(f"cannot write {what} '{path}': permission denied")
    refuse_writing_over(path, inputs, what, outputs)
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: the same inode where both exist (any spelling: relative, ``..``,
    symbolic or hard link, case on a case-insensitive disk), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def refuse_writing_over(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str = "output",
                        outputs: Mapping[str, str | os.PathLike | None] | None = None) -> None:  # fmt: skip
    """Refuse an output ``path`` that is one of ``inputs`` (files the command reads) or one of its other
    ``outputs`` ({what: path})."""
    for source in inputs:
        if source is not None and str(source) and same_file(path, source):
            raise UserInputError(f"cannot write {what} '{path}': it is the input '{source}', which would be lost; "
                                 "choose another output path")  # fmt: skip
    for other, target in (outputs or {}).items():
        if target is not None and str(target) and same_file(path, target):
            raise UserInputError(f"cannot write {what} '{path}': the {other} goes to that same file; choose "
                                 "another output path")  # fmt: skip
