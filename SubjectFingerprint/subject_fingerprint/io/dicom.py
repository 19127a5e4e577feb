"""DICOM: header sorting for discovery, projection X-rays as 2D, MR/CT series as 3D.

Everything here reads with pydicom, so any transfer syntax pydicom can decode with the
installed plugins (its own RLE decoder, pylibjpeg, ...) works the same for a single X-ray,
a slice of a series and an enhanced multi-frame volume.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ImageReadError
from .limits import check_declared_size
from .quiet import quiet_dependency_loggers
from .pixels import rgb_to_grey

# Modalities whose single-frame files are slices of a 3D series rather than images of their own.
VOLUME_MODALITIES = frozenset({"MR", "CT", "PT"})

# SOP classes that never hold an image to fingerprint, though some carry pixel-less headers
# that look like images: structured reports, key object selections, presentation states,
# RT structures/plans, raw data, encapsulated documents, waveforms, segmentations.
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",    # structured reports, KOs
    "1.2.840.10008.5.1.4.1.1.11.",    # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",   # RT objects (dose grids excluded below)
    "1.2.840.10008.5.1.4.1.1.66",     # raw data, spatial registration, fiducials
    "1.2.840.10008.5.1.4.1.1.104.",   # encapsulated PDF/CDA/STL
    "1.2.840.10008.5.1.4.1.1.9.",     # waveforms
    "1.2.840.10008.5.1.4.1.1.67",     # real world value mapping
    "1.2.840.10008.5.1.4.1.1.68.",    # surfaces
)
_SEGMENTATION_SOP = "1.2.840.10008.5.1.4.1.1.66.4"
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"


@dataclass
class DicomHeader:
    """What discovery needs from one DICOM file (read without its pixels)."""

    path: str
    patient_id: str = ""
    modality: str = ""
    view: str = ""
    sop_uid: str = ""
    series_uid: str = ""
    frames: int = 1
    rows: int = 0
    columns: int = 0
    orientation: Optional[Tuple[float, ...]] = None
    position: Optional[Tuple[float, ...]] = None
    instance: int = 0
    stack_key: tuple = field(default=())
    localizer: bool = False
    enhanced: bool = False
    skip_reason: str = ""   # set for DICOM files that are not images (SR, KO, DICOMDIR, ...)

    @property
    def is_slice(self) -> bool:
        """True for a single-frame MR/CT/PT file, one slice of a series volume."""
        return self.modality in VOLUME_MODALITIES and self.frames <= 1


def _floats(value, count) -> Optional[Tuple[float, ...]]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == count else None


def read_dataset(path, header_only: bool = False):
    """``pydicom.dcmread`` with our errors: ImageReadError for empty or non-DICOM files."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = str(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageReadError(path, "empty file")
    except OSError as exc:
        raise ImageReadError(path, f"cannot open file ({exc.strerror or exc})") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Some old exports omit the 128-byte preamble; read those only when the file
            # starts like a DICOM data set, so random files are still refused.
            ds = pydicom.dcmread(path, stop_before_pixels=header_only,
                                 force=_looks_like_raw_dicom(path))
        _ensure_transfer_syntax(ds)
        return ds
    except InvalidDicomError as exc:
        raise ImageReadError(
            path, "not a DICOM file (no DICM preamble) and not a known image format") from exc
    except (EOFError, ValueError, KeyError, TypeError, OverflowError, AttributeError) as exc:
        raise ImageReadError(path, f"damaged or truncated DICOM file ({exc})") from exc
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc


def _ensure_transfer_syntax(ds):
    """Files without meta information: record the encoding pydicom found, for the decoders."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if hasattr(ds, "original_encoding"):
        implicit, little = ds.original_encoding
    else:  # pydicom 2.x records the encoding it read on the data set itself
        implicit, little = ds.is_implicit_VR, ds.is_little_endian
    if implicit is None:
        implicit, little = True, True
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def is_dicom_file(path) -> bool:
    """True for a DICOM file: "DICM" at byte 128, or a preamble-less data set."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            if handle.read(4) == b"DICM":
                return True
    except OSError:
        return False
    return _looks_like_raw_dicom(path)


# First tags of a preamble-less file: group 0002 (meta), 0008 (identification), little endian,
# followed by an element number below 0x0100.
_RAW_STARTS = (b"\x02\x00", b"\x08\x00")


