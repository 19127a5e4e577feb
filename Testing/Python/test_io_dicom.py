"""DICOM readers: X-ray intensity pipeline, series order and geometry, compression, errors."""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicom_factory import (write_dicomdir, write_enhanced_mr, write_mr_series, write_non_image,
                           write_xray)
from subject_fingerprint.errors import ImageReadError
from subject_fingerprint.io import load_image, read_image
from subject_fingerprint.io.discovery import discover

RNG = np.random.default_rng(7)


def _ramp(bits=12, shape=(32, 40)):
    return RNG.integers(0, 1 << bits, size=shape)


def test_plain_16bit_and_spacing(tmp_path):
    px = _ramp(16)
    img = read_image(write_xray(tmp_path / "a.dcm", px, bits=16, pixel_spacing=(0.15, 0.25)))
    assert img.array.dtype == np.float32 and img.array.shape == px.shape
    np.testing.assert_array_equal(img.array, px.astype(np.float32))
    assert img.spacing == (0.15, 0.25)
    assert img.record.modality == "DX" and img.record.view == "PA"


def test_8bit(tmp_path):
    px = RNG.integers(0, 256, size=(20, 30))
    img = read_image(write_xray(tmp_path / "a.dcm", px, bits=8, modality="CR"))
    np.testing.assert_array_equal(img.array, px)


def test_rescale_slope_intercept(tmp_path):
    px = _ramp(12)
    img = read_image(write_xray(tmp_path / "a.dcm", px, bits=12, rescale=(0.5, -100.0)))
    np.testing.assert_allclose(img.array, px * 0.5 - 100.0)


def test_signed_pixels_with_rescale(tmp_path):
    px = RNG.integers(-2000, 2000, size=(24, 24))
    img = read_image(write_xray(tmp_path / "a.dcm", px, bits=16, signed=True, rescale=(2.0, 10.0)))
    np.testing.assert_allclose(img.array, px * 2.0 + 10.0)
    assert img.array.min() < 0


def test_window_applies_dicom_linear_voi(tmp_path):
    px = np.tile(np.arange(0, 4096, 16), (4, 1))   # 0..4080
    center, width = 2048.0, 1024.0
    img = read_image(write_xray(tmp_path / "a.dcm", px, bits=12, window=(center, width)))
    # DICOM PS3.3 C.11.2.1.2 linear window onto the 12-bit output range 0..4095.
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    expected = np.where(px <= lo, 0.0, np.where(
        px > hi, 4095.0, ((px - (center - 0.5)) / (width - 1) + 0.5) * 4095.0))
    np.testing.assert_allclose(img.array, expected, atol=1e-3)


def test_voi_lut_sequence(tmp_path):
    px = RNG.integers(0, 256, size=(16, 16))
    lut = [(255 - v) * 3 for v in range(256)]
    img = read_image(write_xray(tmp_path / "a.dcm", px, bits=8, voi_lut=lut))
    np.testing.assert_array_equal(img.array, np.asarray(lut)[px])


def test_monochrome1_is_inverted_so_bone_is_bright(tmp_path):
    px = RNG.integers(100, 3000, size=(32, 32))
    px[8:16, 8:16] = 50          # "bone": low stored values in MONOCHROME1 (displayed white)
    m1 = read_image(write_xray(tmp_path / "m1.dcm", px, photometric="MONOCHROME1", bits=12))
    flipped = px.max() + px.min() - px
    m2 = read_image(write_xray(tmp_path / "m2.dcm", flipped, photometric="MONOCHROME2", bits=12))
    np.testing.assert_array_equal(m1.array, m2.array)
    assert m1.array[10, 10] == m1.array.max()
    assert m1.content_hash == m2.content_hash


def test_multiframe_with_one_frame_is_2d(tmp_path):
    px = _ramp(12)
    single = read_image(write_xray(tmp_path / "s.dcm", px, bits=12))
    multi = read_image(write_xray(tmp_path / "m.dcm", px, bits=12, multiframe=True))
    assert multi.array.ndim == 2
    np.testing.assert_array_equal(single.array, multi.array)


def test_rle_compressed_decodes_to_same_pixels(tmp_path):
    px = _ramp(12)
    plain = read_image(write_xray(tmp_path / "p.dcm", px, bits=12))
    rle = read_image(write_xray(tmp_path / "r.dcm", px, bits=12, transfer_syntax=RLELossless))
    assert pydicom.dcmread(tmp_path / "r.dcm").file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(plain.array, rle.array)
    assert plain.content_hash == rle.content_hash


def test_jpeg2000_lossless_decodes(tmp_path):
    px = _ramp(12)
    try:
        path = write_xray(tmp_path / "j.dcm", px, bits=12, transfer_syntax=JPEG2000Lossless)
    except Exception as exc:  # noqa: BLE001 - encoder plugin absent here
        pytest.skip(f"no JPEG 2000 encoder installed ({exc})")
    np.testing.assert_array_equal(read_image(path).array, px)


