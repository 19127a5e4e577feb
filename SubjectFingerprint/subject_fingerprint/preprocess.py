"""Image preprocessing that is part of a model: resampling, resizing and intensity scaling.

A ``Preprocessing`` is stored in every checkpoint, and the same object prepares images for
training, indexing and querying, so an image is always seen the same way by the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelMismatchError


def _describe(loaded) -> str:
    record = getattr(loaded, "record", None)
    return getattr(record, "source", None) or "the image"


@dataclass(frozen=True)
class Preprocessing:
    """How a ``LoadedImage`` becomes a network input of shape ``(1, *size)``.

    Steps, in order (deterministic, no randomness):

    1. Non-finite pixels (NaN, inf) become the lowest finite value.
    2. 3D only, when ``spacing`` is set: resample to that voxel spacing (mm, z y x).
    3. Scale intensities: clip to the image's own ``clip_percentiles`` and map to [0, 1],
       so window/level, bit depth and scanner gain do not matter, and a few hot pixels
       cannot squash the rest of the image. Percentiles of images over about a million
       pixels are taken on a regular grid of about a million of them (same answer to
       within a fraction of a grey level, several times faster, still deterministic).
    4. Resize. ``"stretch"`` resizes each axis to ``size``. ``"pad"`` keeps the physical
       aspect ratio (using the pixel spacing): the longest side (relative to ``size``) is
       scaled to fit and the rest is centre-padded with 0 (the low percentile).

    Intensities are clipped before resizing, so a hot pixel is clipped before
    interpolation can smear it over its neighbours, and padding never shifts the
    percentiles. Every step is linear in the intensities or a percentile, so an affine
    change ``a * x + b`` (``a > 0``) of the input gives the same output.

    ``test_shift`` (0 = off) is applied by the embedder, not here: an image's embedding is
    then the mean of the network's embeddings of the input and of its copies shifted by
    ``test_shift`` of the field along each axis both ways (5 views in 2D, 7 in 3D; edges
    replicated), which averages out some of the positioning that differs between a
    subject's images. It is part of the model, and so of its ID: a library never mixes
    embeddings made with and without it.
    """

    spatial_dims: int = 2
    size: tuple = (256, 256)
    spacing: tuple | None = None
    clip_percentiles: tuple = (0.5, 99.5)
    resize: str = "pad"
    test_shift: float = 0.0

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, not {self.spatial_dims!r}")
        size = tuple(int(s) for s in self.size)
        if len(size) != self.spatial_dims or min(size) < 1:
            raise ValueError(f"size {self.size!r} does not fit spatial_dims={self.spatial_dims}")
        object.__setattr__(self, "size", size)
        if self.spacing is not None:
            if self.spatial_dims != 3:
                raise ValueError("a target spacing is only used for 3D volumes")
            spacing = tuple(float(s) for s in (
                self.spacing if np.ndim(self.spacing) else [self.spacing] * 3))
            if len(spacing) != 3 or min(spacing) <= 0:
                raise ValueError(f"spacing {self.spacing!r} must be three positive numbers")
            object.__setattr__(self, "spacing", spacing)
        lo, hi = (float(p) for p in self.clip_percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"clip_percentiles {self.clip_percentiles!r} must be 0 <= low < high <= 100")
        object.__setattr__(self, "clip_percentiles", (lo, hi))
        if self.resize not in ("pad", "stretch"):
            raise ValueError(f"resize must be 'pad' or 'stretch', not {self.resize!r}")
        shift = float(self.test_shift)
        if not 0.0 <= shift < 0.5:
            raise ValueError(f"test_shift {self.test_shift!r} must be a fraction of the field in [0, 0.5)")
        object.__setattr__(self, "test_shift", shift)

    def view_shifts(self) -> list:
        """Pixel offsets per axis of the views whose embeddings are averaged (the input alone
        without ``test_shift``)."""
        views = [(0,) * self.spatial_dims]
        for axis, n in enumerate(self.size):
            k = int(round(self.test_shift * n))
            if k:
                for sign in (1, -1):
                    views.append(tuple(sign * k if a == axis else 0 for a in range(self.spatial_dims)))
        return views

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "spatial_dims": self.spatial_dims,
            "size": list(self.size),
            "spacing": list(self.spacing) if self.spacing is not None else None,
            "clip_percentiles": list(self.clip_percentiles),
            "resize": self.resize,
            # Only when set: the IDs of models without it stay as they were.
            **({"test_shift": self.test_shift} if self.test_shift else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        spacing = d.get("spacing")
        return cls(
            spatial_dims=int(d["spatial_dims"]),
            size=tuple(d["size"]),
            spacing=tuple(spacing) if spacing is not None else None,
            clip_percentiles=tuple(d.get("clip_percentiles", (0.5, 99.5))),
            resize=d.get("resize", "pad"),
            test_shift=float(d.get("test_shift", 0.0)),
        )

    @classmethod
    def default(cls, spatial_dims: int) -> "Preprocessing":
        """The defaults of ``FingerprintModel.create``: 256x256 for 2D, 96^3 for 3D."""
        if spatial_dims == 2:
            return cls(spatial_dims=2, size=(256, 256))
        return cls(spatial_dims=3, size=(96, 96, 96))

    # -- the transform ---------------------------------------------------------------
    def apply(self, loaded) -> np.ndarray:
        """Return the network input for one ``LoadedImage``: float32, shape ``(1, *size)``."""
        array = np.asarray(loaded.array)
        spacing_in = getattr(loaded, "spacing", None)
        if self.spatial_dims == 2 and array.ndim == 3 and array.shape[0] == 1:
            # A single-slice volume is a 2D image (readers squeeze it; be lenient anyway).
            array = array[0]
            spacing_in = tuple(spacing_in)[1:] if spacing_in is not None and len(spacing_in) == 3 else None
        if array.ndim != self.spatial_dims:
            kind = {2: "2D images", 3: "3D volumes"}.get(self.spatial_dims)
            have = {2: "a 2D image", 3: "a 3D volume"}.get(array.ndim, f"a {array.ndim}-dimensional array")
            raise ModelMismatchError(f"this model embeds {kind}; {_describe(loaded)} is {have}")
        if min(array.shape) < 1:
            raise ValueError(f"{_describe(loaded)} has no pixels (shape {array.shape})")
        array = _finite(np.asarray(array, dtype=np.float32))
        spacing = _spacing_of(spacing_in, array.ndim)

        if self.spacing is not None:
            shape = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(array.shape, spacing, self.spacing))
            array = _resize(array, shape)
            spacing = self.spacing

        array = self._scale_intensities(array)

        if self.resize == "stretch":
            out = _resize(array, self.size)
        else:
            extent = [n * s for n, s in zip(array.shape, spacing)]
            # mm per output pixel so that the longest side (relative to its target) fits.
            mm_per_pixel = max(e / t for e, t in zip(extent, self.size))
            inner = tuple(min(t, max(1, int(round(e / mm_per_pixel)))) for e, t in zip(extent, self.size))
            out = np.zeros(self.size, dtype=np.float32)
            starts = [(t - n) // 2 for t, n in zip(self.size, inner)]
            out[tuple(slice(b, b + n) for b, n in zip(starts, inner))] = _resize(array, inner)
        # Interpolation cannot leave [0, 1] by much; clip keeps the promise exact.
        np.clip(out, 0.0, 1.0, out=out)
        return np.ascontiguousarray(out[None], dtype=np.float32)

    def _scale_intensities(self, array: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(_grid_sample(array), self.clip_percentiles)
        if not hi > lo:
            # Flat image (or nearly): fall back to the full range, else all zeros.
            lo, hi = float(array.min()), float(array.max())
            if not hi > lo:
                return np.zeros_like(array, dtype=np.float32)
        out = (array - np.float32(lo)) * np.float32(1.0 / (hi - lo))
        np.clip(out, 0.0, 1.0, out=out)
        return out.astype(np.float32, copy=False)


# Percentiles are computed on at most about this many pixels.
_PERCENTILE_SAMPLES = 1 << 20


def _grid_sample(array: np.ndarray) -> np.ndarray:
    """Every k-th pixel along each axis so that about ``_PERCENTILE_SAMPLES`` remain."""
    if array.size <= _PERCENTILE_SAMPLES:
        return array
    step = int(np.ceil((array.size / _PERCENTILE_SAMPLES) ** (1.0 / array.ndim)))
    return array[(slice(None, None, step),) * array.ndim]


def _finite(array: np.ndarray) -> np.ndarray:
    """Replace NaN/inf (rare: broken floats in NIfTI/MHA) by the lowest finite value."""
    finite = np.isfinite(array)
    if finite.all():
        return array
    low = float(array[finite].min()) if finite.any() else 0.0
    return np.where(finite, array, np.float32(low)).astype(np.float32)


def _spacing_of(spacing, ndim: int) -> tuple:
    try:
        values = tuple(float(s) for s in spacing)
    except TypeError:
        values = ()
    if len(values) != ndim or not all(np.isfinite(values)) or min(values) <= 0:
        return (1.0,) * ndim  # unknown spacing: square pixels
    return values


def _resize(array: np.ndarray, shape: tuple) -> np.ndarray:
    """Resize one image or volume (see :func:`resize_tensor`)."""
    import torch

    shape = tuple(int(s) for s in shape)
    if tuple(array.shape) == shape:
        return np.ascontiguousarray(array, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    with torch.no_grad():
        return resize_tensor(x, shape)[0, 0].numpy()


def resize_tensor(x, shape: tuple):
    """Resize a ``(B, C, *spatial)`` tensor with torch; antialiased in 2D, area-averaged when
    shrinking in 3D. Shared by the preprocessing and by ensembles whose members take smaller
    inputs, so that both shrink an image the same way."""
    import torch.nn.functional as F

    shape = tuple(int(s) for s in shape)
    if tuple(x.shape[2:]) == shape:
        return x
    if x.dim() == 4:
        shrinking = any(t < n for t, n in zip(shape, x.shape[2:]))
        return F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=shrinking)
    # torch has no antialiased trilinear: average-pool whole factors first, then
    # interpolate the remainder.
    kernel = tuple(max(1, n // t) for n, t in zip(x.shape[2:], shape))
    if max(kernel) > 1:
        x = F.avg_pool3d(x, kernel_size=kernel, stride=kernel)
    return F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
