"""Distances between embeddings: the one place the project computes them.

Every caller (search, dedup, metrics, mining, training) uses these functions, so a change of
formula or precision happens here once. Matrix forms use the squared-norm expansion
``|a|^2 + |b|^2 - 2 a.b``, one GEMM, which is what makes large galleries fast; the few results
that matter are then re-measured exactly with :func:`row_distances`.

Functions accept NumPy arrays or torch tensors and return the same kind. Torch inputs keep their
autograd graph: the square root is taken of a value clamped above zero, so the gradient stays
finite for identical embeddings (``torch.cdist``'s backward is NaN at exactly zero distance).
"""

from typing import Optional

import numpy as np

METRICS = ("euclidean", "cosine")

# Floor under squared distances before the square root in torch (keeps the gradient finite).
_TORCH_EPS = 1e-12


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def sq_norms(x):
    """Squared L2 norm of each row (float32 for NumPy input, as stored with a library)."""
    if _is_torch(x):
        return (x * x).sum(1)
    x = np.asarray(x)
    return np.einsum("ij,ij->i", x, x)


def squared_euclidean(a, b=None, a_sq=None, b_sq=None):
    """Squared Euclidean distance matrix (len(a), len(b)), clipped at zero.

    ``a_sq``/``b_sq`` are the rows' squared norms when the caller already has them (a library
    keeps its gallery's norms so a query does not recompute them). NumPy inputs keep their
    dtype: pass float64 where the exact value matters, float32 for speed.
    """
    b = a if b is None else b
    if _is_torch(a):
        a_sq = sq_norms(a) if a_sq is None else a_sq
        b_sq = sq_norms(b) if b_sq is None else b_sq
        return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.t())).clamp_min(0.0)
    a_sq = sq_norms(a) if a_sq is None else a_sq
    b_sq = sq_norms(b) if b_sq is None else b_sq
    d2 = a @ b.T
    d2 *= -2.0
    d2 += a_sq[:, None]
    d2 += b_sq[None, :]
    return np.maximum(d2, 0.0, out=d2)


def euclidean(a, b=None):
    """Euclidean distance matrix (len(a), len(b)); float64 for NumPy input."""
    if _is_torch(a):
        a = a.float()
        b = a if b is None else b.float()
        return squared_euclidean(a, b).clamp_min(_TORCH_EPS).sqrt()
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = a if b is None else np.atleast_2d(np.asarray(b, dtype=np.float64))
    return np.sqrt(squared_euclidean(a, b))


def cosine(a, b=None):
    """Cosine distance matrix ``1 - cos``, in [0, 2]; zero vectors count as orthogonal."""
    if _is_torch(a):
        import torch.nn.functional as F

        b = a if b is None else b
        return (1.0 - F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).t()).clamp(0.0, 2.0)
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = a if b is None else np.atleast_2d(np.asarray(b, dtype=np.float64))
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    an = a / np.where(na == 0, 1.0, na)
    bn = b / np.where(nb == 0, 1.0, nb)
    return np.clip(1.0 - an @ bn.T, 0.0, 2.0)


def pairwise(a, b=None, metric: str = "euclidean"):
    """Distance matrix under ``metric`` (one of :data:`METRICS`)."""
    if metric == "euclidean":
        return euclidean(a, b)
    if metric == "cosine":
        return cosine(a, b)
    raise ValueError(f"unknown distance {metric!r}; use one of {', '.join(METRICS)}")


def row_distances(x, y, i, j, metric: str = "euclidean", block: Optional[int] = None) -> np.ndarray:
    """Exact float64 distances between rows ``x[i[n]]`` and ``y[j[n]]`` for each n.

    Used to re-measure candidates found with the fast matrix form; memory stays bounded by
    working in blocks of ``block`` pairs (default: about 16 MiB of float64 rows).
    """
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    out = np.empty(len(i))
    dim = max(1, np.shape(x)[1])
    step = int(block or max(1, (1 << 21) // dim))
    for lo in range(0, len(i), step):
        xa = np.asarray(x[i[lo:lo + step]], dtype=np.float64)
        ya = np.asarray(y[j[lo:lo + step]], dtype=np.float64)
        if metric == "euclidean":
            out[lo:lo + step] = np.linalg.norm(xa - ya, axis=1)
        elif metric == "cosine":
            na = np.linalg.norm(xa, axis=1)
            nb = np.linalg.norm(ya, axis=1)
            cos = np.einsum("ij,ij->i", xa, ya) / np.where(na * nb == 0, 1.0, na * nb)
            out[lo:lo + step] = np.clip(1.0 - cos, 0.0, 2.0)
        else:
            raise ValueError(f"unknown distance {metric!r}; use one of {', '.join(METRICS)}")
    return out
