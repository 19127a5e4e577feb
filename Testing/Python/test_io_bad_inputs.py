"""Bad inputs are refused with a reason before they cost memory or make a false match: blank
and tiny images, truncated compressed volumes, headers that declare more than the limit (or
more than the file holds), folders the walk cannot enter, sources that cannot be accessed.

Oversized files are crafted headers (a few hundred bytes), never allocations.
"""

from __future__ import annotations

import gzip
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from dicom_factory import write_xray
from subject_fingerprint.errors import ImageReadError
from subject_fingerprint.io import discover, read_image

RNG = np.random.default_rng(5)


def _nifti(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array)), str(path))
    return path


def _nifti_header(dims, bitpix=8, datatype=2, vox_offset=352.0) -> bytes:
    """A NIfTI-1 header (348 bytes + 4-byte extension flag) declaring ``dims``, no voxels."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    dim = [len(dims)] + list(dims) + [1] * (7 - len(dims))
    struct.pack_into("<8h", hdr, 40, *dim)
    struct.pack_into("<hh", hdr, 70, datatype, bitpix)
    struct.pack_into("<8f", hdr, 76, *([1.0] * 8))
    struct.pack_into("<f", hdr, 108, vox_offset)
    hdr[344:348] = b"n+1\x00"
    return bytes(hdr) + b"\x00" * 4


# -- blank, non-finite, tiny ------------------------------------------------------------------

@pytest.mark.parametrize("fill", [np.nan, np.inf, 7.0])
def test_non_finite_and_constant_nifti_refused(tmp_path, fill):
    path = _nifti(tmp_path / "v.nii.gz", np.full((6, 8, 8), fill, np.float32))
    with pytest.raises(ImageReadError, match="blank image"):
        read_image(path)


def test_one_voxel_nifti_and_one_pixel_png_refused(tmp_path):
    with pytest.raises(ImageReadError, match="too small"):
        read_image(_nifti(tmp_path / "one.nii.gz", np.array([[[5.0]]], np.float32)))
    Image.fromarray(np.array([[200]], np.uint8)).save(tmp_path / "one.png")
    with pytest.raises(ImageReadError, match="too small"):
        read_image(tmp_path / "one.png")


@pytest.mark.parametrize("value", [0, 255])
def test_constant_png_refused(tmp_path, value):
    Image.fromarray(np.full((32, 32), value, np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(ImageReadError, match=f"every pixel has the value {value}"):
        read_image(tmp_path / "c.png")


def test_dx_with_nan_rescale_slope_refused(tmp_path):
    path = write_xray(tmp_path / "nan.dcm", RNG.integers(0, 4000, (16, 16)).astype(np.uint16),
                      rescale=(float("nan"), 0.0))
    with pytest.raises(ImageReadError, match="no pixel has a finite value"):
        read_image(path)


def test_a_few_nan_voxels_in_a_real_image_are_kept(tmp_path):
    vol = RNG.normal(size=(6, 8, 8)).astype(np.float32)
    vol[0, 0, :3] = np.nan
    img = read_image(_nifti(tmp_path / "v.nii.gz", vol))  # the image is kept, not refused
    from subject_fingerprint.preprocess import Preprocessing

    assert np.isfinite(Preprocessing(spatial_dims=3, size=(8, 8, 8)).apply(img)).all()


def test_blank_images_are_failures_in_a_batch_not_matches(tmp_path):
    for k in range(3):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / f"blank{k}.png")
    Image.fromarray(RNG.integers(0, 255, (32, 32)).astype(np.uint8)).save(tmp_path / "real.png")
    from subject_fingerprint.io import load_image

    found = discover(tmp_path)
    outcomes = {}
    for record in found.records:
        try:
            load_image(record)
            outcomes[Path(record.source).name] = "ok"
        except ImageReadError as exc:
            outcomes[Path(record.source).name] = exc.reason
    assert outcomes["real.png"] == "ok"
    assert all("blank image" in outcomes[f"blank{k}.png"] for k in range(3))


# -- truncated compressed volumes -----------------------------------------------------------

def test_gzipped_nifti_cut_in_half_refused(tmp_path):
    path = _nifti(tmp_path / "v.nii.gz", RNG.normal(size=(20, 32, 32)).astype(np.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


def test_uncompressed_nifti_shorter_than_its_header_says_refused(tmp_path):
    path = tmp_path / "short.nii"
    path.write_bytes(_nifti_header((100, 100, 100)) + b"\x01" * 1000)
    with pytest.raises(ImageReadError, match="truncated file: header declares 1,000,000 bytes"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_truncated_compressed_mha_and_nrrd_refused(tmp_path, suffix):
    path = tmp_path / f"v{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(RNG.normal(size=(10, 40, 40)).astype(np.float32)),
                    str(path), useCompression=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match="truncated|damaged compressed"):
        read_image(path)


def test_intact_compressed_mha_and_nrrd_still_read(tmp_path):
    vol = RNG.integers(0, 1000, size=(5, 9, 11)).astype(np.int16)
    for suffix in (".mha", ".nrrd", ".nii.gz"):
        path = tmp_path / f"v{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(vol), str(path), useCompression=True)
        np.testing.assert_array_equal(read_image(path).array, vol)


# -- declared sizes checked before allocating ------------------------------------------------

def _timed_refusal(path, match):
    started = time.perf_counter()
    with pytest.raises(ImageReadError, match=match):
        read_image(path)
    assert time.perf_counter() - started < 2.0


def test_nifti_declaring_30000_squared_refused_from_its_header(tmp_path):
    path = tmp_path / "huge.nii"
    path.write_bytes(_nifti_header((30000, 30000, 1)))
    _timed_refusal(path, "over the limit")
    gz = tmp_path / "huge.nii.gz"
    gz.write_bytes(gzip.compress(_nifti_header((30000, 30000, 1))))
    _timed_refusal(gz, "over the limit")


def test_mha_zlib_bomb_refused_from_its_header(tmp_path):
    # 20000 x 20000 zeros would compress to ~400 KB; the header alone is enough to refuse it.
    body = zlib.compress(b"\x00" * (1 << 16))
    header = ("ObjectType = Image\nNDims = 2\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = True\nCompressedDataSize = {len(body)}\nDimSize = 20000 20000\n"
              "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n").encode()
    path = tmp_path / "bomb.mha"
    path.write_bytes(header + body)
    _timed_refusal(path, "over the limit")


def test_nrrd_declaring_more_than_the_file_holds_refused(tmp_path):
    path = tmp_path / "short.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 64 64 64\nencoding: raw\n"
                     b"endian: little\n\n" + b"\x00" * 100)
    _timed_refusal(path, "truncated file")
    big = tmp_path / "big.nrrd"
    big.write_bytes(b"NRRD0004\ntype: float\ndimension: 2\nsizes: 30000 30000\nencoding: gzip\n\n"
                    + gzip.compress(b"\x00" * 1000))
    _timed_refusal(big, "over the limit")


@pytest.mark.parametrize("kind", ["dicom", "png", "nifti"])
def test_every_reader_applies_the_voxel_limit(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("SUBJECT_FINGERPRINT_MAX_VOXELS", "100")
    pixels = RNG.integers(0, 200, (16, 16)).astype(np.uint8)
    if kind == "dicom":
        path = write_xray(tmp_path / "x.dcm", pixels.astype(np.uint16))
    elif kind == "png":
        path = tmp_path / "x.png"
        Image.fromarray(pixels).save(path)
    else:
        path = _nifti(tmp_path / "x.nii.gz", pixels[None].repeat(4, 0))
    _timed_refusal(path, "over the limit of 100")


# -- the folder walk and sources that cannot be accessed --------------------------------------

def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (16, 16)).astype(np.uint8)).save(path)
    return path


def test_walk_lists_a_folder_it_cannot_enter(tmp_path, monkeypatch):
    _png(tmp_path / "s1" / "a.png")
    locked = tmp_path / "s2" / "locked"
    _png(locked / "b.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = discover(tmp_path)
    assert [Path(r.source).name for r in found.records] == ["a.png"]
    assert len(found.failures) == 1 and found.failures[0].path == str(locked)
    assert "Permission denied" in found.failures[0].reason


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root enters any folder")
def test_walk_lists_an_unreadable_folder_for_real(tmp_path):
    _png(tmp_path / "s1" / "a.png")
    _png(tmp_path / "s2" / "b.png")
    os.chmod(tmp_path / "s2", 0)
    try:
        found = discover(tmp_path)
    finally:
        os.chmod(tmp_path / "s2", 0o755)
    assert len(found.records) == 1 and len(found.failures) == 1


@pytest.mark.skipif(os.name != "posix", reason="PATH_MAX nesting is a POSIX trial")
def test_walk_lists_folders_nested_beyond_the_path_limit(tmp_path):
    _png(tmp_path / "s1" / "a.png")
    # Build the chain with relative mkdir/chdir so no call needs the full path.
    name, depth = "d" * 200, 24   # 24 x 201 > 4096 = PATH_MAX
    here = os.getcwd()
    try:
        os.mkdir(tmp_path / "deep")
        os.chdir(tmp_path / "deep")
        for _ in range(depth):
            os.mkdir(name)
            os.chdir(name)
        Image.fromarray(RNG.integers(0, 255, (16, 16)).astype(np.uint8)).save("lost.png")
    finally:
        os.chdir(here)
    found = discover(tmp_path)
    assert [Path(r.source).name for r in found.records] == ["a.png"]
    assert len(found.failures) == 1 and "cannot read folder" in found.failures[0].reason


def test_a_source_in_a_folder_that_cannot_be_entered_is_one_failure(tmp_path, monkeypatch):
    good = _png(tmp_path / "ok" / "a.png")
    hidden = tmp_path / "closed" / "b.png"
    real_exists = Path.exists

    def exists(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "closed")):
            raise PermissionError(13, "Permission denied", str(self))
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    found = discover([hidden, good])
    assert [r.source for r in found.records] == [str(good)]
    assert found.failures[0].path == str(hidden) and "Permission denied" in found.failures[0].reason
    with pytest.raises(ImageReadError, match="cannot access"):
        read_image(hidden)


def test_manifest_reaching_outside_its_folder_gives_one_notice(tmp_path):
    outside = _png(tmp_path / "elsewhere" / "x.png")
    other = _png(tmp_path / "elsewhere" / "y.png")
    inside = _png(tmp_path / "data" / "z.png")
    (tmp_path / "data" / "manifest.csv").write_text(
        f"subject_id,image_path\ns1,../elsewhere/x.png\ns2,{other}\ns3,z.png\n")
    found = discover(tmp_path / "data")
    assert len(found.records) == 3 and inside
    assert len(found.notices) == 1
    assert "2 listed image(s) lie outside" in found.notices[0] and str(outside) in found.notices[0]
    (tmp_path / "data" / "manifest.csv").write_text("subject_id,image_path\ns3,z.png\n")
    assert discover(tmp_path / "data").notices == []
