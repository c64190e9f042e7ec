"""Damaged files are refused before any work: a volume file must hold all the voxel data its header promises.

ITK reads a NIfTI whose data ends early without a word (the missing voxels become 0), and its gzip reader
never checks the stream's CRC, so a partial download of a ``.nii.gz`` would be segmented as if it were a
scan. The gate therefore checks, for each format, the bytes behind the header before ITK reads them:

* ``.nii.gz`` and gzip / zlib encoded NRRD and MHA data: the stream is decompressed to its end, which checks
  that it is complete and its CRC (or Adler-32); the decompressed length must match the header. For a
  ``.nii.gz`` the decompressed bytes are then used as the voxels (ITK reads only the header), so the check
  costs no second decompression (:func:`DiffusionSegLib.data.volume.read_volume`);
* uncompressed ``.nii``, NRRD and MHA: the data's length must match the header (a ``stat``, no read);
* a DICOM series: each slice's pixel data must be as long as its header says (compressed frames: closed by
  their delimitation item), and a file of the folder that GDCM left out of the series (it does so without a
  word) is named when it looks like DICOM but cannot be read, or is named like the series' slices.

Decompression uses ISA-L (``isal``, about twice as fast as zlib on the same streams, with the same checks)
when it is installed, the standard library otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from DiffusionSegLib.errors import UserInputError

try:  # ISA-L: the same gzip / zlib formats and checks, about twice as fast to inflate
    from isal import igzip as _gzip
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - isal is a dependency; the standard library gives the same results
    import gzip as _gzip
    import zlib as _zlib

__all__ = ["NiftiHeader", "check_data_length", "check_dicom_folder", "check_dicom_pixel_data", "check_nifti_length",
           "check_volume_file", "damaged", "gunzip", "read_nifti_header"]

# Bytes of one voxel component per NIfTI datatype code (complex and RGB(A) count as one voxel).
_NIFTI_ITEMSIZE = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                   1536: 16, 1792: 16, 2048: 32, 2304: 4}  # fmt: skip
_NRRD_ITEMSIZE = {"signed char": 1, "int8": 1, "int8_t": 1, "uchar": 1, "unsigned char": 1, "uint8": 1,
                  "uint8_t": 1, "short": 2, "short int": 2, "signed short": 2, "signed short int": 2, "int16": 2,
                  "int16_t": 2, "ushort": 2, "unsigned short": 2, "unsigned short int": 2, "uint16": 2,
                  "uint16_t": 2, "int": 4, "signed int": 4, "int32": 4, "int32_t": 4, "uint": 4, "unsigned int": 4,
                  "uint32": 4, "uint32_t": 4, "longlong": 8, "long long": 8, "long long int": 8,
                  "signed long long": 8, "signed long long int": 8, "int64": 8, "int64_t": 8, "ulonglong": 8,
                  "unsigned long long": 8, "unsigned long long int": 8, "uint64": 8, "uint64_t": 8, "float": 4,
                  "double": 8}  # fmt: skip
_MET_ITEMSIZE = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                 "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}  # fmt: skip
_TEXT_HEADER_LIMIT = 1 << 16  # NRRD / MetaImage headers are text lines; a real one is a few hundred bytes


def damaged(path: str | os.PathLike, what: str) -> UserInputError:
    """The one line for a damaged file: which file, what is wrong, what to do."""
    return UserInputError(f"'{path}' is damaged: {what}; expected a complete file (copy or download it again)")


def gunzip(path: str | os.PathLike, data: bytes) -> bytes:
    """Decompress a whole gzip file, checking that every member is complete and its CRC and length match."""
    try:
        return _gzip.decompress(data)
    except EOFError:
        raise damaged(path, "its gzip stream ends early (the file is truncated)") from None
    except (OSError, ValueError, _zlib.error) as error:
        raise damaged(path, f"its gzip stream is corrupt ({error})") from None


def _inflate(path: str | os.PathLike, data: bytes, kind: str) -> bytes:
    """Decompress zlib (MetaImage) or gzip (NRRD) encoded voxel data, checking its checksum and end."""
    if data[:2] == b"\x1f\x8b":
        return gunzip(path, data)
    try:
        return _zlib.decompress(data)
    except (_zlib.error, ValueError) as error:
        raise damaged(path, f"its {kind} voxel data is truncated or corrupt ({error})") from None


def check_data_length(path: str | os.PathLike, available: int, needed: int, slack: int = 0) -> None:
    """Refuse voxel data shorter than its header promises, or longer by more than ``slack`` bytes (a header
    whose sizes were damaged would read the voxels sheared)."""
    if available < needed:
        raise damaged(path, f"its voxel data is {available} bytes, its header promises {needed} (the file is "
                            "truncated)")  # fmt: skip
    if available > needed + slack:
        raise damaged(path, f"its voxel data is {available} bytes, its header describes {needed}: the header "
                            "does not match the data")  # fmt: skip


@dataclass(frozen=True)
class NiftiHeader:
    """What the gate needs of a NIfTI-1 header."""

    endian: str
    datatype: int
    offset: int
    dims: tuple[int, ...]
    slope: float
    intercept: float
    scaled: bool
    """True when ``scl_slope`` / ``scl_inter`` change the stored values (ITK then converts them to float)."""

    @property
    def data_bytes(self) -> int | None:
        """Voxel bytes the header promises, or None when its sizes or type are not ones ITK reads."""
        itemsize = _NIFTI_ITEMSIZE.get(self.datatype)
        if itemsize is None or not self.dims or any(d < 1 for d in self.dims):
            return None
        count = 1
        for d in self.dims:
            count *= d
        return count * itemsize


def read_nifti_header(path: str | os.PathLike, head: bytes) -> NiftiHeader | None:
    """Parse the first 348 bytes of a NIfTI-1 file (None for another header: ITK's own checks apply).

    Raises:
        UserInputError: the header is too short, or its voxel sizes (pixdim) are zero, negative or not finite,
            which ITK would silently replace.
    """
    import math
    import struct

    if len(head) < 348:
        raise UserInputError(f"cannot read '{path}': the file is too short to be a NIfTI volume")
    for endian in "<>":
        if struct.unpack(f"{endian}i", head[:4])[0] != 348:
            continue
        dims = struct.unpack(f"{endian}8h", head[40:56])
        datatype = struct.unpack(f"{endian}h", head[70:72])[0]
        if datatype not in _NIFTI_ITEMSIZE:  # the NIfTI library would print its own error besides ITK's
            raise damaged(path, f"its NIfTI header declares datatype code {datatype}, which NIfTI does not define")
        if not 1 <= dims[0] <= 7 or any(d < 1 for d in dims[1 : 1 + dims[0]]):
            raise damaged(path, f"its NIfTI header declares sizes {list(dims[: 1 + max(0, min(dims[0], 7))])} "
                                "(dim[0] axes, then their sizes); expected 1 to 7 axes of at least one voxel")  # fmt: skip
        pixdim = struct.unpack(f"{endian}8f", head[76:108])
        rank = dims[0]
        used = pixdim[1 : 1 + min(rank, 3)]
        if any(not math.isfinite(p) or p <= 0 for p in used):
            spacing = tuple(round(float(p), 6) for p in used)
            raise UserInputError(f"'{Path(path).name}' declares voxel spacing {spacing} mm; expected positive sizes")
        slope, intercept = struct.unpack(f"{endian}2f", head[112:120])
        scaled = not (slope in (0.0, 1.0) and intercept == 0.0)
        return NiftiHeader(endian=endian, datatype=datatype,
                           offset=int(struct.unpack(f"{endian}f", head[108:112])[0]),
                           dims=tuple(int(d) for d in dims[1 : 1 + rank]),
                           slope=slope if math.isfinite(slope) and slope != 0 else 1.0,
                           intercept=intercept if math.isfinite(intercept) else 0.0, scaled=scaled)  # fmt: skip
    return None


def _nifti_slack(header: NiftiHeader) -> int:
    """Trailing bytes tolerated after a NIfTI's voxels: less than one row (a writer's padding)."""
    itemsize = _NIFTI_ITEMSIZE.get(header.datatype, 1)
    return itemsize * (header.dims[0] if header.dims else 1) - 1


def check_nifti_length(path: str | os.PathLike, header: NiftiHeader, available: int) -> None:
    """Refuse a NIfTI whose file (decompressed for ``.nii.gz``) is not its header's offset plus voxel bytes."""
    needed = header.data_bytes
    if needed is not None and header.offset >= 348:
        if available < header.offset:
            raise damaged(path, f"it ends at byte {available}, inside its header (its voxel data would start at byte "
                                f"{header.offset})")  # fmt: skip
        check_data_length(path, available - header.offset, needed, _nifti_slack(header))


