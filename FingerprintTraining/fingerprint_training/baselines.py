"""Pixel baselines scored with the same episodes and retrieval metrics as the fingerprints.

* Pixel correlation: Pearson correlation of the preprocessed pixels; distance = 1 - r.
  Standardised, unit-length pixel vectors turn it into a dot product, so whole-gallery
  retrieval stays a matrix product.
* SSIM at 256 px as in the Few-Shot Fingerprinting paper (their Table 1 "SSIM"): 2D images
  are upsampled to 256 x 256 (our data is 64 px) and compared with
  ``skimage.metrics.structural_similarity`` (defaults: 7-pixel uniform window); distance =
  1 - SSIM. 3D volumes are compared at their preprocessed size. Each pair is computed once
  and cached, because N-way K-shot episodes revisit pairs.
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
    """1 - SSIM between images (2D at 256 px, 3D as given), with a pair cache."""

    name = "ssim"

    def __init__(self, images, size: int = SSIM_SIZE, data_range: Optional[float] = None):
        a = np.asarray(images, dtype=np.float64)
        if a.ndim >= 3 and a.shape[1] == 1:
            a = a[:, 0]  # drop the channel axis
        if a.ndim == 3 and size:
            a = np.stack([upsample(im, size) for im in a])
        self.images = a
        # Preprocessed images are in [0, 1]; fall back to the observed range otherwise.
        if data_range is None:
            lo, hi = float(a.min()), float(a.max())
            data_range = 1.0 if (lo >= 0.0 and hi <= 1.0) else (hi - lo) or 1.0
        self.data_range = float(data_range)
        self._cache: dict = {}
        self.pairs_computed = 0

    def __len__(self) -> int:
        return len(self.images)

    def pair(self, i: int, j: int) -> float:
        from skimage.metrics import structural_similarity

        if i == j:
            return 0.0
        key = (i, j) if i < j else (j, i)
        d = self._cache.get(key)
        if d is None:
            s = structural_similarity(self.images[key[0]], self.images[key[1]],
                                      data_range=self.data_range)
            d = float(1.0 - s)
            self._cache[key] = d
            self.pairs_computed += 1
        return d

    def __call__(self, query: int, supports) -> np.ndarray:
        return np.array([self.pair(int(query), int(s)) for s in np.asarray(supports).ravel()])

    def block(self, q) -> np.ndarray:
        n = len(self.images)
        return np.array([[self.pair(int(i), j) for j in range(n)] for i in np.asarray(q)])


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
