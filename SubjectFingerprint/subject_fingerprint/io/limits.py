"""Checks made before and after decoding, so bad files fail with a reason instead of costing
memory or becoming a false match.

- :func:`check_declared_size`: the size a header declares, against a voxel limit (and against
  what the file holds, for uncompressed data), before anything is allocated;
- :func:`check_volume_header`: reads NIfTI, NRRD and MetaImage headers with a few hundred bytes
  of I/O, applies the limit and streams compressed data once (without keeping it) to find
  truncated files, which SimpleITK would otherwise zero-fill;
- :func:`check_content`: refuses decoded images with no usable content (no finite value, one
  value everywhere, too few pixels), so two blank images can never match.

The limit is ``SUBJECT_FINGERPRINT_MAX_VOXELS`` voxels (default 2**28, 1 GiB as float32: a
512x512x1000 CT fits).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ImageReadError

DEFAULT_MAX_VOXELS = 1 << 28
# Fewer pixels than this along the image plane's axes is not an image a model can learn anything from.
MIN_SIDE = 4
_CHUNK = 1 << 20


def max_voxels() -> int:
    try:
        return max(1, int(os.environ.get("SUBJECT_FINGERPRINT_MAX_VOXELS", DEFAULT_MAX_VOXELS)))
    except ValueError:
        return DEFAULT_MAX_VOXELS


def check_declared_size(path, shape: Sequence[int], bytes_per_voxel: float = 0,
                        available_bytes: Optional[int] = None) -> int:
    """Refuse a declared ``shape`` above the voxel limit, or (with ``available_bytes``) larger
    than the uncompressed data the file holds. Returns the declared data size in bytes."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise ImageReadError(path, f"damaged header: negative image size {tuple(dims)}")
    voxels = int(np.prod(dims, dtype=object)) if dims else 0
    limit = max_voxels()
    if voxels > limit:
        raise ImageReadError(
            path, f"header declares {' x '.join(map(str, dims))} = {voxels:,} voxels, over the "
                  f"limit of {limit:,} (SUBJECT_FINGERPRINT_MAX_VOXELS); refused before reading")
    need = int(voxels * bytes_per_voxel)
    if available_bytes is not None and need > available_bytes:
        raise ImageReadError(
            path, f"truncated file: header declares {need:,} bytes of pixel data, the file holds "
                  f"{max(0, available_bytes):,}")
    return need


def check_content(array: np.ndarray, path) -> np.ndarray:
    """The decoded image, unchanged, if it has usable content. Raises :class:`ImageReadError`
    for blank or meaningless images. The few non-finite values an accepted image may hold are
    left for Preprocessing, the one place that replaces them."""
    if array.size == 0 or min(array.shape) == 0:
        raise ImageReadError(path, f"image has no pixels (shape {array.shape})")
    # The image plane needs MIN_SIDE pixels each way; a thin volume may have few slices.
    if sorted(array.shape)[-2] < MIN_SIDE or min(array.shape) < 2:
        raise ImageReadError(path, f"image of {' x '.join(map(str, array.shape))} pixels is too "
                                   f"small to fingerprint (at least {MIN_SIDE} x {MIN_SIDE} pixels)")
    finite = np.isfinite(array)
    all_finite = bool(finite.all())
    values = array if all_finite else array[finite]
    if values.size == 0:
        raise ImageReadError(path, "blank image: no pixel has a finite value (all NaN or "
                                   "infinite, for example a NaN rescale slope)")
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise ImageReadError(path, f"blank image: every {'finite ' if not all_finite else ''}"
                                   f"pixel has the value {low:g}; nothing to fingerprint")
    return array


# -- compressed streams ---------------------------------------------------------------------------