def test_jpeg_baseline_decodes_with_installed_plugin(tmp_path):
    from pydicom.uid import JPEGBaseline8Bit

    from subject_fingerprint.io.dicom import decoder_status

    if decoder_status(JPEGBaseline8Bit) != "ok":
        pytest.skip("no JPEG baseline decoder plugin (pylibjpeg-libjpeg) installed")
    px = np.kron(RNG.integers(0, 256, (4, 4)), np.ones((8, 8))).astype(np.uint8)
    path = write_xray(tmp_path / "j.dcm", px, bits=8, transfer_syntax=JPEGBaseline8Bit)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    img = read_image(path)
    assert img.array.shape == px.shape
    assert np.abs(img.array - px).mean() < 3        # lossy, but the same picture


def test_unsupported_transfer_syntax_names_it(tmp_path):
    path = write_xray(tmp_path / "a.dcm", _ramp(12), bits=12)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"     # MPEG2 video
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "transfer syntax" in err.value.reason and "MPEG2" in err.value.reason
    assert str(path) in str(err.value)


def test_damaged_compressed_pixels_name_the_transfer_syntax(tmp_path):
    path = write_xray(tmp_path / "a.dcm", _ramp(12), bits=12, transfer_syntax=RLELossless)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\x01" * 70])     # not a valid RLE frame
    ds.save_as(path)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert "RLE Lossless" in err.value.reason and err.value.path == str(path)


@pytest.mark.parametrize("kind, expected", [
    ("empty", "empty file"), ("random", "not a DICOM file"), ("truncated", "truncated"),
    ("sr", "not an image"), ("header_only", "truncated")])
def test_clear_errors(tmp_path, kind, expected):
    good = write_xray(tmp_path / "good.dcm", _ramp(12), bits=12)
    data = good.read_bytes()
    path = tmp_path / f"{kind}.dcm"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(os.urandom(2000))
    elif kind == "truncated":
        path.write_bytes(data[:-1000])
    elif kind == "header_only":
        path.write_bytes(data[:200])
    else:
        write_non_image(path, "SR")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert expected in err.value.reason
    assert err.value.path == str(path)


def test_mr_series_shuffled_files_read_in_position_order(tmp_path):
    vol = RNG.integers(-500, 3000, size=(7, 12, 10)).astype(np.int16)
    files = write_mr_series(tmp_path / "series", vol, patient_id="P9", spacing=(2.5, 0.8, 0.9),
                            origin=(-10.0, 20.0, 30.0), shuffled=True, seed=3)
    # The file names/InstanceNumbers must not follow the slice order, or the test proves nothing.
    assert [f.name for f in files] != sorted(f.name for f in files)
    img = read_image(tmp_path / "series")
    np.testing.assert_array_equal(img.array, vol)
    assert img.spacing == pytest.approx((2.5, 0.8, 0.9))
    found = discover([tmp_path / "series"])
    (record,) = found.records
    assert record.subject_id == "P9" and len(record.files) == 7
    assert list(record.files) == [str(f) for f in files]
    np.testing.assert_array_equal(load_image(record).array, vol)


def test_mr_series_rescale_per_slice(tmp_path):
    vol = RNG.integers(0, 1000, size=(4, 8, 8))
    write_mr_series(tmp_path / "s", vol, bits=16, signed=False, rescale=(0.25, -5.0))
    np.testing.assert_allclose(read_image(tmp_path / "s").array, vol * 0.25 - 5.0)


def test_series_in_ras_index_order_is_reoriented_to_lps(tmp_path):
    vol = RNG.integers(0, 1000, size=(6, 8, 9)).astype(np.int16)
    spacing = (2.0, 1.0, 1.5)
    write_mr_series(tmp_path / "lps", vol, spacing=spacing)
    # Same voxels stored with x pointing Right, y Anterior and z Inferior: flip every axis.
    ras_dir = np.diag([-1.0, -1.0, -1.0])
    origin = ((9 - 1) * 1.5, (8 - 1) * 1.0, (6 - 1) * 2.0)
    write_mr_series(tmp_path / "flipped", vol[::-1, ::-1, ::-1], spacing=spacing,
                    direction=ras_dir, origin=origin)
    a, b = read_image(tmp_path / "lps"), read_image(tmp_path / "flipped")
    np.testing.assert_array_equal(a.array, vol)
    np.testing.assert_array_equal(b.array, a.array)
    assert b.spacing == pytest.approx(spacing)


def test_sagittal_series_is_permuted_to_lps(tmp_path):
    # Sagittal slices: columns run Posterior (y), rows run Inferior (-z), slices run Left (x).
    vol = RNG.integers(0, 1000, size=(5, 6, 7)).astype(np.int16)   # (slices, rows, cols)
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # columns: x, y, z axes
    write_mr_series(tmp_path / "sag", vol, spacing=(3.0, 1.0, 2.0), direction=direction,
                    origin=(0.0, 0.0, 5.0))
    img = read_image(tmp_path / "sag")
    # LPS (z, y, x): z = Superior = -rows, y = Posterior = cols, x = Left = slices.
    expected = np.transpose(vol, (1, 2, 0))[::-1]
    np.testing.assert_array_equal(img.array, expected)
    assert img.spacing == pytest.approx((1.0, 2.0, 3.0))


