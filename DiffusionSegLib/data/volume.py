"""Reading, checking and writing 3D volumes with their geometry.

Volumes are ``SimpleITK.Image`` objects throughout the library: the image carries its spacing, origin and
direction (ITK's LPS physical space), so geometry travels with the voxels. Arrays taken from an image are in
SimpleITK's ``(z, y, x)`` order; spacing tuples are in ITK's ``(x, y, z)`` order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DiffusionSegLib.data.integrity import (
    NiftiHeader,
    check_dicom_folder,
    check_dicom_pixel_data,
    check_nifti_length,
    check_volume_file,
    gunzip,
    read_nifti_header,
)
from DiffusionSegLib.errors import UserInputError

__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "read_volume",
    "write_volume",
    "check_volume",
    "check_ct",
    "check_label_map",
    "same_grid",
    "ct_likeness",
    "volume_info",
    "CTCheck",
]

READ_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".seg.nrrd")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".seg.nrrd")

# Fraction of voxels at or below -100 HU (air, lung, fat) in any CT field of view we expect; MR magnitude
# images are non-negative up to noise and have almost none.
_CT_LOW_HU = -100.0
_CT_MIN_LOW_FRACTION = 0.01
_CT_MAX_PLAUSIBLE_HU = 5000.0
_GEOMETRY_TOLERANCE = 1e-4
# Neighbouring voxels of any image of a body correlate (r = 0.94-0.99 along x in every shared CT, 0.84 in the
# MR); independent noise has r ~ 0.
_CT_MIN_NEIGHBOUR_CORRELATION = 0.5


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(READ_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def read_volume(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D volume from NIfTI, NRRD, MHA/MHD or a folder holding one DICOM series.

    Args:
        path: a file (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) or a DICOM folder.

    Returns:
        The image with its spacing, origin and direction. DICOM slices are sorted by position and the
        rescale slope/intercept applied (values in HU).

    Raises:
        UserInputError: the path does not exist, the format is unknown, the file cannot be read, or it is
            damaged: its data is shorter (or longer) than its header promises, its gzip / zlib stream is
            truncated or fails its checksum, a DICOM slice of the folder cannot be read
            (:mod:`DiffusionSegLib.data.integrity`).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"input not found: {path}")
    if path.is_dir():
        return _read_dicom_series(path)
    if _suffix(path) not in READ_SUFFIXES:
        raise UserInputError(
            f"cannot read '{path.name}': unknown format; expected one of {', '.join(READ_SUFFIXES)} or a DICOM folder"
        )
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        return _read_nifti(path)
    check_volume_file(path, suffix)
    return _itk_read(path)


@contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """ITK prints its warnings on stderr (e.g. "unexpected scales in sform", "non uniform sampling"); the gate
    says what is wrong in its own one line, so reads are quiet."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _itk_read(path: Path) -> sitk.Image:
    try:
        with _itk_warnings_off():
            return sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise UserInputError(f"cannot read '{path}': the file is damaged or not a volume ({reason})") from None