def _stream_length(path, offset: int, need: int, wbits: int) -> int:
    """Bytes a zlib/gzip stream starting at ``offset`` decompresses to, reading until ``need``
    bytes have come out or the stream ends; raises for a truncated or damaged stream."""
    got = 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        d = zlib.decompressobj(wbits)
        pending = b""
        while got < need:
            data = pending or handle.read(_CHUNK)
            pending = b""
            if not data:
                if not d.eof:
                    raise ImageReadError(path, f"truncated compressed file: the stream ends after "
                                               f"{got:,} of {need:,} bytes")
                break
            try:
                got += len(d.decompress(data, need - got + 1))
                while d.unconsumed_tail and got < need:
                    got += len(d.decompress(d.unconsumed_tail, need - got + 1))
            except zlib.error as exc:
                raise ImageReadError(path, f"damaged compressed data ({exc})") from exc
            if d.eof and got < need:
                if not d.unused_data:
                    pending = handle.read(_CHUNK)
                    if not pending:
                        break
                else:
                    pending = d.unused_data
                d = zlib.decompressobj(wbits)  # a further gzip member
    return got


def _gzip_size_matches(path, expected: int) -> bool:
    """True when a gzip file's trailer (ISIZE: uncompressed size mod 2**32) says exactly
    ``expected`` bytes: a complete stream, known in O(1). A cut file ends in compressed data,
    which matches by chance once in 4 billion; anything else gets the full streaming check."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < 18:
            return False
        handle.seek(-4, os.SEEK_END)
        return struct.unpack("<I", handle.read(4))[0] == expected % (1 << 32)


# -- NIfTI ----------------------------------------------------------------------------------------

def _nifti(path: Path, name: str) -> None:
    gz = name.endswith(".gz")
    opener = gzip.open if gz else open
    with open(path, "rb") as handle:
        if gz and handle.read(2) != b"\x1f\x8b":
            return  # not gzip at all: SimpleITK's message names the format problem
    try:
        with opener(path, "rb") as handle:
            head = handle.read(540)
    except EOFError as exc:
        raise ImageReadError(path, f"truncated compressed file ({exc})") from exc
    except OSError as exc:
        raise ImageReadError(path, f"damaged compressed file ({exc})") from exc
    if len(head) < 348:
        raise ImageReadError(path, f"truncated NIfTI header ({len(head)} of 348 bytes)")
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size in (348, 540):
            break
    else:
        return  # not a header we know; SimpleITK says what it is
    if size == 348:
        dim = struct.unpack(endian + "8h", head[40:56])
        bitpix = struct.unpack(endian + "h", head[72:74])[0]
        offset = int(struct.unpack(endian + "f", head[108:112])[0])
    else:
        if len(head) < 540:
            raise ImageReadError(path, f"truncated NIfTI-2 header ({len(head)} of 540 bytes)")
        bitpix = struct.unpack(endian + "h", head[14:16])[0]
        dim = struct.unpack(endian + "8q", head[16:80])
        offset = struct.unpack(endian + "q", head[168:176])[0]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise ImageReadError(path, f"damaged NIfTI header: {ndim} dimensions")
    shape = [max(1, d) if d == 0 else d for d in dim[1:ndim + 1]]
    pair = name.endswith(".hdr")
    offset = 0 if pair else max(offset, size)
    data_path = path.with_suffix(".img") if pair else path
    if gz:
        need = check_declared_size(path, shape, bitpix / 8)
        if _gzip_size_matches(path, offset + need):
            return
        got = _stream_length(path, 0, offset + need, wbits=31)
        if got < offset + need:
            raise ImageReadError(path, f"truncated file: header declares {need:,} bytes of voxels, "
                                       f"the compressed stream holds {max(0, got - offset):,}")
        return
    available = data_path.stat().st_size - offset if data_path.exists() else None
    check_declared_size(path, shape, bitpix / 8, available)


# -- NRRD and MetaImage ---------------------------------------------------------------------------

_NRRD_TYPES = {
    1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
    2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
        "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
        "float"),
    8: ("longlong", "long long", "long long int", "signed long long", "signed long long int",
        "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64",
        "uint64_t", "double"),
}
_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
              "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
              "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _text_header(path: Path, limit: int = 1 << 16):
    """Header lines and the offset of the byte after them (NRRD: blank line; MetaImage: the
    ElementDataFile line)."""
    with open(path, "rb") as handle:
        blob = handle.read(limit)
    lines, pos = [], 0
    while pos < len(blob):
        end = blob.find(b"\n", pos)
        if end < 0:
            break
        line = blob[pos:end].decode("latin-1").rstrip("\r")
        pos = end + 1
        lines.append(line)
        if not line.strip() or line.strip().lower().startswith("elementdatafile"):
            break
    return lines, pos


def _check_data(path: Path, data_path: Path, offset: int, shape, bpv: float, compression: str):
    if compression:
        need = check_declared_size(path, shape, bpv)
        if compression == "gzip" and _gzip_size_matches(data_path, need):
            return
        got = _stream_length(data_path, offset, need, wbits=31 if compression == "gzip" else 47)
        if got < need:
            raise ImageReadError(path, f"truncated file: header declares {need:,} bytes of voxels, "
                                       f"the compressed data holds {got:,}")
    else:
        check_declared_size(path, shape, bpv, data_path.stat().st_size - offset)


def _nrrd(path: Path) -> None:
    lines, offset = _text_header(path)
    if not lines or not lines[0].startswith("NRRD"):
        return
    fields = {}
    for line in lines[1:]:
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
    try:
        shape = [int(v) for v in fields.get("sizes", "").split()]
    except ValueError:
        raise ImageReadError(path, f"damaged NRRD header: sizes {fields.get('sizes')!r}") from None
    kind = fields.get("type", "").lower()
    bpv = next((n for n, names in _NRRD_TYPES.items() if kind in names), 0)
    encoding = fields.get("encoding", "raw").lower()
    data_file = fields.get("data file") or fields.get("datafile")
    if not shape or not bpv or encoding not in ("raw", "gzip", "gz") or \
            (data_file and (" " in data_file or data_file.upper().startswith("LIST"))):
        check_declared_size(path, shape)   # the limit at least; SimpleITK reads the rest
        return
    data_path = path.parent / data_file if data_file else path
    if data_file:
        offset = 0
    if not data_path.exists():
        raise ImageReadError(path, f"data file {data_file} named in the header is missing")
    _check_data(path, data_path, offset, shape, bpv, "gzip" if encoding != "raw" else "")


def _metaimage(path: Path) -> None:
    lines, offset = _text_header(path)
    fields = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if "dimsize" not in fields:
        return
    try:
        shape = [int(v) for v in fields["dimsize"].split()]
        channels = int(fields.get("elementnumberofchannels", "1") or 1)
    except ValueError:
        raise ImageReadError(path, f"damaged MetaImage header: DimSize {fields['dimsize']!r}") from None
    bpv = _MET_SIZES.get(fields.get("elementtype", "").upper(), 0) * max(1, channels)
    data_file = fields.get("elementdatafile", "")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if not bpv or not data_file or " " in data_file or "%" in data_file or \
            data_file.upper() == "LIST" or int(fields.get("headersize", "0") or 0) != 0:
        check_declared_size(path, shape)
        return
    if data_file.upper() == "LOCAL":
        data_path = path
    else:
        data_path, offset = path.parent / data_file, 0
        if not data_path.exists():
            raise ImageReadError(path, f"data file {data_file} named in the header is missing")
    _check_data(path, data_path, offset, shape, bpv, "zlib" if compressed else "")


def check_volume_header(path) -> None:
    """Size limit and truncation checks for a NIfTI/NRRD/MetaImage file (see module doc)."""
    path = Path(path)
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz", ".hdr")):
            _nifti(path, name)
        elif name.endswith((".nrrd", ".nhdr")):
            _nrrd(path)
        elif name.endswith((".mha", ".mhd")):
            _metaimage(path)
    except ImageReadError:
        raise
    except (OSError, EOFError, struct.error, ValueError) as exc:
        raise ImageReadError(path, f"cannot read the header ({type(exc).__name__}: {exc})") from exc

