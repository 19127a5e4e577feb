"""Volume files (NIfTI, NRRD, MetaImage) and raster files (PNG, JPEG, TIFF, BMP)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from subject_fingerprint.errors import ImageReadError
from subject_fingerprint.io import read_image

RNG = np.random.default_rng(11)


def _sitk_volume(array_zyx, spacing_xyz=(1.5, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection([float(v) for v in np.asarray(direction, float).ravel()])
    return image


def test_nifti_lps_and_ras_files_give_the_same_array(tmp_path):
    vol = RNG.normal(size=(6, 7, 8)).astype(np.float32)          # (z, y, x), LPS index order
    sx, sy, sz = 1.5, 1.0, 2.0
    lps = _sitk_volume(vol, (sx, sy, sz))
    # The same voxels stored with x pointing Right and y Anterior (RAS index axes).
    ras = _sitk_volume(vol[:, ::-1, ::-1].copy(), (sx, sy, sz),
                       origin=((8 - 1) * sx, (7 - 1) * sy, 0.0), direction=np.diag([-1.0, -1.0, 1.0]))
    sitk.WriteImage(lps, str(tmp_path / "lps.nii.gz"))
    sitk.WriteImage(ras, str(tmp_path / "ras.nii.gz"))
    a, b = read_image(tmp_path / "lps.nii.gz"), read_image(tmp_path / "ras.nii.gz")
    np.testing.assert_array_equal(a.array, vol)
    np.testing.assert_array_equal(b.array, a.array)
    assert a.spacing == b.spacing == pytest.approx((sz, sy, sx))
    assert a.content_hash == b.content_hash


def test_nibabel_ras_affine_is_reoriented(tmp_path):
    nib = pytest.importorskip("nibabel")
    data = RNG.integers(0, 500, size=(8, 7, 6)).astype(np.int16)   # (i, j, k) = (R, A, S) axes
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), str(tmp_path / "ras.nii"))
    img = read_image(tmp_path / "ras.nii")
    # LPS (z, y, x): z = S = k; y = P = flipped j; x = L = flipped i.
    expected = np.transpose(data, (2, 1, 0))[:, ::-1, ::-1]
    np.testing.assert_array_equal(img.array, expected)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_nrrd_and_metaimage(tmp_path, suffix):
    vol = RNG.integers(-1000, 1000, size=(4, 5, 6)).astype(np.int16)
    sitk.WriteImage(_sitk_volume(vol), str(tmp_path / f"v{suffix}"))
    img = read_image(tmp_path / f"v{suffix}")
    np.testing.assert_array_equal(img.array, vol)
    assert img.array.dtype == np.float32 and img.spacing == pytest.approx((2.0, 1.0, 1.5))


def test_single_slice_volume_becomes_2d(tmp_path):
    plane = RNG.normal(size=(1, 9, 10)).astype(np.float32)
    sitk.WriteImage(_sitk_volume(plane), str(tmp_path / "one.nii.gz"))
    img = read_image(tmp_path / "one.nii.gz")
    assert img.array.shape == (9, 10) and img.spatial_dims == 2
    np.testing.assert_array_equal(img.array, plane[0])
    assert img.spacing == pytest.approx((1.0, 1.5))


def test_png_8_and_16_bit(tmp_path):
    grey8 = RNG.integers(0, 256, size=(20, 30)).astype(np.uint8)
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    grey16 = RNG.integers(0, 65536, size=(20, 30)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g8.png").array, grey8)
    img16 = read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(img16.array, grey16)
    assert img16.array.dtype == np.float32 and img16.spacing == (1.0, 1.0)


def test_rgb_becomes_luminance(tmp_path):
    rgb = RNG.integers(0, 256, size=(12, 14, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    for name in ("c.png", "c.bmp"):
        img = read_image(tmp_path / name)
        assert img.array.shape == (12, 14)
        np.testing.assert_allclose(img.array, expected, rtol=1e-5)


def test_jpeg_and_tiff(tmp_path):
    grey = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (24, 1))
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(grey).save(tmp_path / "g.tif")
    jpg = read_image(tmp_path / "g.jpg")
    assert jpg.array.shape == grey.shape and np.abs(jpg.array - grey).max() < 8   # lossy
    np.testing.assert_array_equal(read_image(tmp_path / "g.tif").array, grey)
    assert read_image(tmp_path / "g.jpg").record.modality == "XR"


def test_damaged_raster_and_volume_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "bad.nii.gz").write_bytes(b"not a volume at all")
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match="cannot read volume file"):
        read_image(tmp_path / "bad.nii.gz")
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.png")


def test_dicom_series_and_nifti_of_the_same_head_read_the_same(tmp_path):
    from dicom_factory import write_mr_series

    vol = RNG.integers(0, 2000, size=(5, 6, 7)).astype(np.int16)       # (z, y, x) in LPS
    # Stored with x pointing Right (direction column -1): both readers must undo it.
    direction = np.diag([-1.0, 1.0, 1.0])
    write_mr_series(tmp_path / "series", vol[:, :, ::-1].copy(), spacing=(3.0, 0.8, 0.9),
                    direction=direction, origin=(6 * 0.9, 0.0, 0.0))
    sitk.WriteImage(_sitk_volume(vol[:, :, ::-1].copy(), (0.9, 0.8, 3.0), origin=(6 * 0.9, 0.0, 0.0),
                                 direction=direction), str(tmp_path / "head.nii.gz"))
    from_dicom, from_nifti = read_image(tmp_path / "series"), read_image(tmp_path / "head.nii.gz")
    np.testing.assert_array_equal(from_dicom.array, vol)
    np.testing.assert_array_equal(from_nifti.array, vol)
    assert from_dicom.spacing == pytest.approx((3.0, 0.8, 0.9))
    assert from_nifti.spacing == pytest.approx((3.0, 0.8, 0.9))
    assert from_dicom.content_hash == from_nifti.content_hash
