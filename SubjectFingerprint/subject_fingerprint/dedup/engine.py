"""All-pairs comparison of embedded datasets: close image pairs, suspected same-subject pairs
and exact duplicates, without ever holding an N x M distance matrix."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..distances import row_distances

BLOCK = 4096  # rows per block: a 4096 x 4096 float32 block of distances is 64 MiB


@dataclass
class EmbeddedDataset:
    """One dataset's embeddings and the identity of each row."""

    name: str
    embeddings: np.ndarray  # (N, D) float32
    subject_ids: np.ndarray  # (N,) str
    image_ids: np.ndarray
    sources: np.ndarray
    content_hashes: np.ndarray
    failures: list = field(default_factory=list)
    library: Optional[str] = None  # the .h5 it came from or was saved to
    root: Optional[str] = None  # the folder it was read from (report paths are relative to it)

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def n_subjects(self) -> int:
        return len(set(self.subject_ids.tolist()))


@dataclass
class ImagePair:
    a: int  # dataset index
    i: int  # row in dataset a
    b: int
    j: int
    distance: float
    exact_duplicate: bool = False


@dataclass
class SubjectPair:
    a: int
    subject_a: str
    b: int
    subject_b: str
    min_distance: float
    n_close_pairs: int
    best: ImagePair
    probability: Optional[float] = None


def close_pairs(x: np.ndarray, y: np.ndarray, threshold: float, same: bool = False,
                block: int = BLOCK):
    """Index pairs (i, j) with ||x_i - y_j|| <= threshold, and their distances.

    Works block by block: one float32 GEMM per block written into a reused buffer, then two
    in-place passes (``q.g - |g|^2/2`` compared with ``(|q|^2 - t^2)/2``), so there are no
    per-block temporaries; the few survivors are re-measured exactly in float64. With
    ``same`` (x is y) only pairs i < j are returned, and blocks below the diagonal are skipped.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    limit = float(threshold) ** 2
    # A small tolerance: the expansion loses a little precision near zero.
    slack = limit + 1e-4 * max(limit, 1.0)
    half_yn = 0.5 * np.einsum("ij,ij->i", y, y)
    bound_x = 0.5 * (np.einsum("ij,ij->i", x, x) - slack)  # pair kept if x.y - |y|^2/2 >= it
    rows_x = max(1, min(int(block), len(x)))
    rows_y = max(1, min(int(block) * 4, len(y)))  # wide blocks: the K=128 GEMM runs faster
    buf = np.empty((rows_x, rows_y), dtype=np.float32)
    found_i, found_j, found_d = [], [], []
    for s in range(0, len(x), rows_x):
        xb = x[s:s + rows_x]
        start_j = s if same else 0
        for t in range(start_j, len(y), rows_y):
            out = buf[:len(xb), :min(rows_y, len(y) - t)]
            np.matmul(xb, y[t:t + rows_y].T, out=out)
            out -= half_yn[t:t + rows_y]
            ii, jj = np.nonzero(out >= bound_x[s:s + rows_x, None])
            ii, jj = ii + s, jj + t
            if same:
                keep = ii < jj
                ii, jj = ii[keep], jj[keep]
            if len(ii):
                # Recompute the few survivors exactly so reported distances are precise.
                d = row_distances(x, y, ii, jj)
                keep = d <= threshold
                found_i.append(ii[keep])
                found_j.append(jj[keep])
                found_d.append(d[keep])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def exact_duplicates(datasets: List[EmbeddedDataset]) -> List[ImagePair]:
    """Pairs of images whose decoded pixels are identical (same content hash)."""
    by_hash: Dict[str, List[Tuple[int, int]]] = defaultdict(list)
    for a, ds in enumerate(datasets):
        for i, h in enumerate(ds.content_hashes.tolist()):
            if h:
                by_hash[h].append((a, i))
    pairs = []
    for members in by_hash.values():
        for k in range(len(members)):
            for m in range(k + 1, len(members)):
                (a, i), (b, j) = members[k], members[m]
                pairs.append(ImagePair(a, i, b, j, 0.0, exact_duplicate=True))
    return pairs


def find_pairs(datasets: List[EmbeddedDataset], threshold: float, near: float = 0.0,
               block: int = BLOCK) -> List[ImagePair]:
    """Every image pair closer than ``threshold``: across datasets, and within each dataset
    between different subjects (same-ID pairs are the same subject already, and are kept only
    when they are near duplicates, closer than ``near``)."""
    pairs: List[ImagePair] = []
    for a in range(len(datasets)):
        for b in range(a, len(datasets)):
            same = a == b
            ii, jj, dd = close_pairs(datasets[a].embeddings, datasets[b].embeddings, threshold,
                                     same=same, block=block)
            if same and len(ii):
                subjects = datasets[a].subject_ids
                keep = (subjects[ii] != subjects[jj]) | (dd <= near)
                ii, jj, dd = ii[keep], jj[keep], dd[keep]
            pairs.extend(ImagePair(a, int(i), b, int(j), float(d)) for i, j, d in zip(ii, jj, dd))
    return pairs


def subject_pairs(datasets: List[EmbeddedDataset], pairs: List[ImagePair],
                  calibration=None) -> List[SubjectPair]:
    """Aggregate close image pairs into suspected same-subject pairs, most certain first."""
    groups: Dict[tuple, SubjectPair] = {}
    for p in pairs:
        sa, sb = datasets[p.a].subject_ids[p.i], datasets[p.b].subject_ids[p.j]
        if p.a == p.b and sa == sb:
            continue
        # One key per unordered pair of (dataset, subject).
        left, right = (p.a, sa), (p.b, sb)
        flip = right < left
        key = (right, left) if flip else (left, right)
        current = groups.get(key)
        if current is None:
            groups[key] = SubjectPair(key[0][0], key[0][1], key[1][0], key[1][1],
                                      p.distance, 1, p)
        else:
            current.n_close_pairs += 1
            if p.distance < current.min_distance:
                current.min_distance, current.best = p.distance, p
    result = list(groups.values())
    if calibration is not None and result:
        probs = calibration.probability(np.array([r.min_distance for r in result]))
        for r, prob in zip(result, np.atleast_1d(probs)):
            r.probability = float(prob)
    result.sort(key=lambda r: (r.min_distance, -r.n_close_pairs))
    return result