def _text_header(path: Path, separator: str) -> tuple[dict[str, str], int]:
    """Fields of a NRRD (``key: value``) or MetaImage (``Key = Value``) header and the byte offset where its
    attached data starts."""
    with open(path, "rb") as handle:
        head = handle.read(_TEXT_HEADER_LIMIT)
    fields: dict[str, str] = {}
    position = 0
    for line in head.splitlines(keepends=True):
        position += len(line)
        text = line.decode("latin-1").strip()
        if separator == ":" and not text:  # NRRD: a blank line ends the header
            return fields, position
        key, sep, value = text.partition(separator if separator == "=" else ": ")
        if not sep and separator == ":" and ":=" not in text and not text.startswith("#") and position > len(line):
            raise damaged(path, f"its NRRD header line {text[:40]!r} is not 'field: value'")
        fields.setdefault(key.strip().lower(), value.strip())
        if separator == "=" and key.strip().lower() == "elementdatafile":  # MetaImage: the last header line
            return fields, position
    if separator == ":" and len(head) < _TEXT_HEADER_LIMIT and ("data file" in fields or "datafile" in fields):
        return fields, position  # a detached NRRD header (.nhdr) may end with the file
    raise damaged(path, "its header never ends (no voxel data follows it)")


def _nrrd_check(path: Path) -> None:
    fields, start = _text_header(path, ":")
    missing = [field for field in ("type", "dimension", "sizes", "encoding") if field not in fields]
    if missing:
        raise damaged(path, f"its NRRD header lacks the required field{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)}")  # fmt: skip
    sizes = [int(s) for s in fields.get("sizes", "").split() if s.lstrip("-").isdigit()]
    itemsize = _NRRD_ITEMSIZE.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "raw").lower()
    data_file = fields.get("data file") or fields.get("datafile")
    if not sizes or itemsize is None or any(s < 1 for s in sizes) or int(fields.get("line skip", "0") or 0):
        return  # an unusual layout: ITK's own checks apply
    if data_file:
        if data_file.startswith("LIST") or len(data_file.split()) > 1:
            return
        path, start = (path.parent / data_file), 0
        if not path.is_file():
            raise UserInputError(f"cannot read '{path}': the data file its NRRD header names is missing")
    skip = int(fields.get("byte skip", "0") or 0)
    if skip < 0:
        return
    needed = itemsize
    for size in sizes:
        needed *= size
    if encoding == "raw":
        check_data_length(path, path.stat().st_size - start - skip, needed, sizes[0] * itemsize - 1)
    elif encoding in ("gzip", "gz", "bzip2", "bz2"):
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
        if encoding.startswith("b"):
            import bz2

            try:
                data = bz2.decompress(data)
            except (OSError, ValueError, EOFError) as error:
                raise damaged(path, f"its bzip2 voxel data is truncated or corrupt ({error})") from None
        else:
            data = gunzip(path, data)
        check_data_length(path, len(data) - skip, needed, sizes[0] * itemsize - 1)