def _looks_like_raw_dicom(path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    if len(head) < 8 or head[128:132] == b"DICM":
        return False
    if head[:2] not in _RAW_STARTS or head[3] != 0:
        return False
    vr = head[4:6]
    # Explicit VR (two capital letters) or implicit VR (a 4-byte length that fits the file).
    return (vr.isalpha() and vr.isupper()) or int.from_bytes(head[4:8], "little") < 1 << 16


def _first(ds, *names, default=None):
    for name in names:
        value = ds.get(name)
        if value not in (None, ""):
            return value
    return default


def _functional_item(ds, frame: Optional[int], sequence: str):
    """Item of a functional group macro for ``frame`` (per-frame first, then shared)."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if frame < len(per_frame):
            groups.append(per_frame[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        items = group.get(sequence)
        if items:
            return items[0]
    return None


def header_info(path) -> DicomHeader:
    """Read one DICOM file's header (no pixels) and sort it out for discovery.

    Raises :class:`ImageReadError` for files that are not DICOM or are damaged; non-image
    DICOM objects come back with ``skip_reason`` set.
    """
    ds = read_dataset(path, header_only=True)
    path = str(path)
    meta = getattr(ds, "file_meta", None)
    sop_class = str(_first(ds, "SOPClassUID", default="") or
                    (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    info = DicomHeader(path=path)
    if sop_class == _DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
        info.skip_reason = "DICOMDIR (directory index, the files it lists are walked directly)"
        return info
    if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES) and sop_class != _SEGMENTATION_SOP \
            and sop_class != "1.2.840.10008.5.1.4.1.1.481.2":   # RT dose is an image grid
        info.skip_reason = f"not an image: {_sop_name(sop_class)} object has no pixel data"
        return info
    if sop_class == _SEGMENTATION_SOP:
        info.skip_reason = "segmentation object, not an image"
        return info
    if "Rows" not in ds or "Columns" not in ds:
        if "Image Storage" in _sop_name(sop_class):
            raise ImageReadError(path, f"truncated or incomplete DICOM image: {_sop_name(sop_class)} "
                                       "without Rows/Columns")
        info.skip_reason = f"no image pixels (SOP class {_sop_name(sop_class) or 'unknown'})"
        return info

    info.patient_id = str(ds.get("PatientID", "") or "").strip()
    info.modality = str(ds.get("Modality", "") or "").strip().upper()
    info.view = str(ds.get("ViewPosition", "") or "").strip()
    info.sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    info.series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    info.rows, info.columns = int(ds.Rows), int(ds.Columns)
    try:
        info.frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        info.frames = 1
    info.enhanced = "PerFrameFunctionalGroupsSequence" in ds
    info.orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    info.position = _floats(ds.get("ImagePositionPatient"), 3)
    try:
        info.instance = int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        info.instance = 0
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    info.localizer = "LOCALIZER" in image_type
    orient = tuple(round(v, 3) for v in info.orientation) if info.orientation else ()
    # Files of one series that cannot share a volume: other plane, size, echo or time point.
    info.stack_key = (orient, info.rows, info.columns, str(ds.get("EchoNumbers", "")),
                      str(ds.get("TemporalPositionIdentifier", "")),
                      str(ds.get("AcquisitionNumber", "")) if info.modality == "MR" else "")
    return info


def _sop_name(uid: str) -> str:
    try:
        from pydicom.uid import UID

        name = UID(uid).name
        return name if name and name != uid else uid
    except Exception:  # noqa: BLE001 - a name is only decoration
        return uid


# ----------------------------------------------------------------------------- slice order

def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return np.cross(row, col)


def order_slices(headers: List[DicomHeader]) -> List[DicomHeader]:
    """Slices sorted along the slice normal (ImagePositionPatient), else by InstanceNumber."""
    if all(h.orientation and h.position for h in headers):
        normal = slice_normal(headers[0].orientation)
        return sorted(headers, key=lambda h: (float(np.dot(normal, h.position)), h.instance, h.path))
    return sorted(headers, key=lambda h: (h.instance, h.path))


def _positions_unique(headers: List[DicomHeader]) -> bool:
    """True when no two files lie at the same ImagePositionPatient (to 1 micrometre)."""
    if not all(h.position for h in headers):
        return len(headers) == 1
    spots = {tuple(round(v, 3) for v in h.position) for h in headers}
    return len(spots) == len(headers)


def split_series(headers: List[DicomHeader]) -> Tuple[List[List[DicomHeader]], List[str]]:
    """Split one SeriesInstanceUID into stacks that each make one volume.

    Returns the ordered stacks (largest first) and reasons for files left out (localizers).
    """
    skipped = []
    kept = [h for h in headers if not h.localizer]
    if len(kept) < len(headers):
        skipped.extend(h.path for h in headers if h.localizer)
    # First by plane and size (files that can never share a volume), then, only where two
    # files sit at one position, by echo / time point / acquisition: some scanners number
    # every slice as its own acquisition, and splitting those would break a good volume.
    planes: Dict[tuple, List[DicomHeader]] = {}
    for h in kept:
        planes.setdefault(h.stack_key[:3], []).append(h)
    stacks: Dict[tuple, List[DicomHeader]] = {}
    for plane, members in planes.items():
        if _positions_unique(members):
            stacks[plane] = members
            continue
        for h in members:
            stacks.setdefault(h.stack_key, []).append(h)
    ordered = sorted(stacks.values(), key=lambda s: (-len(s), min(h.path for h in s)))
    return [order_slices(s) for s in ordered], skipped


def series_files_in_folder(folder) -> List[str]:
    """Files of the one DICOM image series in ``folder`` (recursively), sorted by position."""
    headers = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.startswith(".") or not is_dicom_file(path):
                continue
            info = header_info(path)
            if not info.skip_reason:
                headers.append(info)
    if not headers:
        raise ImageReadError(folder, "no DICOM image files in this folder")
    series = {h.series_uid for h in headers}
    if len(series) > 1:
        raise ImageReadError(folder, f"folder holds {len(series)} DICOM series; give one series")
    stacks, _ = split_series(headers)
    if not stacks:
        raise ImageReadError(folder, "only localizer images in this folder")
    return [h.path for h in stacks[0]]


# ----------------------------------------------------------------------------- pixels
# pydicom 3 moved the LUT helpers to ``pydicom.pixels`` and replaced the 2.x pixel data
# handlers with decoders; Slicer 5.8/5.10 ship pydicom 2.4, so both are supported.

def _lut_functions():
    """(apply_modality_lut, apply_voi_lut, apply_color_lut) of the installed pydicom."""
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut, apply_color_lut


def decoder_status(tsyntax) -> str:
    """"ok", "unsupported" (pydicom has no decoder) or "unavailable" (no plugin installed)."""
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom 2.x: a list of handlers, each for some transfer syntaxes
        from pydicom import config

        handlers = [h for h in config.pixel_data_handlers if h.supports_transfer_syntax(tsyntax)]
        if not handlers:
            return "unsupported"
        return "ok" if any(h.is_available() for h in handlers) else "unavailable"
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return "unsupported"
    return "ok" if decoder.is_available else "unavailable"


def _decode(ds, path) -> np.ndarray:
    """``ds.pixel_array`` with a clear error for missing decoders and damaged data."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, "DICOM file has no pixel data")
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    ts_label = ""
    if tsyntax is not None:
        ts_label = f"{tsyntax.name} ({tsyntax})" if tsyntax.name != str(tsyntax) else str(tsyntax)
        status = decoder_status(tsyntax)
        if status == "unsupported":
            raise ImageReadError(
                path, f"unsupported transfer syntax {ts_label}: pydicom has no decoder for it")
        if status == "unavailable":
            raise ImageReadError(
                path, f"unsupported transfer syntax {ts_label}: no installed decoder plugin "
                      "(install pylibjpeg with its libjpeg/openjpeg plugins, or python-gdcm)")
    _check_declared(ds, path)
    try:
        with warnings.catch_warnings(), quiet_dependency_loggers():
            warnings.simplefilter("ignore")
            return np.asarray(ds.pixel_array)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise anything; all mean "cannot decode"
        # Plugin errors run over many lines (one per plugin tried): keep them short.
        detail = " ".join(str(exc).split())[:300]
        compressed = tsyntax is not None and getattr(tsyntax, "is_compressed", False)
        if compressed:
            reason = (f"cannot decode pixel data in transfer syntax {ts_label}, damaged, "
                      f"truncated or not supported by the installed decoders ({detail})")
        elif "less than expected" in detail or "truncat" in detail.lower():
            reason = f"truncated pixel data ({detail})"
        else:
            reason = f"cannot decode pixel data, damaged or truncated ({detail})"
        raise ImageReadError(path, reason) from exc


def _check_declared(ds, path) -> None:
    """Declared Rows x Columns x frames x samples against the voxel limit, before decoding
    (compressed pixel data can declare far more than the file holds)."""
    try:
        shape = (int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns),
                 int(ds.get("SamplesPerPixel", 1) or 1))
    except (AttributeError, TypeError, ValueError):
        return  # pydicom's own error says what is wrong
    check_declared_size(path, shape)


