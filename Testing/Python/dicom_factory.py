"""Synthetic DICOM files for tests: X-rays (CR/DX), MR/CT series, enhanced multi-frame MR,
non-image objects (SR, KO, presentation state) and a DICOMDIR.

Everything is built with pydicom in memory and written where the test says (tmp_path).
Pixels are given as the *stored* values; the writer sets the tags that tell a reader how to
turn them into what should be displayed (rescale, window, photometric interpretation).

    from dicom_factory import write_xray, write_mr_series
    write_xray(tmp_path / "a.dcm", pixels, patient_id="P1", photometric="MONOCHROME1")
    files = write_mr_series(tmp_path / "series", volume, patient_id="P2", spacing=(3, 1, 1))
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit,
                         PYDICOM_IMPLEMENTATION_UID, RLELossless, generate_uid)

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

_SOP_FOR_MODALITY = {"CR": CR_STORAGE, "DX": DX_STORAGE, "DR": DX_STORAGE, "MR": MR_STORAGE,
                     "CT": CT_STORAGE}


def _base(sop_class: str, sop_uid: Optional[str], patient_id: str, modality: str,
          study_uid: Optional[str] = None, series_uid: Optional[str] = None,
          transfer_syntax=ExplicitVRLittleEndian) -> Dataset:
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 1
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, bits: int, signed: bool, photometric: str):
    bits_allocated = 8 if bits <= 8 else 16
    dtype = {(8, False): np.uint8, (8, True): np.int8,
             (16, False): np.uint16, (16, True): np.int16}[(bits_allocated, signed)]
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    pixels = np.asarray(pixels)
    if pixels.min() < lo or pixels.max() > hi:
        raise ValueError(f"pixels {pixels.min()}..{pixels.max()} do not fit {bits}-bit "
                         f"{'signed' if signed else 'unsigned'}")
    data = pixels.astype(dtype)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = data.shape[-2:]
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = data.tobytes()
    return data


def _save(ds: Dataset, path, transfer_syntax) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax == JPEGBaseline8Bit:
        # No JPEG encoder ships with pydicom's plugins: encode with Pillow and encapsulate.
        import io

        from PIL import Image

        if ds.BitsAllocated != 8 or ds.SamplesPerPixel != 1 or "NumberOfFrames" in ds:
            raise ValueError("JPEG baseline here supports single-frame 8-bit grey only")
        pixels = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.LossyImageCompression = "01"
    else:
        # pydicom encodes RLE itself; JPEG 2000 / JPEG-LS need pylibjpeg-openjpeg / pyjpegls.
        ds.compress(transfer_syntax)
    _save_file(ds, path)
    return path


def write_xray(path, pixels, patient_id: str = "P1", photometric: str = "MONOCHROME2",
               bits: int = 16, signed: bool = False, rescale: Optional[Tuple[float, float]] = None,
               window: Optional[Tuple[float, float]] = None,
               voi_lut: Optional[Sequence[int]] = None,
               pixel_spacing: Optional[Tuple[float, float]] = (0.2, 0.2), modality: str = "DX",
               view: str = "PA", sop_uid: Optional[str] = None, series_uid: Optional[str] = None,
               study_uid: Optional[str] = None, transfer_syntax=ExplicitVRLittleEndian,
               multiframe: bool = False, bits_stored: Optional[int] = None) -> Path:
    """Write a single-frame projection X-ray; ``pixels`` are stored values (rows, cols).

    ``bits`` (or its alias ``bits_stored``) is BitsStored: 8 gives 8-bit storage, anything
    else 16-bit words with that many bits used.

    ``transfer_syntax``: uncompressed (default), ``RLELossless`` (pydicom's encoder),
    ``JPEG2000Lossless`` (needs pylibjpeg-openjpeg) or ``JPEGBaseline8Bit`` (8-bit only,
    encoded with Pillow).

    ``rescale=(slope, intercept)``, ``window=(center, width)``; ``voi_lut`` a list of output
    values for stored values 0..len-1; ``multiframe`` writes NumberOfFrames = 1.
    """
    if bits_stored is not None:
        bits = int(bits_stored)
    sop_class = _SOP_FOR_MODALITY.get(modality, DX_STORAGE)
    ds = _base(sop_class, sop_uid, patient_id, modality, study_uid, series_uid)
    if view:
        ds.ViewPosition = view
    _set_pixels(ds, pixels, bits, signed, photometric)
    if multiframe:
        ds.NumberOfFrames = 1
    if pixel_spacing is not None:
        attr = "PixelSpacing" if modality == "CR" else "ImagerPixelSpacing"
        setattr(ds, attr, [float(v) for v in pixel_spacing])
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = float(rescale[0]), float(rescale[1])
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = float(window[0]), float(window[1])
    if voi_lut is not None:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut), 0, 16]
        # LUT Data is US or OW; write OW bytes so explicit-VR files stay unambiguous.
        item.add_new(0x00283006, "OW", np.asarray(voi_lut, dtype=np.uint16).tobytes())
        ds.VOILUTSequence = DicomSequence([item])
    return _save(ds, path, transfer_syntax)


def _direction_columns(direction) -> np.ndarray:
    """3x3 matrix whose columns are the x (column), y (row) and z (slice) axis directions."""
    if direction is None:
        return np.eye(3)
    d = np.asarray(direction, float)
    return d.reshape(3, 3)


def write_mr_series(folder, volume, patient_id: str = "P1", spacing=(1.0, 1.0, 1.0),
                    direction=None, origin=(0.0, 0.0, 0.0), shuffled: bool = True,
                    modality: str = "MR", series_uid: Optional[str] = None,
                    study_uid: Optional[str] = None, rescale: Optional[Tuple[float, float]] = None,
                    bits: int = 16, signed: bool = True, names: str = "IM{:04d}",
                    transfer_syntax=ExplicitVRLittleEndian, seed: int = 0) -> List[Path]:
    """Write a (z, y, x) ``volume`` as one single-frame file per slice.

    ``spacing`` is (slice, row, col) mm, like ``LoadedImage.spacing``; ``direction`` is the
    SimpleITK-style 3x3 (row-major, columns = x, y, z axis directions in LPS world);
    ``origin`` the LPS position of voxel (0, 0, 0). With ``shuffled`` the files are named
    and InstanceNumber'd in a random order so only ImagePositionPatient tells the order.
    Returns the written paths in slice order.
    """
    folder = Path(folder)
    volume = np.asarray(volume)
    d = _direction_columns(direction)
    col_dir, row_dir, slice_dir = d[:, 0], d[:, 1], d[:, 2]
    dz, dy, dx = (float(s) for s in spacing)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    order = list(range(volume.shape[0]))
    if shuffled:
        random.Random(seed).shuffle(order)
    paths: List[Optional[Path]] = [None] * volume.shape[0]
    for number, k in enumerate(order):
        ds = _base(_SOP_FOR_MODALITY.get(modality, MR_STORAGE), None, patient_id, modality,
                   study_uid, series_uid)
        _set_pixels(ds, volume[k], bits, signed, "MONOCHROME2")
        ds.ImageOrientationPatient = [float(v) for v in (*col_dir, *row_dir)]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + k * dz * slice_dir]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        ds.InstanceNumber = number + 1
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = float(rescale[0]), float(rescale[1])
        paths[k] = _save(ds, folder / names.format(number), transfer_syntax)
    return paths


def write_enhanced_mr(path, volume, patient_id: str = "P1", spacing=(1.0, 1.0, 1.0),
                      direction=None, origin=(0.0, 0.0, 0.0), shuffled: bool = True,
                      rescale: Tuple[float, float] = (1.0, 0.0), seed: int = 0) -> Path:
    """Write a (z, y, x) ``volume`` as one enhanced MR multi-frame file (functional groups)."""
    volume = np.asarray(volume)
    d = _direction_columns(direction)
    col_dir, row_dir, slice_dir = d[:, 0], d[:, 1], d[:, 2]
    dz, dy, dx = (float(s) for s in spacing)
    order = list(range(volume.shape[0]))
    if shuffled:
        random.Random(seed).shuffle(order)
    ds = _base(ENHANCED_MR_STORAGE, None, patient_id, "MR")
    _set_pixels(ds, volume[order], 16, True, "MONOCHROME2")
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    plane = Dataset()
    plane.ImageOrientationPatient = [float(v) for v in (*col_dir, *row_dir)]
    measures = Dataset()
    measures.PixelSpacing = [dy, dx]
    measures.SliceThickness = dz
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = float(rescale[0]), float(rescale[1])
    transform.RescaleType = "US"
    shared.PlaneOrientationSequence = DicomSequence([plane])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in order:
        item, where = Dataset(), Dataset()
        where.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + k * dz * slice_dir]
        item.PlanePositionSequence = DicomSequence([where])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    return _save(ds, path, ExplicitVRLittleEndian)


def write_non_image(path, kind: str = "SR", patient_id: str = "P1") -> Path:
    """Write a pixel-less object: ``kind`` "SR" (basic text SR), "KO" or "PR"."""
    sop_class, modality = {"SR": (BASIC_TEXT_SR, "SR"), "KO": (KEY_OBJECT_SELECTION, "KO"),
                           "PR": (GRAYSCALE_PR, "PR")}[kind]
    ds = _base(sop_class, None, patient_id, modality)
    if kind in ("SR", "KO"):
        ds.ValueType = "CONTAINER"
        concept = Dataset()
        concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Report"
        ds.ConceptNameCodeSequence = DicomSequence([concept])
        ds.ContinuityOfContent = "SEPARATE"
    else:
        ds.PresentationLUTShape = "IDENTITY"
    return _save(ds, path, ExplicitVRLittleEndian)


def write_sr(path, patient_id: str = "P1") -> Path:
    """Write a basic text structured report (a DICOM object without pixels)."""
    return write_non_image(path, "SR", patient_id=patient_id)


def write_dicomdir(path) -> Path:
    """Write a minimal DICOMDIR (Media Storage Directory) index with no records."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MEDIA_STORAGE_DIRECTORY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "TEST"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = DicomSequence([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_file(ds, path)
    return path


__all__ = ["write_xray", "write_mr_series", "write_enhanced_mr", "write_non_image", "write_sr",
           "write_dicomdir", "RLELossless", "JPEGBaseline8Bit", "ExplicitVRLittleEndian", "ImplicitVRLittleEndian"]


def _save_file(ds, path) -> None:
    """Write with file meta and preamble (pydicom 3: enforce_file_format, 2.x: write_like_original)."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        syntax = ds.file_meta.TransferSyntaxUID
        ds.is_little_endian, ds.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
        ds.save_as(path, write_like_original=False)
