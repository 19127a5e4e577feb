"""``load_image`` and ``read_image``: pixels for a record or a path, whatever the format."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path


from ..errors import ImageReadError
from ..records import ImageRecord, LoadedImage
from .dicom import (VOLUME_MODALITIES, header_info, is_dicom_file, read_enhanced, read_projection,
                    read_series, series_files_in_folder)
from .limits import check_content
from .raster import is_raster_file, read_raster
from .volumes import is_volume_file, read_volume_file, to_array


def _read_dicom_file(path: str):
    info = header_info(path)
    if info.skip_reason:
        raise ImageReadError(path, info.skip_reason)
    if info.frames > 1 and info.enhanced and info.modality in VOLUME_MODALITIES:
        return to_array(read_enhanced(path), path)
    if info.is_slice:
        # A lone MR/CT slice keeps its geometry so it is oriented like its volume's slices.
        return to_array(read_series([path]), path)
    array, spacing, _ = read_projection(path)
    return array, spacing


def _read_file(path: str):
    if os.path.isdir(path):
        files = series_files_in_folder(path)
        return to_array(read_series(files), path)
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "empty file")
    if is_dicom_file(path):
        return _read_dicom_file(path)
    if is_raster_file(path):
        return read_raster(path)
    if is_volume_file(path):
        return to_array(read_volume_file(path), path)
    if path.lower().endswith(".dcm"):
        return _read_dicom_file(path)    # gives the DICOM-specific reason
    # Unknown suffix: try Pillow, then SimpleITK, before calling it unreadable.
    for reader in (read_raster, lambda p: to_array(read_volume_file(p), p)):
        try:
            return reader(path)
        except ImageReadError:
            pass
    raise ImageReadError(path, "not a DICOM file and not a known image format")


def load_image(record: ImageRecord) -> LoadedImage:
    """Decode the pixels of ``record`` (see :mod:`subject_fingerprint.io`).

    Raises :class:`ImageReadError` naming the file and the reason for anything unreadable.
    """
    files = [str(f) for f in (record.files or (record.source,))]
    where = files[0] if len(files) == 1 else record.source
    try:
        if len(files) > 1:
            array, spacing = to_array(read_series(files), where)
        else:
            array, spacing = _read_file(files[0])
    except ImageReadError:
        raise
    except MemoryError as exc:
        raise ImageReadError(where, "image too large for memory") from exc
    except Exception as exc:  # noqa: BLE001 - any decoder error is this file's problem
        raise ImageReadError(where, f"cannot read image ({type(exc).__name__}: {exc})") from exc
    # Blank, non-finite or tiny images would all embed alike and match each other.
    array = check_content(array, where)
    return LoadedImage(array=array, spacing=tuple(float(s) for s in spacing), record=record)


def read_image(path, subject_id: str = "", modality: str = "") -> LoadedImage:
    """Read one image file, or a folder holding one DICOM series (or one image).

    ``subject_id`` and ``modality`` override what the file says (useful for raster files
    that carry no identity).
    """
    from .discovery import discover

    path = Path(path)
    try:
        if not path.exists():
            raise ImageReadError(path, "file not found")
    except OSError as exc:  # e.g. a folder on the way that may not be entered
        raise ImageReadError(path, f"cannot access ({exc.strerror or exc})") from exc
    found = discover([path], require_subject=False)
    if not found.records:
        reason = found.failures[0].reason if found.failures else (
            found.skipped[0].reason if found.skipped else "no image found")
        raise ImageReadError(path, reason)
    if len(found.records) > 1:
        listed = [f"{r.image_id} ({r.modality or '?'}, {len(r.files)} file(s))"
                  for r in found.records[:5]]
        more = f", and {len(found.records) - 5} more" if len(found.records) > 5 else ""
        kind = "DICOM series" if all(len(r.files) > 1 for r in found.records) else "images"
        raise ImageReadError(path, f"holds {len(found.records)} {kind}: {'; '.join(listed)}{more}; "
                                   "give one image file or one DICOM series folder")
    record = found.records[0]
    changes = {}
    if subject_id:
        changes["subject_id"] = subject_id
    if modality:
        changes["modality"] = modality
    return load_image(replace(record, **changes) if changes else record)