def _to_grey(arr: np.ndarray, ds, path) -> np.ndarray:
    """One grey channel: RGB (pydicom already converts YBR) to luminance, palette via its LUT."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        arr = _lut_functions()[2](arr, ds)
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR":
        if arr.shape[-1] < 3:
            raise ImageReadError(path, f"unexpected colour layout {arr.shape}")
        arr = rgb_to_grey(arr.astype(np.float64))
    return arr


def pixel_spacing(ds, frame: Optional[int] = None) -> Tuple[float, float]:
    """(row, column) spacing in mm: PixelSpacing, ImagerPixelSpacing, functional groups, else 1."""
    value = _first(ds, "PixelSpacing", "ImagerPixelSpacing")
    if value is None:
        item = _functional_item(ds, frame if frame is not None else 0, "PixelMeasuresSequence")
        value = item.get("PixelSpacing") if item is not None else None
    spacing = _floats(value, 2) if value is not None else None
    if not spacing or min(spacing) <= 0:
        return (1.0, 1.0)
    return spacing


def read_projection(path) -> Tuple[np.ndarray, Tuple[float, float], object]:
    """A 2D DICOM image (CR/DX/DR, single MR slice, ...) as float32 with bone bright.

    Applies the Modality LUT (or rescale), then for projection images the VOI LUT or window,
    then inverts MONOCHROME1. Returns (array, (row, col) spacing, the dataset).
    """
    apply_modality_lut, apply_voi_lut, _ = _lut_functions()

    path = str(path)
    ds = read_dataset(path)
    if "Rows" not in ds:
        raise ImageReadError(path, "DICOM object has no image (no Rows/Columns)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(path, f"multi-frame image with {frames} frames is not one 2D image "
                                   "(only enhanced MR/CT multi-frames are read, as volumes)")
    arr = _decode(ds, path)
    if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and arr.shape[0] == 1:
        arr = arr[0]
    modality = str(ds.get("Modality", "") or "").upper()
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        arr = apply_modality_lut(arr, ds)
        if modality not in VOLUME_MODALITIES:
            # The VOI transform chooses what a reader is meant to see; MR/CT keep raw values.
            try:
                arr = apply_voi_lut(arr, ds, index=0, prefer_lut=True)
            except (ValueError, TypeError, IndexError, KeyError, AttributeError):
                pass   # a malformed window/LUT (e.g. width 0): the modality values are still right
        arr = np.asarray(arr, dtype=np.float64)
        if photometric == "MONOCHROME1":
            # Same range, flipped: low values (bone in MONOCHROME1) become high.
            arr = (arr.max() + arr.min()) - arr
    else:
        arr = _to_grey(arr, ds, path)
    if arr.ndim != 2:
        raise ImageReadError(path, f"expected one 2D image, got pixel array of shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32), pixel_spacing(ds), ds


# ----------------------------------------------------------------------------- volumes

def _volume_image(stack: np.ndarray, spacing_xyz, origin, direction_cols):
    """A SimpleITK image from (z, y, x) pixels and DICOM geometry (direction as columns)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(stack, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetOrigin([float(o) for o in origin])
    # SimpleITK wants the direction matrix row-major; its columns are the x, y, z axes.
    image.SetDirection([float(v) for v in np.column_stack(direction_cols).ravel()])
    return image


def _slice_spacing(positions: List[float], ds_first, path) -> float:
    if len(positions) > 1:
        # Positions come sorted; equal neighbours mean two slices at one place.
        gaps = np.diff(np.asarray(positions, float))
        if np.any(gaps < 1e-4):
            raise ImageReadError(path, f"series has several slices at the same position "
                                       f"({len(positions)} slices); cannot make one volume")
        return float(np.median(gaps))
    value = _first(ds_first, "SpacingBetweenSlices", "SliceThickness", default=1.0)
    try:
        return float(value) if float(value) > 0 else 1.0
    except (TypeError, ValueError):
        return 1.0


def read_series(files: Sequence[str]):
    """A series of single-frame slices as one SimpleITK image in DICOM geometry (not yet LPS).

    Slices are re-sorted along the slice normal here too, so the order of ``files`` does
    not matter. Each slice gets its own rescale slope/intercept.
    """
    apply_modality_lut = _lut_functions()[0]

    if not files:
        raise ImageReadError("", "empty DICOM series")
    first_path = str(files[0])
    slices = []
    for path in files:
        ds = read_dataset(path)
        arr = _decode(ds, str(path))
        if arr.ndim != 2:
            raise ImageReadError(path, f"series slice is not a single 2D frame (shape {arr.shape})")
        arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        slices.append((ds, arr, str(path)))

    shapes = {a.shape for _, a, _ in slices}
    if len(shapes) > 1:
        raise ImageReadError(first_path, f"series slices differ in size: {sorted(shapes)}")
    orient = [_floats(ds.get("ImageOrientationPatient"), 6) for ds, _, _ in slices]
    pos = [_floats(ds.get("ImagePositionPatient"), 3) for ds, _, _ in slices]
    if all(orient) and all(pos):
        normal = slice_normal(orient[0])
        keyed = sorted(zip([float(np.dot(normal, p)) for p in pos], range(len(slices))))
        order = [i for _, i in keyed]
        positions = [k for k, _ in keyed]
        row_dir = np.asarray(orient[0][:3], float)
        col_dir = np.asarray(orient[0][3:], float)
        origin = pos[order[0]]
    else:
        order = sorted(range(len(slices)), key=lambda i: int(slices[i][0].get("InstanceNumber", 0) or 0))
        positions = [float(i) for i in range(len(slices))]
        row_dir, col_dir, normal = np.eye(3)
        origin = (0.0, 0.0, 0.0)
    ds0 = slices[order[0]][0]
    dz = _slice_spacing(positions if all(orient) and all(pos) else [], ds0, first_path)
    row_sp, col_sp = pixel_spacing(ds0)
    stack = np.stack([slices[i][1] for i in order])
    return _volume_image(stack, (col_sp, row_sp, dz), origin, (row_dir, col_dir, normal))


def read_enhanced(path):
    """An enhanced (functional-group) MR/CT multi-frame file as one SimpleITK volume."""
    path = str(path)
    ds = read_dataset(path)
    arr = _decode(ds, path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != frames:
        raise ImageReadError(path, f"unexpected multi-frame pixel layout {arr.shape}")
    orients, positions, data = [], [], []
    for i in range(frames):
        plane = _functional_item(ds, i, "PlaneOrientationSequence")
        where = _functional_item(ds, i, "PlanePositionSequence")
        orients.append(_floats(plane.get("ImageOrientationPatient") if plane is not None else None, 6))
        positions.append(_floats(where.get("ImagePositionPatient") if where is not None else None, 3))
        scale = _functional_item(ds, i, "PixelValueTransformationSequence")
        source = scale if scale is not None else ds
        slope = float(source.get("RescaleSlope", 1.0))
        inter = float(source.get("RescaleIntercept", 0.0))
        data.append(arr[i].astype(np.float32) * slope + inter)
    if not all(orients) or not all(positions):
        raise ImageReadError(path, "multi-frame file lacks per-frame plane position/orientation; "
                                   "cannot build a volume")
    if len({tuple(round(v, 3) for v in o) for o in orients}) > 1:
        raise ImageReadError(path, "multi-frame file mixes slice orientations; not one volume")
    normal = slice_normal(orients[0])
    keyed = sorted(zip([float(np.dot(normal, p)) for p in positions], range(frames)))
    order = [i for _, i in keyed]
    dz = _slice_spacing([k for k, _ in keyed], ds, path)
    if frames == 1:
        item = _functional_item(ds, 0, "PixelMeasuresSequence")
        if item is not None and item.get("SliceThickness"):
            dz = float(item.SliceThickness)
    row_sp, col_sp = pixel_spacing(ds, 0)
    stack = np.stack([data[i] for i in order])
    return _volume_image(stack, (col_sp, row_sp, dz), positions[order[0]],
                         (np.asarray(orients[0][:3]), np.asarray(orients[0][3:]), normal))
