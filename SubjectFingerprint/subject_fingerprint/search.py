"""Exact nearest-neighbour search and ranked lookup over an embedding library.

Distances are Euclidean. The gallery is scanned in blocks, using
``||q||^2 - 2 q.g + ||g||^2`` with one float32 matrix product per block and ``argpartition``,
so memory stays at (queries x block) whatever the library size. The few best candidates are
then re-measured in float64, which makes distances of exact copies 0 and orders ties by
gallery index (stable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .distances import sq_norms, squared_euclidean
from .errors import ModelMismatchError

# Float32 distance products lose a few digits; keep this many extra candidates per query so
# that the float64 re-ranking can fix the order near the k-th place.
_EXTRA = 8
# Largest (queries x gallery rows) block of float32 distances held at once (64 MiB).
_BLOCK_ELEMENTS = 1 << 24
_QUERY_CHUNK = 1024
# From this many queries at once the search is compute-bound and uses the pruned kernel.
_PRUNED_MIN_QUERIES = 32
_USE_FAISS = True  # tests switch it off to check the numpy kernel
# (queries x gallery rows) distances per block in the pruned kernel: 64 MiB (measured:
# smaller blocks make the K=128 GEMM calls inefficient).
_PRUNED_BLOCK_ELEMENTS = 1 << 24
# Beyond this many image neighbours per query, rank() finds subjects by a full per-subject
# minimum instead of widening the image search further.
_WIDEN_LIMIT = 4096


def _block_rows(n_queries: int, block_size: Optional[int]) -> int:
    if block_size:
        return max(1, int(block_size))
    return int(min(1 << 18, max(4096, _BLOCK_ELEMENTS // max(1, n_queries))))


def knn(gallery: np.ndarray, queries: np.ndarray, k: int, block_size: Optional[int] = None,
        gallery_sq_norms: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact k nearest gallery rows of each query.

    Returns ``(distances, indices)``, both of shape ``(Q, min(k, N))``, sorted by distance
    (float64), equal distances by gallery index. ``block_size`` is the number of gallery rows
    compared at once (default: chosen so a block of distances stays under 64 MiB).
    """
    gallery = np.asarray(gallery, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    if gallery.ndim != 2 or queries.ndim != 2 or gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"gallery {gallery.shape} and queries {queries.shape} do not match")
    n, q = gallery.shape[0], queries.shape[0]
    k = int(min(max(int(k), 0), n))
    if k == 0 or q == 0:
        return np.zeros((q, k)), np.zeros((q, k), dtype=np.int64)
    if gallery_sq_norms is None:
        gallery_sq_norms = sq_norms(gallery)
    out_d = np.empty((q, k))
    out_i = np.empty((q, k), dtype=np.int64)
    chunk = _knn_chunk if q < _PRUNED_MIN_QUERIES else _batched_kernel()
    for lo in range(0, q, _QUERY_CHUNK):
        d, i = chunk(gallery, gallery_sq_norms, queries[lo:lo + _QUERY_CHUNK], k, block_size)
        out_d[lo:lo + len(d)] = d
        out_i[lo:lo + len(i)] = i
    return out_d, out_i


def _batched_kernel():
    """faiss's exact brute-force search where installed (measured 2.3x faster than the pruned
    numpy kernel for 1000 queries on 1M entries, BENCHMARKS.md), else the pruned kernel."""
    if _USE_FAISS:
        try:
            import faiss  # noqa: F401
            return _knn_chunk_faiss
        except ImportError:
            pass
    return _knn_chunk_pruned