def _read_nifti(path: Path) -> sitk.Image:
    """A NIfTI volume, refused when damaged (see :mod:`DiffusionSegLib.data.integrity`).

    A gzipped file is decompressed once here, which checks its stream; when ITK would read the voxels unchanged
    (3D, scalar, no intensity scaling) they are taken from those bytes and ITK reads only the header, so the
    check costs no second decompression. Otherwise ITK reads the file and :func:`_restore_nifti_nonfinite`
    brings back the NaN and infinite voxels its reader hides.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        data = gunzip(path, data)
    header = read_nifti_header(path, data[:348])
    if header is None:
        return _itk_read(path)
    check_nifti_length(path, header, len(data))
    image = _nifti_from_bytes(path, header, data)
    return image if image is not None else _restore_nifti_nonfinite(_itk_read(path), header, data)


_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                 1280: "u8"}  # fmt: skip


def _nifti_from_bytes(path: Path, header: NiftiHeader, data: bytes) -> sitk.Image | None:
    """The image ITK would read, built from the file's voxel bytes and ITK's reading of the header alone, or
    None where ITK changes the stored values (scaling, vectors, more than 3 axes)."""
    if header.scaled or len(header.dims) != 3 or header.datatype not in _NIFTI_DTYPES:
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError:
        return None  # ITK's full read says what is wrong
    dtype = np.dtype(header.endian + _NIFTI_DTYPES[header.datatype])
    stored = sitk.GetImageFromArray(np.zeros((1, 1, 1), dtype.newbyteorder("=")))
    if (reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1 or reader.GetSize() != header.dims
            or reader.GetPixelID() != stored.GetPixelID()):  # fmt: skip
        return None
    array = np.frombuffer(data, dtype, count=int(np.prod(header.dims)), offset=header.offset)
    image = sitk.GetImageFromArray(array.reshape(header.dims[::-1]).astype(dtype.newbyteorder("="), copy=False))
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    for key in reader.GetMetaDataKeys():
        image.SetMetaData(key, reader.GetMetaData(key))
    return image


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}


def _restore_nifti_nonfinite(image: sitk.Image, header: NiftiHeader, data: bytes) -> sitk.Image:
    """ITK's NIfTI reader turns NaN and infinite voxels into 0, so a damaged scan would look clean. Where any
    float voxel of the file (``data``, decompressed) is not finite, the image gets the file's own values back,
    so that :func:`check_volume` refuses it and ``info`` counts them."""
    if header.datatype not in _NIFTI_FLOAT_TYPES or len(header.dims) != 3:
        return image
    dtype = np.dtype(header.endian + _NIFTI_FLOAT_TYPES[header.datatype])
    raw = np.frombuffer(data, dtype, count=int(np.prod(header.dims)), offset=header.offset)
    if np.isfinite(raw).all():
        return image
    values = raw.reshape(header.dims[::-1]) * header.slope + header.intercept
    restored = sitk.GetImageFromArray(values.astype(sitk.GetArrayViewFromImage(image).dtype))
    restored.CopyInformation(image)
    return restored


def _check_slice_spacing(folder: Path, files: Sequence[str], left_out: Sequence[str] = ()) -> None:
    """Refuse a series whose slices are not evenly spaced along their normal (a missing slice): ITK would
    stack them as if they were, and every distance below the gap would be wrong."""
    positions = []
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(file)
        try:
            reader.ReadImageInformation()
            position = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
            orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError):
            return  # no geometry tags: ITK's own checks apply
        positions.append(np.dot(position, np.cross(orientation[:3], orientation[3:])))
    if len(positions) < 3:
        return
    gaps = np.diff(np.sort(positions))
    typical = float(np.median(gaps))
    worst = int(np.argmax(gaps))
    if typical > 0 and gaps[worst] > 1.5 * typical:
        raise UserInputError(f"the DICOM series in {folder} has a gap of {gaps[worst]:.3g} mm after slice {worst + 1} "
                             f"of {len(positions)} (the others are {typical:.3g} mm apart): a slice is missing"
                             + (f" (not read as a slice of it: {', '.join(left_out[:3])})" if left_out else "")
                             + "; expected evenly spaced slices")  # fmt: skip


def _read_dicom_series(folder: Path) -> sitk.Image:
    check_dicom_pixel_data(folder)
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise UserInputError(f"no DICOM series found in folder {folder}")
    if len(series_ids) > 1:
        raise UserInputError(
            f"folder {folder} holds {len(series_ids)} DICOM series; expected one (move each series to its own folder)"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    check_dicom_folder(folder, series_ids[0], files)
    listed = {os.path.realpath(f) for f in files}
    left_out = [f.name for f in sorted(folder.iterdir())
                if f.is_file() and not f.name.startswith(".") and os.path.realpath(f) not in listed]  # fmt: skip
    _check_slice_spacing(folder, files, left_out)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with _itk_warnings_off():
            return reader.Execute()
    except RuntimeError as error:
        raise UserInputError(f"cannot read the DICOM series in {folder}: {str(error).strip()[-200:]}") from None


def write_volume(image: sitk.Image, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write an image atomically (to a temporary file in the same folder, then renamed).

    A reader never sees a half-written file and an earlier file at ``path`` survives a failed write.

    Args:
        image: the volume to write.
        path: destination ending in ``.nii.gz``, ``.nii``, ``.nrrd``, ``.seg.nrrd`` or ``.mha``.
        compress: gzip the voxel data where the format allows it.

    Returns:
        The written path.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise UserInputError(f"cannot write '{path.name}': expected a name ending in {', '.join(WRITE_SUFFIXES)}")
    from DiffusionSegLib.checkpoint import atomic_write

    return atomic_write(path, lambda temporary: sitk.WriteImage(image, temporary, useCompression=compress),
                        suffix=".nrrd" if suffix == ".seg.nrrd" else suffix)


def check_volume(image: sitk.Image, name: str = "volume") -> None:
    """Refuse images the pipeline cannot handle: not 3D, not scalar, bad spacing, non-finite, empty or constant.

    Raises:
        UserInputError: with what was wrong and what was expected.
    """
    dimension = image.GetDimension()
    if dimension != 3:
        shape = "x".join(str(s) for s in image.GetSize())
        raise UserInputError(f"{name} is {dimension}D ({shape}); expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar volume"
        )
    spacing = image.GetSpacing()
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise UserInputError(f"{name} has spacing {tuple(spacing)} mm; expected positive voxel sizes")
    if min(image.GetSize()) < 2:
        raise UserInputError(f"{name} has size {image.GetSize()}; expected at least 2 voxels along every axis")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise UserInputError(f"{name} has {bad} NaN or infinite voxels; expected finite intensities")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise UserInputError(f"{name} is constant (every voxel is {low:g}); expected an image with content")


@dataclass(frozen=True)
class CTCheck:
    """Result of :func:`ct_likeness`: whether intensities look like CT in HU, and why."""

    is_ct: bool
    reason: str


def _neighbour_correlation(rows: np.ndarray) -> float:
    """Pearson correlation of each voxel of (z, y, x) ``rows`` with its neighbour along x (1.0 when either side is
    constant): sums over views of the rows in double precision, without the copies ``np.corrcoef`` makes."""
    if rows.shape[-1] < 2 or rows[..., 1:].size < 2:
        return 1.0
    centred = rows.astype(np.float64)
    centred -= centred.mean()  # one shift for both sides: the correlation does not change, the sums stay small
    left, right = centred[..., :-1], centred[..., 1:]
    n = left.size
    mean_left, mean_right = left.sum() / n, right.sum() / n
    covariance = np.einsum("ijk,ijk->", left, right) / n - mean_left * mean_right
    var_left = np.einsum("ijk,ijk->", left, left) / n - mean_left**2
    var_right = np.einsum("ijk,ijk->", right, right) / n - mean_right**2
    if var_left <= 1e-12 or var_right <= 1e-12:
        return 1.0
    return float(covariance / np.sqrt(var_left * var_right))


def ct_likeness(image: sitk.Image) -> CTCheck:
    """Judge from intensities whether an image is CT in Hounsfield units.

    CT holds air, lung or fat (at or below -100 HU) in any usual field of view, and no values beyond a few
    thousand HU; MR and raw (un-rescaled) CT numbers are non-negative. BTCV-style copies clipped to
    [-125, 275] HU still pass. An image of anatomy has spatial structure: neighbouring voxels correlate,
    random noise of CT-like values does not.
    """
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, int(round((array.size / 2_000_000) ** (1 / 3))))  # subsample big volumes for speed
    sample = np.asarray(array[::step, ::step, ::step], dtype=np.float32)
    rows = np.asarray(array[::step, ::step, :], dtype=np.float32)  # whole rows: neighbours along x
    correlation = _neighbour_correlation(rows)
    low_fraction = float(np.mean(sample <= _CT_LOW_HU))
    high = float(sample.max())
    if high > _CT_MAX_PLAUSIBLE_HU:
        return CTCheck(False, f"maximum intensity {high:g} is beyond the CT range (expected HU up to ~3000)")
    if correlation < _CT_MIN_NEIGHBOUR_CORRELATION:
        return CTCheck(False, f"neighbouring voxels are uncorrelated (r = {correlation:.2f}; a CT of a body has "
                              "r > 0.9): this looks like noise, not an image")  # fmt: skip
    if low_fraction < _CT_MIN_LOW_FRACTION:
        lowest = float(sample.min())
        return CTCheck(
            False,
            f"only {100 * low_fraction:.2f}% of voxels are at or below -100 (minimum {lowest:g}); CT in HU has air, "
            "lung or fat there — this looks like MR or CT without rescale to HU",
        )
    return CTCheck(True, f"{100 * low_fraction:.1f}% of voxels at or below -100 HU, maximum {high:g} HU")


def check_ct(image: sitk.Image, name: str = "CT") -> None:
    """:func:`check_volume` plus :func:`ct_likeness`; raises :class:`UserInputError` for anything else."""
    check_volume(image, name)
    verdict = ct_likeness(image)
    if not verdict.is_ct:
        raise UserInputError(f"{name} does not look like CT: {verdict.reason}")


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = _GEOMETRY_TOLERANCE) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tolerance``)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance * max(1.0, max(map(abs, a.GetOrigin()))))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def check_label_map(labels: sitk.Image, reference: sitk.Image, name: str = "label map") -> None:
    """Refuse a label map that is not an integer 3D image on exactly the grid of its CT."""
    check_volume_dimension = labels.GetDimension()
    if check_volume_dimension != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise UserInputError(f"{name} is not a scalar 3D image; expected integer labels on the CT grid")
    array = sitk.GetArrayViewFromImage(labels)
    if array.dtype.kind == "f" and not np.all(np.mod(array[::4, ::4, ::4], 1) == 0):
        raise UserInputError(f"{name} holds fractional values; expected integer label ids")
    if not same_grid(labels, reference):
        raise UserInputError(
            f"{name} grid differs from its CT: size {labels.GetSize()} vs {reference.GetSize()}, spacing "
            f"{_fmt(labels.GetSpacing())} vs {_fmt(reference.GetSpacing())}, origin {_fmt(labels.GetOrigin())} vs "
            f"{_fmt(reference.GetOrigin())}; expected the same voxel grid"
        )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def volume_info(image: sitk.Image) -> dict:
    """Geometry, intensity statistics and a CT check, as a JSON-ready dict."""
    array = sitk.GetArrayViewFromImage(image)
    sample = np.asarray(array, dtype=np.float32)
    size = image.GetSize()
    spacing = image.GetSpacing()
    info: dict = {
        "size": list(size),
        "spacing_mm": [round(s, 6) for s in spacing],
        "origin_mm": [round(o, 4) for o in image.GetOrigin()],
        "direction": [round(d, 6) for d in image.GetDirection()],
        "extent_mm": [round(n * s, 2) for n, s in zip(size, spacing, strict=False)],
        "pixel_type": image.GetPixelIDTypeAsString(),
        "components": image.GetNumberOfComponentsPerPixel(),
    }
    if image.GetDimension() == 3:
        info["orientation"] = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    finite = np.isfinite(sample)
    info["nonfinite_voxels"] = int(sample.size - np.count_nonzero(finite))
    if info["nonfinite_voxels"]:
        sample = sample[finite]
    if sample.size:
        p1, p50, p99 = np.percentile(sample, [1, 50, 99])
        info["intensity"] = {
            "min": float(sample.min()), "max": float(sample.max()), "mean": round(float(sample.mean()), 3),
            "std": round(float(sample.std()), 3), "p1": float(p1), "median": float(p50), "p99": float(p99),
        }  # fmt: skip
    try:
        check_volume(image)
        verdict = ct_likeness(image)
        info["looks_like_ct"] = verdict.is_ct
        info["ct_check"] = verdict.reason
    except UserInputError as error:
        info["looks_like_ct"] = False
        info["ct_check"] = str(error)
    return info
