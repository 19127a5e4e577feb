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


PRECISIONS = ("auto", "fp32", "bf16")
# bf16 rounds each input to 8 significant bits (unit roundoff u = 2^-8) and the output once more;
# the first pass keeps a pair when its approximate score is within this many u of the bound,
# times the size of the terms (the worst case of the analysis in _candidates_bf16 is 3u).
_BF16_SLACK_UNITS = 4.0
_first_pass_choice: Optional[str] = None


def close_pairs(x: np.ndarray, y: np.ndarray, threshold: float, same: bool = False,
                block: int = BLOCK, precision: str = "auto"):
    """Index pairs (i, j) with ||x_i - y_j|| <= threshold, and their distances.

    Works block by block and never holds more than one block of scores; the few survivors are
    re-measured exactly in float64, so the result is the exact pair set whichever first pass
    found them. ``precision`` picks the first pass: ``fp32`` (NumPy GEMM, a small tolerance),
    ``bf16`` (a bfloat16 GEMM on the CPU's matrix units with a proven safety margin: a
    superset of the pairs), or ``auto``: bf16 where it measures faster on this CPU (AMX makes
    it ~4x faster than float32), fp32 otherwise. With ``same`` (x is y) only pairs i < j are
    returned, and blocks below the diagonal are skipped.
    """
    precision = str(precision).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        precision = first_pass_precision()
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    if len(x) == 0 or len(y) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    candidates = _candidates_bf16 if precision == "bf16" else _candidates_fp32
    found_i, found_j, found_d = [], [], []
    for ii, jj in candidates(x, y, float(threshold), same, int(block)):
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


def _candidates_fp32(x, y, threshold, same, block):
    """Blocks of candidate pairs from a float32 GEMM written into a reused buffer, then two
    in-place passes (``q.g - |g|^2/2`` compared with ``(|q|^2 - t^2)/2``): no temporaries."""
    limit = threshold ** 2
    # A small tolerance: the expansion loses a little precision near zero.
    slack = limit + 1e-4 * max(limit, 1.0)
    half_yn = 0.5 * np.einsum("ij,ij->i", y, y)
    bound_x = 0.5 * (np.einsum("ij,ij->i", x, x) - slack)  # pair kept if x.y - |y|^2/2 >= it
    rows_x = max(1, min(block, len(x)))
    rows_y = max(1, min(block * 4, len(y)))  # wide blocks: the K=128 GEMM runs faster
    buf = np.empty((rows_x, rows_y), dtype=np.float32)
    for s in range(0, len(x), rows_x):
        xb = x[s:s + rows_x]
        for t in range(s if same else 0, len(y), rows_y):
            out = buf[:len(xb), :min(rows_y, len(y) - t)]
            np.matmul(xb, y[t:t + rows_y].T, out=out)
            out -= half_yn[t:t + rows_y]
            ii, jj = np.nonzero(out >= bound_x[s:s + rows_x, None])
            yield ii + s, jj + t


def _candidates_bf16(x, y, threshold, same, block):
    """Blocks of candidate pairs from one bfloat16 GEMM per block, with every term folded in.

    The pair is close when s = x.y - |y|^2/2 - b_x >= 0, with b_x = (|x|^2 - t^2)/2. Rows are
    extended so that one GEMM gives s: x' = [x, 1, m_x - b_x], y' = [y, -|y|^2/2, 1]. Rounding
    to bf16 (u = 2^-8) moves s by at most 3.01u |x||y| + u |y|^2 + 2u |m_x - b_x| (inputs 2u,
    the output u, float32 accumulation negligible); m_x = 4u (|x| max|y| + max|y|^2/2 + |b_x|)
    covers that, so every close pair scores >= 0 and survives. A score
    >= 0 is a bf16 whose sign bit is clear, i.e. a non-negative int16: the row test is one
    integer max, which vectorises far better than a bf16 comparison.
    """
    import torch

    limit = threshold ** 2
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    xn2, yn2 = np.einsum("ij,ij->i", x64, x64), np.einsum("ij,ij->i", y64, y64)
    b = 0.5 * (xn2 - limit)
    u = 2.0 ** -8
    m = _BF16_SLACK_UNITS * u * (np.sqrt(xn2) * np.sqrt(yn2.max()) + 0.5 * yn2.max() + np.abs(b))
    k = x.shape[1] + 2
    width = -(-k // 32) * 32  # AMX tiles take 32 bf16 per row: pad K with zeros
    xa = np.zeros((len(x), width), np.float32)
    xa[:, :x.shape[1]] = x
    xa[:, k - 2] = 1.0
    xa[:, k - 1] = m - b
    ya = np.zeros((len(y), width), np.float32)
    ya[:, :y.shape[1]] = y
    ya[:, k - 2] = -0.5 * yn2
    ya[:, k - 1] = 1.0
    xt = torch.from_numpy(xa).to(torch.bfloat16)
    yt = torch.from_numpy(ya).to(torch.bfloat16)
    rows_x = max(1, min(block, len(x)))
    rows_y = max(1, min(block * 4, len(y)))
    buf = torch.empty((rows_x, rows_y), dtype=torch.bfloat16)
    with torch.inference_mode():
        for s in range(0, len(x), rows_x):
            xb = xt[s:s + rows_x]
            for t in range(s if same else 0, len(y), rows_y):
                out = buf[:len(xb), :min(rows_y, len(y) - t)]
                torch.mm(xb, yt[t:t + rows_y].T, out=out)
                bits = out.view(torch.int16)
                rows = torch.nonzero(bits.amax(dim=1) >= 0).flatten()
                if len(rows) == 0:
                    continue
                ii, jj = torch.nonzero(bits[rows] >= 0, as_tuple=True)
                yield rows[ii].numpy().astype(np.int64) + s, jj.numpy().astype(np.int64) + t


def first_pass_precision() -> str:
    """``bf16`` where the bf16 first pass runs at least 1.5x faster than the float32 one on
    this CPU (measured once per process on a block of the real shape), else ``fp32``."""
    global _first_pass_choice
    if _first_pass_choice is None:
        _first_pass_choice = _measure_first_pass()
    return _first_pass_choice


def _measure_first_pass(rows: int = 1024) -> str:
    """Time both candidate kernels (GEMM and the threshold pass: what a dedup block costs) on
    one ``rows`` x ``4 rows`` block of 128-d vectors; a bare small GEMM misleads, its fixed
    costs hide the bf16 units' speed."""
    import importlib.util
    import time

    from ..backends import cpu_has_bf16

    if not cpu_has_bf16() or importlib.util.find_spec("torch") is None:
        return "fp32"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 128), dtype=np.float32)
    y = rng.standard_normal((4 * rows, 128), dtype=np.float32)

    def best(kernel):
        for _ in kernel(x, y, 0.0, False, rows):  # warm-up: oneDNN builds its kernels once
            pass
        times = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in kernel(x, y, 0.0, False, rows):
                pass
            times.append(time.perf_counter() - start)
        return min(times)

    t32, t16 = best(_candidates_fp32), best(_candidates_bf16)
    return "bf16" if t16 * 1.5 < t32 else "fp32"


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