def _metaimage_check(path: Path) -> None:
    fields, start = _text_header(path, "=")
    sizes = [int(s) for s in fields.get("dimsize", "").split() if s.lstrip("-").isdigit()]
    itemsize = _MET_ITEMSIZE.get(fields.get("elementtype", "").upper())
    channels = int(fields.get("elementnumberofchannels", "1") or 1)
    data_file = fields.get("elementdatafile", "")
    if not sizes or itemsize is None or any(s < 1 for s in sizes) or int(fields.get("headersize", "0") or 0) != 0:
        return
    if data_file.upper() != "LOCAL":
        if data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) > 1:
            return
        path, start = (path.parent / data_file), 0
        if not path.is_file():
            raise UserInputError(f"cannot read '{path}': the data file its MetaImage header names is missing")
    needed = itemsize * channels
    for size in sizes:
        needed *= size
    if fields.get("compresseddata", "false").lower() == "true":
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()
        declared = int(fields.get("compresseddatasize", "0") or 0)
        if declared and len(data) < declared:
            raise damaged(path, f"its compressed voxel data is {len(data)} bytes, its header promises {declared} "
                                "(the file is truncated)")  # fmt: skip
        check_data_length(path, len(_inflate(path, data, "zlib")), needed, sizes[0] * itemsize * channels - 1)
    else:
        check_data_length(path, path.stat().st_size - start, needed, sizes[0] * itemsize * channels - 1)