def test_enhanced_multiframe_mr_is_a_volume(tmp_path):
    vol = RNG.integers(-100, 2000, size=(6, 10, 11)).astype(np.int16)
    path = write_enhanced_mr(tmp_path / "enh.dcm", vol, spacing=(4.0, 1.0, 1.0),
                             shuffled=True, rescale=(2.0, 1.0))
    img = read_image(path)
    np.testing.assert_allclose(img.array, vol * 2.0 + 1.0)
    assert img.spacing == pytest.approx((4.0, 1.0, 1.0))
    (record,) = discover([path]).records
    assert record.image_id == str(pydicom.dcmread(path).SeriesInstanceUID)


def test_multiframe_xray_with_many_frames_is_refused(tmp_path):
    path = write_xray(tmp_path / "cine.dcm", _ramp(12), bits=12)
    ds = pydicom.dcmread(path)
    frames = np.stack([_ramp(12)] * 3).astype(np.uint16)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.tobytes()
    ds.save_as(path)
    found = discover([path])
    assert not found.records and "3 frames" in found.failures[0].reason
    with pytest.raises(ImageReadError, match="3 frames"):
        read_image(path)


def test_dicomdir_alone_is_not_an_image(tmp_path):
    path = write_dicomdir(tmp_path / "DICOMDIR")
    with pytest.raises(ImageReadError, match="DICOMDIR"):
        read_image(path)


def test_preamble_less_implicit_vr_file(tmp_path):
    px = _ramp(12, (8, 8))
    ds = pydicom.dcmread(write_xray(tmp_path / "a.dcm", px, bits=12))
    del ds.file_meta
    ds.preamble = None
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(tmp_path / "old", implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:  # pydicom 2.x (Slicer 5.8/5.10)
        ds.is_implicit_VR, ds.is_little_endian = True, True
        ds.save_as(tmp_path / "old", write_like_original=True)
    assert (tmp_path / "old").read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(read_image(tmp_path / "old").array, px)


def test_missing_patient_id_is_a_failure_but_still_reads_as_a_query(tmp_path):
    px = _ramp(12, (8, 8))
    path = write_xray(tmp_path / "DICOM" / "IM1", px, patient_id="", bits=12)
    found = discover([tmp_path])
    assert not found.records
    assert [f.path for f in found.failures] == [str(path)]
    assert "no PatientID" in found.failures[0].reason
    # A query image needs no subject.
    np.testing.assert_array_equal(read_image(path).array, px)


def test_per_slice_acquisition_numbers_do_not_split_a_volume(tmp_path):
    vol = RNG.integers(0, 1000, size=(5, 8, 8)).astype(np.int16)
    files = write_mr_series(tmp_path / "s", vol, spacing=(2.5, 1, 1))
    for k, f in enumerate(files):          # some scanners number each slice's acquisition
        ds = pydicom.dcmread(f)
        ds.AcquisitionNumber = k + 1
        ds.save_as(f)
    (record,) = discover([tmp_path]).records
    img = load_image(record)
    np.testing.assert_array_equal(img.array, vol)
    assert img.spacing == pytest.approx((2.5, 1.0, 1.0))


def test_two_echoes_in_one_series_become_two_volumes_and_localizers_are_skipped(tmp_path):
    uid = pydicom.uid.generate_uid()
    echo1 = RNG.integers(0, 1000, size=(4, 8, 8)).astype(np.int16)
    echo2 = RNG.integers(0, 1000, size=(4, 8, 8)).astype(np.int16)
    files1 = write_mr_series(tmp_path / "s", echo1, series_uid=uid, names="E1_{:03d}")
    files2 = write_mr_series(tmp_path / "s", echo2, series_uid=uid, names="E2_{:03d}", seed=1)
    for echo, files in ((1, files1), (2, files2)):
        for f in files:
            ds = pydicom.dcmread(f)
            ds.EchoNumbers = echo
            ds.save_as(f)
    scout = write_mr_series(tmp_path / "s", echo1[:1], series_uid=uid, names="LOC{:03d}")[0]
    ds = pydicom.dcmread(scout)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(scout)
    found = discover([tmp_path])
    assert sorted(r.image_id for r in found.records) == sorted([uid, f"{uid}#2"])
    volumes = sorted((load_image(r).array for r in found.records), key=lambda a: float(a.sum()))
    expected = sorted((echo1, echo2), key=lambda a: float(a.sum()))
    for got, want in zip(volumes, expected):
        np.testing.assert_array_equal(got, want)
    assert [s.path for s in found.skipped] == [str(scout)]


def test_rgb_secondary_capture_becomes_luminance(tmp_path):
    path = write_xray(tmp_path / "sc.dcm", _ramp(8, (6, 7)), bits=8, modality="OT")
    rgb = RNG.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(path)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(read_image(path).array, expected, rtol=1e-5)
