"""The one distance module: NumPy and torch forms agree with a direct computation."""

import numpy as np
import pytest
import torch

from subject_fingerprint import distances


def _direct(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def test_euclidean_numpy_and_torch_match_direct():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
    np.testing.assert_allclose(distances.euclidean(a, b), _direct(a, b), atol=1e-10)
    t = distances.euclidean(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), _direct(a, b), atol=1e-5)


def test_torch_gradient_finite_at_zero_distance():
    x = torch.ones(3, 4, requires_grad=True)
    distances.euclidean(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_squared_euclidean_uses_given_norms_and_clips():
    a = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    d2 = distances.squared_euclidean(a, a, distances.sq_norms(a), distances.sq_norms(a))
    assert d2.dtype == np.float32 and (d2 >= 0).all() and d2.max() == 0


def test_cosine_and_row_distances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    cos = distances.cosine(a, b)
    assert cos.min() >= 0 and cos.max() <= 2
    i, j = np.arange(6), np.arange(6)[::-1]
    np.testing.assert_allclose(distances.row_distances(a, b, i, j, block=2), _direct(a, b)[i, j])
    np.testing.assert_allclose(distances.row_distances(a, b, i, j, "cosine"), cos[i, j], atol=1e-12)
    with pytest.raises(ValueError, match="unknown distance"):
        distances.pairwise(a, b, "manhattan")