def check_volume_file(path: str | os.PathLike, suffix: str) -> None:
    """Refuse a NRRD or MetaImage file whose voxel data is shorter (or longer) than its header promises or
    whose compressed data is truncated or fails its checksum (NIfTI: see :func:`read_nifti_header`)."""
    path = Path(path)
    if suffix in (".nrrd", ".nhdr", ".seg.nrrd"):
        _nrrd_check(path)
    elif suffix in (".mha", ".mhd"):
        _metaimage_check(path)


_PIXEL_DATA = b"\xe0\x7f\x10\x00"  # the (7FE0,0010) Pixel Data tag, little endian
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD) Sequence Delimitation Item, length 0


def _pixel_data_problem(data: bytes) -> str | None:
    """What is missing of a DICOM file's (little-endian) Pixel Data element, or None when it is complete."""
    at = data.rfind(_PIXEL_DATA)
    if at < 0:
        return None  # no image in this file; GDCM says what it lacks
    if data[at + 4 : at + 6] in (b"OB", b"OW", b"OF", b"OD", b"UN"):  # explicit VR: 2 reserved bytes, 4-byte length
        length, start = int.from_bytes(data[at + 8 : at + 12], "little"), at + 12
    else:  # implicit VR
        length, start = int.from_bytes(data[at + 4 : at + 8], "little"), at + 8
    if length == 0xFFFFFFFF:  # encapsulated (compressed) frames, closed by a delimitation item
        if data.find(_SEQUENCE_END, start) < 0:
            return "its compressed pixel data ends without its closing item (the file is truncated)"
    elif len(data) < start + length:
        return f"its pixel data is {len(data) - start} bytes, its header promises {length} (the file is truncated)"
    return None


def _dicom_files(folder: Path) -> list[Path]:
    """The files of a folder that carry the DICOM marker (``DICM`` after the 128-byte preamble)."""
    found = []
    for file in sorted(folder.iterdir()):
        if file.name.startswith(".") or not file.is_file():
            continue
        with open(file, "rb") as handle:
            if handle.read(132)[128:] == b"DICM":
                found.append(file)
    return found


def check_dicom_pixel_data(folder: str | os.PathLike) -> None:
    """Refuse a DICOM folder with a file whose pixel data is shorter than its header says (before GDCM reads the
    folder: GDCM spends seconds on such a file and then leaves it out of the series without a word)."""
    for file in _dicom_files(Path(folder)):
        with open(file, "rb") as handle:
            problem = _pixel_data_problem(handle.read())
        if problem:
            raise damaged(file, problem)


def _name_pattern(name: str) -> str:
    """A file name without its digits: the slices of a series share it (``IM0001``, ``CT.1.2.840....573``)."""
    return "".join(c for c in name if not c.isdigit())


def check_dicom_folder(folder: str | os.PathLike, series_id: str, series_files: Sequence[str]) -> None:
    """Refuse a DICOM folder holding a file left out of the series although it is named like its slices, or looks
    like DICOM and cannot be read or belongs to the series: GDCM leaves such a slice out of the series without
    a word, and the scan would be read one slice short."""
    import SimpleITK as sitk

    folder = Path(folder)
    listed = {os.path.realpath(f) for f in series_files}
    slice_names = {_name_pattern(Path(f).name) for f in series_files}
    marked = set(_dicom_files(folder))
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.name.startswith(".") or os.path.realpath(file) in listed:
            continue
        if file not in marked:
            if _name_pattern(file.name) in slice_names:
                raise damaged(file, "it is named like the slices of the series but is not readable DICOM (truncated "
                                    "or corrupt)")  # fmt: skip
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise damaged(file, "this DICOM slice cannot be read (truncated or corrupt)") from None
        if reader.HasMetaDataKey("0020|000e") and reader.GetMetaData("0020|000e").strip() == series_id.strip():
            raise damaged(file, "this slice of the series cannot be read (truncated or corrupt pixel data)")
