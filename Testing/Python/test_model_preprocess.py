"""Preprocessing invariants: shape, range, intensity invariance, robustness, aspect ratio."""

import numpy as np
import pytest

from subject_fingerprint.errors import ModelMismatchError
from subject_fingerprint.preprocess import Preprocessing
from subject_fingerprint.records import ImageRecord, LoadedImage


def _loaded(array, spacing=None, name="img.png"):
    array = np.asarray(array, dtype=np.float32)
    spacing = spacing or (1.0,) * array.ndim
    return LoadedImage(array, tuple(spacing), ImageRecord(name, "s1", name))


def _phantom(shape=(48, 40), seed=0):
    """A smooth structured image plus noise: a blob and a gradient."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r2 = sum(g ** 2 for g in grids)
    return (1000 * np.exp(-4 * r2) + 200 * grids[-1] + 20 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("resize", ["pad", "stretch"])
def test_2d_shape_dtype_range(resize):
    p = Preprocessing(spatial_dims=2, size=(32, 32), resize=resize)
    out = p.apply(_loaded(_phantom((50, 70))))
    assert out.shape == (1, 32, 32)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.max() > 0.9  # the bright blob reaches the top of the range


def test_3d_shape_with_and_without_spacing():
    vol = _phantom((20, 24, 28))
    for spacing in (None, (2.0, 2.0, 2.0)):
        p = Preprocessing(spatial_dims=3, size=(16, 16, 16), spacing=spacing)
        out = p.apply(_loaded(vol, spacing=(3.0, 1.0, 1.0)))
        assert out.shape == (1, 16, 16, 16) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0


def test_invariant_to_linear_intensity_change():
    img = _phantom()
    p = Preprocessing(spatial_dims=2, size=(32, 32))
    a = p.apply(_loaded(img))
    b = p.apply(_loaded(img * 2 + 100))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_robust_to_a_few_hot_pixels():
    img = _phantom((64, 64))
    hot = img.copy()
    hot[3, 5] = hot[40, 60] = 1e7  # two saturated detector pixels
    p = Preprocessing(spatial_dims=2, size=(32, 32))
    a, b = p.apply(_loaded(img)), p.apply(_loaded(hot))
    # Without percentile clipping the whole image would be squashed to ~0.
    assert np.median(np.abs(a - b)) < 0.02
    assert b.mean() > 0.5 * a.mean()


def test_pad_keeps_aspect_ratio_and_centres():
    img = np.ones((20, 80), dtype=np.float32)
    img[:, :40] = 5.0  # not flat, so scaling is defined
    p = Preprocessing(spatial_dims=2, size=(32, 32), resize="pad")
    out = p.apply(_loaded(img))[0]
    # 20 x 80 scaled to fit 32 wide -> 8 rows of image, 12 rows of padding above and below.
    rows_with_image = np.flatnonzero(out.max(axis=1) > 0)
    assert rows_with_image.min() == 12 and rows_with_image.max() == 19
    assert np.all(out[:12] == 0) and np.all(out[20:] == 0)


def test_pad_uses_physical_spacing():
    # 40 x 40 pixels of 2 mm x 0.5 mm are 80 mm tall, 20 mm wide: tall and narrow.
    img = _phantom((40, 40))
    out = Preprocessing(spatial_dims=2, size=(32, 32)).apply(_loaded(img, spacing=(2.0, 0.5)))[0]
    cols_with_image = np.flatnonzero(out.max(axis=0) > 0)
    assert len(cols_with_image) == 8
    stretched = Preprocessing(spatial_dims=2, size=(32, 32), resize="stretch").apply(
        _loaded(img, spacing=(2.0, 0.5)))[0]
    assert np.all(stretched.max(axis=0) > 0)


def test_deterministic():
    p = Preprocessing(spatial_dims=2, size=(32, 32))
    img = _phantom()
    assert np.array_equal(p.apply(_loaded(img)), p.apply(_loaded(img)))


def test_flat_image_gives_zeros_not_nan():
    out = Preprocessing(spatial_dims=2, size=(16, 16)).apply(_loaded(np.full((10, 10), 7.0)))
    assert np.all(out == 0)


def test_wrong_dimensionality_raises():
    p2 = Preprocessing(spatial_dims=2, size=(32, 32))
    with pytest.raises(ModelMismatchError, match="3D volume"):
        p2.apply(_loaded(np.zeros((4, 8, 8)), name="vol.nii.gz"))
    p3 = Preprocessing(spatial_dims=3, size=(16, 16, 16))
    with pytest.raises(ModelMismatchError, match="2D image"):
        p3.apply(_loaded(np.zeros((8, 8))))


def test_dict_round_trip_is_json_able():
    import json

    p = Preprocessing(spatial_dims=3, size=(16, 16, 16), spacing=(1.5, 1.0, 1.0), resize="stretch")
    d = json.loads(json.dumps(p.to_dict()))
    assert Preprocessing.from_dict(d) == p


@pytest.mark.parametrize("kwargs", [
    dict(spatial_dims=2, size=(32, 32, 32)),
    dict(spatial_dims=2, size=(32, 32), spacing=(1, 1)),
    dict(spatial_dims=2, size=(32, 32), resize="crop"),
    dict(spatial_dims=2, size=(32, 32), clip_percentiles=(99, 1)),
])
def test_invalid_settings_rejected(kwargs):
    with pytest.raises(ValueError):
        Preprocessing(**kwargs)


def test_non_finite_pixels_do_not_poison_the_output():
    img = _phantom((40, 40))
    bad = img.copy()
    bad[0, :3] = [np.nan, np.inf, -np.inf]
    out = Preprocessing(spatial_dims=2, size=(32, 32)).apply(_loaded(bad))
    assert np.all(np.isfinite(out))
    ref = Preprocessing(spatial_dims=2, size=(32, 32)).apply(_loaded(img))
    assert np.median(np.abs(out - ref)) < 0.01


def test_large_image_percentiles_on_a_grid_match_the_full_image():
    from subject_fingerprint import preprocess

    rng = np.random.default_rng(1)
    big = rng.gamma(2.0, 300.0, size=(1500, 1400)).astype(np.float32)  # > 2**20 pixels
    assert preprocess._grid_sample(big).size < big.size
    full = np.percentile(big, (0.5, 99.5))
    grid = np.percentile(preprocess._grid_sample(big), (0.5, 99.5))
    np.testing.assert_allclose(grid, full, rtol=0.02)


def test_single_slice_volume_counts_as_2d():
    img = _phantom((40, 30))
    p = Preprocessing(spatial_dims=2, size=(32, 32))
    flat = p.apply(_loaded(img, spacing=(0.5, 1.0)))
    one_slice = p.apply(_loaded(img[None], spacing=(3.0, 0.5, 1.0)))
    assert np.array_equal(flat, one_slice)
