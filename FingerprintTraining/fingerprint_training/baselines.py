"""Pixel baselines scored with the same episodes and retrieval metrics as the fingerprints.

* Pixel correlation: Pearson correlation of the preprocessed pixels; distance = 1 - r.
  Standardised, unit-length pixel vectors turn it into a dot product, so whole-gallery
  retrieval stays a matrix product.
* SSIM at 256 px as in the Few-Shot Fingerprinting paper (their Table 1 "SSIM"): 2D images
  are upsampled to 256 x 256 (our data is 64 px) and compared with
  ``skimage.metrics.structural_similarity`` (defaults: 7-pixel uniform window); distance =
  1 - SSIM. 3D volumes are compared at their preprocessed size. Each pair is computed once
  and cached, because N-way K-shot episodes revisit pairs.

Both work on the images as the evaluated model preprocesses them (its size and intensity
scaling), so the comparison uses the same inputs as the fingerprints.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .metrics import nway_kshot_from_distances, retrieval_metrics

SSIM_SIZE = 256


def _flat(images) -> np.ndarray:
    """(n, 1, *size) or (n, *size) images -> (n, pixels) float64."""
    a = np.asarray(images, dtype=np.float64)
    return a.reshape(len(a), -1)


class PixelCorrelation:
    """Pearson-correlation distance (1 - r) between preprocessed images."""

    name = "pixel-correlation"

    def __init__(self, images):
        x = _flat(images)
        x = x - x.mean(1, keepdims=True)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        # A constant image correlates with nothing: zero vector -> r = 0 -> distance 1.
        self.z = x / np.where(norm == 0, 1.0, norm)

    def __len__(self) -> int:
        return len(self.z)

    def block(self, q) -> np.ndarray:
        """Distances of queries ``q`` to every image: (len(q), n)."""
        return np.clip(1.0 - self.z[np.asarray(q)] @ self.z.T, 0.0, 2.0)

    def matrix(self) -> np.ndarray:
        return self.block(np.arange(len(self.z)))

    def __call__(self, query: int, supports) -> np.ndarray:
        return np.clip(1.0 - self.z[np.asarray(supports)] @ self.z[int(query)], 0.0, 2.0)


def upsample(image: np.ndarray, size: int = SSIM_SIZE) -> np.ndarray:
    """Bilinear resize of a 2D image to size x size (anti-aliasing off: this only enlarges)."""
    from skimage.transform import resize

    return resize(image, (size, size), order=1, mode="edge", anti_aliasing=False,
                  preserve_range=True).astype(np.float64)


class SSIMDistance:
    """1 - SSIM between images (2D at 256 px, 3D as given), with a pair cache.

    The SSIM is skimage's ``structural_similarity`` with its defaults (7-pixel uniform
    window, sample covariance, K1 = 0.01, K2 = 0.03, borders cropped), computed here in a
    batched form: each image's local mean and variance are filtered once, so a pair costs
    one filter instead of five (the tests check equality with skimage).
    """

    name = "ssim"
    win = 7

    def __init__(self, images, size: int = SSIM_SIZE, data_range: Optional[float] = None):
        a = np.asarray(images, dtype=np.float64)
        if a.ndim >= 3 and a.shape[1] == 1:
            a = a[:, 0]  # drop the channel axis
        if a.ndim == 3 and size:
            a = np.stack([upsample(im, size) for im in a])
        if min(a.shape[1:]) < self.win:
            raise ValueError(f"SSIM needs images of at least {self.win} pixels per side")
        # Preprocessed images are in [0, 1]; fall back to the observed range otherwise.
        if data_range is None:
            lo, hi = float(a.min()), float(a.max())
            data_range = 1.0 if (lo >= 0.0 and hi <= 1.0) else (hi - lo) or 1.0
        self.data_range = float(data_range)
        self.images = a
        self._stats: dict = {}
        self._cache: dict = {}
        self.pairs_computed = 0

    def __len__(self) -> int:
        return len(self.images)

    def _filter(self, x):
        from scipy.ndimage import uniform_filter

        # Filter the image axes only (axis 0 of a stack is the image index).
        return uniform_filter(x, size=(1,) + (self.win,) * (x.ndim - 1))

    def _crop(self, x):
        # skimage averages the SSIM map without the (win - 1) / 2 border the filter pads.
        pad = (self.win - 1) // 2
        return x[(Ellipsis,) + (slice(pad, -pad),) * (self.images.ndim - 1)]

    def _image_stats(self, i: int):
        """Cropped local mean and sample variance of image i (cached)."""
        st = self._stats.get(i)
        if st is None:
            x = self.images[i][None]
            ux = self._filter(x)[0]
            vx = (self._filter(x * x)[0] - ux * ux) * self._cov_norm
            st = self._stats[i] = (np.ascontiguousarray(self._crop(ux)),
                                   np.ascontiguousarray(self._crop(vx)))
        return st

    @property
    def _cov_norm(self) -> float:
        np_ = self.win ** (self.images.ndim - 1)
        return np_ / (np_ - 1.0)

    def _ssim_many(self, i: int, js) -> np.ndarray:
        """SSIM of image i against images js (batched, in place to spare memory traffic)."""
        js = list(js)
        ux, vx = self._image_stats(i)
        uy = np.stack([self._image_stats(j)[0] for j in js])
        vy = np.stack([self._image_stats(j)[1] for j in js])
        c1 = (0.01 * self.data_range) ** 2
        c2 = (0.03 * self.data_range) ** 2
        uxy = np.ascontiguousarray(self._crop(self._filter(self.images[i][None] * self.images[js])))
        p = uy * ux                      # ux * uy
        uxy -= p                         # covariance (population) ...
        uxy *= 2.0 * self._cov_norm      # ... -> 2 * sample covariance
        uxy += c2                        # numerator factor 2: 2 vxy + C2
        p *= 2.0
        p += c1                          # numerator factor 1: 2 ux uy + C1
        p *= uxy
        uy *= uy
        uy += ux * ux + c1               # denominator factor 1: ux^2 + uy^2 + C1
        vy += vx + c2                    # denominator factor 2: vx + vy + C2
        uy *= vy
        p /= uy
        return p.reshape(len(js), -1).mean(1)

    def distances(self, i: int, js) -> np.ndarray:
        """1 - SSIM of image i to each of js, computing only pairs not yet cached."""
        i = int(i)
        js = [int(j) for j in np.asarray(js).ravel()]
        out = np.empty(len(js))
        todo = []
        for n, j in enumerate(js):
            key = (i, j) if i < j else (j, i)
            if i == j:
                out[n] = 0.0
            elif key in self._cache:
                out[n] = self._cache[key]
            else:
                todo.append((n, j, key))
        # Batches of 64 pairs bound the memory of the stacked 256 px arrays.
        for b in range(0, len(todo), 64):
            chunk = todo[b:b + 64]
            values = 1.0 - self._ssim_many(i, [j for _, j, _ in chunk])
            for (n, _, key), v in zip(chunk, values):
                out[n] = self._cache[key] = float(v)
            self.pairs_computed += len(chunk)
        return out

    def pair(self, i: int, j: int) -> float:
        return float(self.distances(i, [j])[0])

    def __call__(self, query: int, supports) -> np.ndarray:
        return self.distances(query, supports)

    def block(self, q) -> np.ndarray:
        n = len(self.images)
        return np.stack([self.distances(int(i), range(n)) for i in np.asarray(q)])


def episode_pairs(n_way: int, k_shot: int, episodes: int) -> int:
    """Upper bound of the image pairs an N-way K-shot run compares."""
    return int(episodes) * int(n_way) * int(n_way) * int(k_shot)


def baseline_nway_kshot(baseline, labels, n_way, k_shot, episodes=100, seed=0, max_r=5,
                        groups=None) -> dict:
    """N-way K-shot of a baseline on exactly the episodes ``metrics.nway_kshot`` draws."""
    return nway_kshot_from_distances(baseline, labels, n_way, k_shot, episodes=episodes,
                                     seed=seed, max_r=max_r, groups=groups, name=baseline.name)


def baseline_retrieval(baseline, labels, block_size: int = 256) -> dict:
    """Leave-one-out mAP@R / R-Precision / P@1 of a baseline."""
    return retrieval_metrics(labels=labels, block_fn=baseline.block, block_size=block_size)