def _knn_chunk_faiss(gallery, g_norms, queries, k, block_size):
    import faiss

    keep = min(gallery.shape[0], k + _EXTRA)
    _, cand = faiss.knn(np.ascontiguousarray(queries), np.ascontiguousarray(gallery), keep)
    cand = cand.astype(np.int64)
    exact = _exact_distances(gallery, queries, cand)
    order = np.lexsort((cand, exact), axis=1)[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(cand, order, axis=1)


def _knn_chunk_pruned(gallery, g_norms, queries, k, block_size):
    """Many queries at once: compute-bound, so the cost beyond the GEMM must stay small.

    The first block's candidates give each query a bound (its ``keep``-th distance); in every
    later block one vectorised comparison finds the few entries under the bound, and only those
    are merged. A full top-k selection per block would cost as much as the GEMM itself.
    """
    import torch

    n, q = gallery.shape[0], queries.shape[0]
    keep = min(n, k + _EXTRA)
    rows = int(block_size or max(keep, min(n, _PRUNED_BLOCK_ELEMENTS // max(1, q))))
    dot = np.empty((q, min(rows, n)), dtype=np.float32)
    g_norms = np.asarray(g_norms, dtype=np.float32)
    best_d = best_i = None
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        out = dot[:, :stop - start]
        np.matmul(queries, gallery[start:stop].T, out=out)
        # |g|^2 - 2 q.g: the query's own norm is the same along a row, so it is left out.
        out *= -2.0
        out += g_norms[start:stop]
        if best_d is None:
            take = min(keep, stop - start)
            v, i = torch.topk(torch.from_numpy(out), take, dim=1, largest=False)
            best_d, best_i = v.numpy().copy(), i.numpy().astype(np.int64) + start
            continue
        hit_q, hit_j = np.nonzero(out <= best_d.max(axis=1)[:, None])
        if len(hit_q) == 0:
            continue
        hit_d = out[hit_q, hit_j]
        # Merge the hits with each query's current candidates; keep the `keep` smallest.
        all_q = np.concatenate([np.repeat(np.arange(q), best_d.shape[1]), hit_q])
        all_d = np.concatenate([best_d.reshape(-1), hit_d])
        all_i = np.concatenate([best_i.reshape(-1), hit_j.astype(np.int64) + start])
        order = np.lexsort((all_d, all_q))
        all_q, all_d, all_i = all_q[order], all_d[order], all_i[order]
        first = np.searchsorted(all_q, np.arange(q))
        rank_in_row = np.arange(len(all_q)) - first[all_q]
        sel = rank_in_row < best_d.shape[1]
        best_d = all_d[sel].reshape(q, -1)
        best_i = all_i[sel].reshape(q, -1)
    exact = _exact_distances(gallery, queries, best_i)
    order = np.lexsort((best_i, exact), axis=1)[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def _knn_chunk(gallery, g_norms, queries, k, block_size):
    n = gallery.shape[0]
    q = queries.shape[0]
    keep = min(n, k + _EXTRA)  # candidates carried between blocks
    q_norms = sq_norms(queries)
    best_d = np.full((q, 0), np.inf, dtype=np.float32)
    best_i = np.zeros((q, 0), dtype=np.int64)
    rows = _block_rows(q, block_size)
    for start in range(0, n, rows):
        block = gallery[start:start + rows]
        d2 = squared_euclidean(queries, block, q_norms, g_norms[start:start + rows])
        take = min(keep, d2.shape[1])
        if take < d2.shape[1]:
            part = np.argpartition(d2, take - 1, axis=1)[:, :take]
        else:
            part = np.broadcast_to(np.arange(d2.shape[1]), (q, d2.shape[1]))
        cand_d = np.take_along_axis(d2, part, axis=1)
        cand_i = part + start
        # Merge with the best so far and keep the `keep` smallest.
        all_d = np.concatenate([best_d, cand_d], axis=1)
        all_i = np.concatenate([best_i, cand_i], axis=1)
        if all_d.shape[1] > keep:
            sel = np.argpartition(all_d, keep - 1, axis=1)[:, :keep]
            all_d = np.take_along_axis(all_d, sel, axis=1)
            all_i = np.take_along_axis(all_i, sel, axis=1)
        best_d, best_i = all_d, all_i
    # Re-measure the candidates exactly and sort by (distance, index).
    exact = _exact_distances(gallery, queries, best_i)
    order = np.lexsort((best_i, exact), axis=1)[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def _exact_distances(gallery, queries, idx) -> np.ndarray:
    """Float64 distances between each query and its candidate rows ``idx`` (Q, M), in tiles
    of at most ~16 MiB whatever M is."""
    q, m = idx.shape
    out = np.empty((q, m))
    tile = max(1, (1 << 21) // max(1, gallery.shape[1]))  # candidate rows per tile
    if m <= tile:
        per = max(1, tile // max(1, m))
        for lo in range(0, q, per):
            diff = gallery[idx[lo:lo + per]].astype(np.float64)
            diff -= queries[lo:lo + per, None, :]
            out[lo:lo + per] = np.sqrt(np.einsum("qkd,qkd->qk", diff, diff))
        return out
    for qi in range(q):
        for lo in range(0, m, tile):
            diff = gallery[idx[qi, lo:lo + tile]].astype(np.float64)
            diff -= queries[qi]
            out[qi, lo:lo + tile] = np.sqrt(np.einsum("kd,kd->k", diff, diff))
    return out


def _subjects_exhaustive(library, queries, k, block_size):
    """Top-k subjects by a full per-subject minimum (for libraries where a few subjects own
    very many images). Returns per query a list of (subject_id, dataset, distance, row)."""
    codes, keys = library.subject_codes()
    gallery, g_norms = library.embeddings, library.squared_norms
    q, n_subjects = len(queries), len(keys)
    q_norms = sq_norms(queries)
    best = np.full((q, n_subjects), np.inf, dtype=np.float32)
    rows = _block_rows(q, block_size)
    for start in range(0, len(gallery), rows):
        d2 = squared_euclidean(queries, gallery[start:start + rows], q_norms, g_norms[start:start + rows])
        block_codes = codes[start:start + rows]
        for qi in range(q):
            np.minimum.at(best[qi], block_codes, d2[qi])
    keep = min(n_subjects, k + _EXTRA)
    out = []
    for qi in range(q):
        cand = np.argpartition(best[qi], keep - 1)[:keep] if keep < n_subjects else \
            np.arange(n_subjects)
        member = np.flatnonzero(np.isin(codes, cand))  # every image of the candidates
        dist = _exact_distances(gallery, queries[qi:qi + 1], member[None, :])[0]
        order = np.lexsort((member, dist))
        seen, ranked = set(), []
        for j in order.tolist():
            code = int(codes[member[j]])
            if code not in seen:
                seen.add(code)
                ds, sid = keys[code]
                ranked.append((sid, ds, float(dist[j]), int(member[j])))
                if len(ranked) == k:
                    break
        out.append(ranked)
    return out


@dataclass
class ImageMatch:
    """One library image close to a query."""

    rank: int
    subject_id: str
    image_id: str
    dataset: str
    distance: float
    probability: Optional[float] = None
    source: str = ""
    row: int = -1  # row in the library

    def to_dict(self) -> dict:
        d = {"rank": self.rank, "subject_id": self.subject_id, "image_id": self.image_id,
             "dataset": self.dataset, "distance": round(float(self.distance), 6)}
        if self.probability is not None:
            d["probability"] = float(f"{self.probability:.6g}")
        return d


@dataclass
class SubjectMatch:
    """One candidate subject: its distance is that of its closest image (``image_id``)."""

    rank: int
    subject_id: str
    dataset: str
    distance: float
    probability: Optional[float] = None
    image_id: str = ""
    source: str = ""  # file of the closest image, already read for the ranking

    def to_dict(self) -> dict:
        d = {"rank": self.rank, "subject_id": self.subject_id, "dataset": self.dataset,
             "distance": round(float(self.distance), 6)}
        if self.probability is not None:
            d["probability"] = float(f"{self.probability:.6g}")
        d["image_id"] = self.image_id
        return d


@dataclass
class QueryResult:
    """Ranked images and subjects for one query."""

    images: List[ImageMatch] = field(default_factory=list)
    subjects: List[SubjectMatch] = field(default_factory=list)
    query: Optional[str] = None

    def to_dict(self) -> dict:
        d = {} if self.query is None else {"query": self.query}
        d["images"] = [m.to_dict() for m in self.images]
        d["subjects"] = [m.to_dict() for m in self.subjects]
        if getattr(self, "open_set", None) is not None:  # set by lookup.open_set
            d["open_set"] = self.open_set
        return d


def _probabilities(calibration, distances) -> List[Optional[float]]:
    if calibration is None or len(distances) == 0:
        return [None] * len(distances)
    p = np.asarray(calibration.probability(np.asarray(distances, dtype=np.float64)), dtype=float)
    return [float(x) for x in np.reshape(p, -1)]


def rank(library, query_embeddings, k: int = 10, calibration=None,
         block_size: Optional[int] = None) -> List[QueryResult]:
    """Top-``k`` images and top-``k`` subjects for each query embedding (row).

    A subject is a ``(dataset, subject_id)`` pair; its distance is that of its closest image.
    The subject ranking is exact: the image search is widened until each query's neighbour
    list holds ``k`` distinct subjects (or the whole library), and the first ``k`` distinct
    subjects of a distance-sorted image list are the ``k`` closest subjects.
    With a ``calibration`` (anything with ``probability(distances)``), each match gets a
    same-subject probability.
    """
    queries = np.asarray(query_embeddings, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    dim = library.embedding_dim
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ModelMismatchError(
            f"query embeddings have shape {queries.shape}, but the library {library.path} holds "
            f"{dim}-dimensional embeddings of model {library.model_id}")
    n = len(library)
    k = max(int(k), 0)
    results = [QueryResult() for _ in range(len(queries))]
    if n == 0 or k == 0 or len(queries) == 0:
        return results
    gallery = library.embeddings
    norms = library.squared_norms

    def fetch(cache: dict, rows, columns) -> None:
        """Read ``columns`` of the rows not yet in ``cache`` (only those rows)."""
        need = np.unique(np.asarray(rows, dtype=np.int64))
        if cache:
            need = need[~np.isin(need, np.fromiter(cache, dtype=np.int64, count=len(cache)))]
        if len(need):
            cols = [library.column(c, need) for c in columns]
            for j, row in enumerate(need.tolist()):
                cache[row] = tuple(col[j] for col in cols)

    owners: dict = {}  # row -> (subject_id, dataset): read for every neighbour considered
    names: dict = {}   # row -> (image_id, source): read only for the rows reported

    # Start with a few times k images; widen for queries still short of k subjects.
    width = min(n, max(4 * k, k + 16))
    pending = np.arange(len(queries))
    found: dict = {}
    while len(pending):
        if width > _WIDEN_LIMIT and width < n:
            dist, idx = knn(gallery, queries[pending], k, block_size=block_size,
                            gallery_sq_norms=norms)
            fetch(owners, idx.reshape(-1), ("subject_id", "dataset"))
            subjects = _subjects_exhaustive(library, queries[pending], k, block_size)
            for row_q, qi in enumerate(pending.tolist()):
                found[qi] = (dist[row_q], idx[row_q], subjects[row_q])
            break
        dist, idx = knn(gallery, queries[pending], width, block_size=block_size,
                        gallery_sq_norms=norms)
        fetch(owners, idx.reshape(-1), ("subject_id", "dataset"))
        retry = []
        for row_q, qi in enumerate(pending.tolist()):
            subjects = []
            seen = set()
            for d, r in zip(dist[row_q].tolist(), idx[row_q].tolist()):
                sid, ds = owners[r]
                if (ds, sid) not in seen:
                    seen.add((ds, sid))
                    subjects.append((sid, ds, d, r))
                    if len(subjects) == k:
                        break
            if len(subjects) < k and width < n:
                retry.append(qi)
            else:
                found[qi] = (dist[row_q], idx[row_q], subjects)
        pending = np.array(retry, dtype=np.int64)
        width = min(n, width * 4)

    wanted = [found[qi][1][:k] for qi in found] + [[s[3] for s in found[qi][2]] for qi in found]
    fetch(names, np.concatenate([np.asarray(w, dtype=np.int64) for w in wanted]),
          ("image_id", "source"))
    for qi, result in enumerate(results):
        dist, idx, subjects = found[qi]
        top_d, top_i = dist[:k], idx[:k]
        p_img = _probabilities(calibration, top_d)
        for r, (d, row, p) in enumerate(zip(top_d.tolist(), top_i.tolist(), p_img), start=1):
            sid, ds = owners[row]
            iid, src = names[row]
            result.images.append(ImageMatch(r, sid, iid, ds, d, p, src, row))
        p_sub = _probabilities(calibration, [s[2] for s in subjects])
        for r, ((sid, ds, d, row), p) in enumerate(zip(subjects, p_sub), start=1):
            result.subjects.append(SubjectMatch(r, sid, ds, d, p, *names[row]))
    return results
