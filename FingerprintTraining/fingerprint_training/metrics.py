"""Retrieval and verification metrics for subject fingerprints (pure numpy + scikit-learn).

* ``nway_kshot``: the Few-Shot Fingerprinting paper's N-way K-shot protocol (section 2.5):
  per episode N subjects, each with K supports and one query; every query ranks the N*K
  supports; Recall@K = relevant supports in the top K / K, Hit@R = a relevant support in the
  top R. Averaged over queries, then over episodes (Mean-Recall@K, Mean Hit@R).
  ``nway_kshot_from_distances`` runs the very same episodes on any distance (a matrix or a
  function), so pixel baselines are scored on identical episodes.
* ``retrieval_metrics``: Packhäuser-style whole-gallery leave-one-out retrieval: mAP@R,
  R-Precision and Precision@1; queries whose subject has no other image are excluded, but
  such images stay in the gallery as distractors. Computed block-wise.
* ``verification_metrics``: same- vs different-subject pairs, ROC AUC with a seeded bootstrap
  95 % interval, and accuracy / TPR / FPR at a distance threshold.
* ``cluster_distances``: MIASD / MIESD (mean intra- / inter-subject distance) as in the paper.

Distances: "euclidean" (the paper's L2 on raw embeddings) or "cosine" (1 - cosine similarity).
Labels can be any hashable values (strings or integers).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from subject_fingerprint.distances import METRICS, pairwise, row_distances

DISTANCES = METRICS  # "euclidean" | "cosine" (subject_fingerprint.distances)


def _labels(labels, n: Optional[int] = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    if n is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} embeddings")
    return labels


def _embeddings(embeddings) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"embeddings must be a 2D array (n, dim), got shape {e.shape}")
    return e


# -- N-way K-shot episodes ------------------------------------------------------------------------

def _candidate_queries(idx: np.ndarray, groups: Optional[np.ndarray], k_shot: int) -> np.ndarray:
    """Images of one subject that can be a query: with ``groups`` (modalities), a query needs
    at least K images of the subject in *other* groups (cross-modal supports); without
    groups, the subject needs K + 1 images and any image can be the query."""
    if groups is None:
        return idx if len(idx) >= k_shot + 1 else idx[:0]
    g = groups[idx]
    other = np.array([(g != gi).sum() for gi in g])
    return idx[other >= k_shot]


def _members(labels: np.ndarray) -> dict:
    """Image indices of every subject, in one pass (sorted subjects, ascending indices)."""
    values, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    bounds = np.cumsum(np.bincount(inverse.ravel(), minlength=len(values)))[:-1]
    return dict(zip(values.tolist(), np.split(order, bounds)))


def eligible_subjects(labels, k_shot: int, groups=None) -> list:
    """Subjects that can take part in a K-shot episode (sorted, for reproducible sampling)."""
    labels = _labels(labels)
    groups = None if groups is None else np.asarray(groups)
    return [s for s, idx in _members(labels).items()
            if len(_candidate_queries(idx, groups, k_shot))]


def sample_episodes(labels, n_way: int, k_shot: int, episodes: int = 100, seed: int = 0,
                    groups=None) -> list:
    """Draw the episodes of an N-way K-shot evaluation.

    Returns a list of ``(queries, supports)``: ``queries`` (N,) image indices, ``supports``
    (N, K) image indices, row i belonging to the subject of ``queries[i]``. Supports and
    query of a subject are drawn without replacement; with ``groups`` the supports come from
    groups (modalities) other than the query's. Episodes are independent (a subject can
    recur). Raises ``ValueError`` when fewer than N subjects are eligible.
    """
    labels = _labels(labels)
    n_way, k_shot, episodes = int(n_way), int(k_shot), int(episodes)
    if n_way < 2:
        raise ValueError("n_way must be at least 2")
    if k_shot < 1:
        raise ValueError("k_shot must be at least 1")
    if episodes < 1:
        raise ValueError("episodes must be at least 1")
    groups = None if groups is None else np.asarray(groups)
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    eligible = eligible_subjects(labels, k_shot, groups)
    if len(eligible) < n_way:
        need = f"at least {k_shot + 1} images" if groups is None else \
            f"a query with at least {k_shot} images in other modalities"
        raise ValueError(
            f"{n_way}-way {k_shot}-shot needs {n_way} subjects with {need}; "
            f"only {len(eligible)} subject(s) qualify")
    members = _members(labels)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        chosen = rng.choice(len(eligible), size=n_way, replace=False)
        queries = np.empty(n_way, dtype=np.int64)
        supports = np.empty((n_way, k_shot), dtype=np.int64)
        for row, c in enumerate(chosen):
            idx = members[eligible[c]]
            if groups is None:
                pick = rng.choice(idx, size=k_shot + 1, replace=False)
                queries[row], supports[row] = pick[0], pick[1:]
            else:
                q = rng.choice(_candidate_queries(idx, groups, k_shot))
                others = idx[groups[idx] != groups[q]]
                queries[row] = q
                supports[row] = rng.choice(others, size=k_shot, replace=False)
        out.append((queries, supports))
    return out


def score_episode(dist: np.ndarray, k_shot: int, max_r: int = 5, rng=None):
    """Recall@K and Hit@R (R = 1..max_r) of one episode from its query x support distances.

    ``dist`` is (N, N*K) with the supports in subject-major order (supports of query i in
    columns i*K .. i*K+K-1). Returns (per-query recall (N,), per-query hits (N, max_r)).
    Ties in distance are broken at random (``rng``) rather than by position, so a model that
    gives everything the same distance scores chance, not a perfect result.
    """
    n = dist.shape[0]
    owner = np.repeat(np.arange(n), k_shot)
    if rng is not None:
        perm = rng.permutation(dist.shape[1])
        dist, owner = dist[:, perm], owner[perm]
    order = np.argsort(dist, axis=1, kind="stable")
    rel = owner[order] == np.arange(n)[:, None]
    recall = rel[:, :k_shot].sum(1) / float(k_shot)
    cum = np.cumsum(rel, axis=1) > 0
    r_idx = np.minimum(np.arange(1, max_r + 1), rel.shape[1]) - 1
    hits = cum[:, r_idx]
    return recall, hits


def _episode_summary(n_way, k_shot, episodes, max_r, recalls, hits, eligible, distance):
    recalls = np.asarray(recalls)            # (episodes,)
    hits = np.asarray(hits)                  # (episodes, max_r)
    return {
        "n_way": int(n_way),
        "k_shot": int(k_shot),
        "episodes": int(episodes),
        "mean_recall_at_k": float(recalls.mean()),
        "std_recall_at_k": float(recalls.std()),
        "mean_hit_at_r": {str(r + 1): float(hits[:, r].mean()) for r in range(max_r)},
        "std_hit_at_r": {str(r + 1): float(hits[:, r].std()) for r in range(max_r)},
        "eligible_subjects": int(eligible),
        "distance": distance,
    }


def nway_kshot_from_distances(distances, labels, n_way: int, k_shot: int, episodes: int = 100,
                              seed: int = 0, max_r: int = 5, groups=None,
                              name: str = "custom") -> dict:
    """N-way K-shot on any distance, with exactly the episodes of ``nway_kshot`` for the
    same labels / n_way / k_shot / episodes / seed / groups.

    ``distances`` is a full (n, n) distance matrix, or a callable
    ``pairwise_fn(query_index, support_indices) -> distances`` (1D, one per support) used
    for expensive measures such as SSIM.
    """
    labels = _labels(labels)
    max_r = int(max_r)
    if max_r < 1:
        raise ValueError("max_r must be at least 1")
    eps = sample_episodes(labels, n_way, k_shot, episodes, seed, groups)
    if callable(distances):
        fn = distances

        def block(q, s):
            return np.stack([np.asarray(fn(int(qi), s), dtype=np.float64) for qi in q])
    else:
        matrix = np.asarray(distances, dtype=np.float64)
        if matrix.shape != (len(labels), len(labels)):
            raise ValueError(f"distance matrix shape {matrix.shape} does not match "
                             f"{len(labels)} labels")

        def block(q, s):
            return matrix[np.ix_(q, s)]
    # A separate stream for tie-breaking so the episodes themselves match nway_kshot.
    tie_rng = np.random.default_rng([int(seed), 1])
    recalls, hits = [], []
    for queries, supports in eps:
        flat = supports.reshape(-1)
        r, h = score_episode(block(queries, flat), k_shot, max_r, tie_rng)
        recalls.append(r.mean())
        hits.append(h.mean(0))
    return _episode_summary(n_way, k_shot, episodes, max_r, recalls, hits,
                            len(eligible_subjects(labels, k_shot, groups)), name)


def nway_kshot(embeddings, labels, n_way: int, k_shot: int, episodes: int = 100, seed: int = 0,
               max_r: int = 5, groups=None, distance: str = "euclidean") -> dict:
    """Mean-Recall@K and Mean Hit@R of the N-way K-shot protocol on embeddings.

    Returns ``{"n_way", "k_shot", "episodes", "mean_recall_at_k", "std_recall_at_k",
    "mean_hit_at_r": {"1": .., .., str(max_r): ..}, "std_hit_at_r", "eligible_subjects",
    "distance"}`` (std = across episodes). Raises ``ValueError`` when fewer than ``n_way``
    subjects have K + 1 images (or, with ``groups``, a query with K other-modality images).
    """
    e = _embeddings(embeddings)
    labels = _labels(labels, len(e))
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; use one of {', '.join(DISTANCES)}")

    eps = sample_episodes(labels, n_way, k_shot, episodes, seed, groups)
    tie_rng = np.random.default_rng([int(seed), 1])
    recalls, hits = [], []
    for queries, supports in eps:
        d = pairwise(e[queries], e[supports.reshape(-1)], distance)
        r, h = score_episode(d, k_shot, int(max_r), tie_rng)
        recalls.append(r.mean())
        hits.append(h.mean(0))
    return _episode_summary(n_way, k_shot, episodes, int(max_r), recalls, hits,
                            len(eligible_subjects(labels, k_shot, groups)), distance)


# -- whole-gallery leave-one-out retrieval --------------------------------------------------------

def _knn_from_blocks(block_fn, n: int, block_size: int):
    """A ``knn_func`` for PML's AccuracyCalculator that ranks by ``block_fn`` distances.

    The calculator is given image indices as its "embeddings", so the same code scores
    learned embeddings and pixel baselines; the query itself is left out, ties keep index
    order (a stable sort of the k nearest).
    """
    import torch

    def knn(query, k, reference, ref_includes_query=False):
        q_all = query[:, 0].round().long().numpy()
        k = min(int(k), n - 1)
        dist_out, idx_out = [], []
        for start in range(0, len(q_all), block_size):
            q = q_all[start:start + block_size]
            d = np.array(block_fn(q), dtype=np.float64)
            d[np.arange(len(q)), q] = np.inf  # leave the query itself out
            part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < n else np.argsort(d, axis=1)
            pd = np.take_along_axis(d, part, 1)
            order = np.take_along_axis(part, np.argsort(pd, axis=1, kind="stable"), 1)
            dist_out.append(np.take_along_axis(d, order, 1))
            idx_out.append(order)
        return torch.from_numpy(np.concatenate(dist_out)), torch.from_numpy(np.concatenate(idx_out))

    return knn


def retrieval_metrics(embeddings=None, labels=None, distance: str = "euclidean",
                      block_size: int = 1024, block_fn: Optional[Callable] = None) -> dict:
    """Leave-one-out retrieval over the whole gallery (Packhäuser et al.), scored by
    pytorch-metric-learning's ``AccuracyCalculator``.

    Every image with at least one other image of its subject is a query against all other
    images (single-image subjects remain as distractors). With R = number of other images of
    the query's subject: R-Precision = relevant among the R nearest / R; mAP@R = mean over
    i <= R of precision@i at relevant positions, divided by R; Precision@1 = nearest is
    relevant. ``block_fn(query_indices) -> (len, n)`` distances may replace the embeddings
    (baselines). Returns {"map_at_r", "r_precision", "precision_at_1", "queries", "gallery"}.
    """
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    labels = _labels(labels)
    n = len(labels)
    if block_fn is None:
        e = _embeddings(embeddings)
        if len(e) != n:
            raise ValueError(f"{n} labels for {len(e)} embeddings")

        def block_fn(q):
            return pairwise(e[q], e, distance)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    queries = int((counts[inverse] >= 2).sum())
    if queries == 0:
        raise ValueError("no subject has two or more images: leave-one-out retrieval is undefined")
    # Keep a block's distance matrix near 160 MB (float64) whatever the gallery size.
    block_size = max(1, min(int(block_size), 20_000_000 // max(n, 1)))
    calc = AccuracyCalculator(include=("mean_average_precision_at_r", "r_precision",
                                       "precision_at_1"),
                              k="max_bin_count", device=torch.device("cpu"),
                              knn_func=_knn_from_blocks(block_fn, n, block_size))
    index = torch.arange(n, dtype=torch.float64)[:, None]
    acc = calc.get_accuracy(index, torch.from_numpy(inverse), ref_includes_query=True)
    return {"map_at_r": float(acc["mean_average_precision_at_r"]),
            "r_precision": float(acc["r_precision"]),
            "precision_at_1": float(acc["precision_at_1"]),
            "queries": queries, "gallery": int(n)}


# -- verification ---------------------------------------------------------------------------------

def pair_indices(labels, max_negatives: Optional[int] = 200000, seed: int = 0,
                 max_positives: Optional[int] = None):
    """Same-subject pairs (i < j; all of them, or a seeded sample of ``max_positives``) and a
    seeded sample of different-subject pairs (all of them when there are at most
    ``max_negatives``). Returns (pos (P, 2), neg (Q, 2)) index arrays."""
    labels = _labels(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    _, inv = np.unique(labels, return_inverse=True)
    pos = []
    for s in np.unique(inv):
        idx = np.flatnonzero(inv == s)
        if len(idx) > 1:
            a, b = np.triu_indices(len(idx), 1)
            pos.append(np.stack([idx[a], idx[b]], 1))
    pos = np.concatenate(pos) if pos else np.zeros((0, 2), dtype=np.int64)
    if max_positives is not None and len(pos) > max_positives:
        pos = pos[np.sort(rng.choice(len(pos), int(max_positives), replace=False))]
    counts = np.bincount(inv)
    n_neg = (n * (n - 1) - int((counts * (counts - 1)).sum())) // 2
    if max_negatives is None or n_neg <= max_negatives:
        a, b = np.triu_indices(n, 1)
        keep = inv[a] != inv[b]
        neg = np.stack([a[keep], b[keep]], 1)
    else:
        # Rejection sampling of distinct unordered pairs: cheap when negatives dominate.
        want = int(max_negatives)
        seen: set = set()
        while len(seen) < want:
            m = 2 * (want - len(seen)) + 16
            a = rng.integers(0, n, m)
            b = rng.integers(0, n, m)
            ok = inv[a] != inv[b]
            for x, y in zip(np.minimum(a, b)[ok], np.maximum(a, b)[ok]):
                seen.add((int(x), int(y)))
                if len(seen) >= want:
                    break
        neg = np.array(sorted(seen), dtype=np.int64)
    return pos.astype(np.int64), neg.astype(np.int64)


def pair_distances(embeddings, pairs, distance: str = "euclidean") -> np.ndarray:
    """Distance of each (i, j) pair of rows."""
    e = _embeddings(embeddings)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return row_distances(e, e, pairs[:, 0], pairs[:, 1], distance)


def roc_auc(pos_distances, neg_distances) -> float:
    """ROC AUC of "same subject" scored by negative distance (sklearn)."""
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(pos_distances, dtype=np.float64)
    neg = np.asarray(neg_distances, dtype=np.float64)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    return float(roc_auc_score(y, -np.concatenate([pos, neg])))


def bootstrap_auc(pos_distances, neg_distances, n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95):
    """Percentile bootstrap interval of the AUC: resample all pairs with replacement
    (indices 0..n-1 inclusive, unlike the seed code's off-by-one), skipping resamples
    that lack one class. Returns (low, high).

    A resample is scored by ``roc_auc_score`` with each pair weighted by how often it was
    drawn, which equals the AUC of the resample itself.
    """
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(pos_distances, dtype=np.float64)
    neg = np.asarray(neg_distances, dtype=np.float64)
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    score = -np.concatenate([pos, neg])
    rng = np.random.default_rng(seed)
    n = len(y)
    aucs = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, n, n)  # high is exclusive: every index can be drawn
        weight = np.bincount(idx, minlength=n).astype(np.float64)
        drawn = weight > 0
        if y[drawn].min() == y[drawn].max():
            continue  # one class only: the AUC is undefined
        aucs.append(roc_auc_score(y[drawn], score[drawn], sample_weight=weight[drawn]))
    if not aucs:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1.0 - alpha))


def threshold_metrics(pos_distances, neg_distances, threshold: float) -> dict:
    """Decision "same subject" when distance <= threshold: accuracy, TPR, FPR (and counts).
    Accuracy is balanced-free, over all given pairs."""
    pos = np.asarray(pos_distances, dtype=np.float64)
    neg = np.asarray(neg_distances, dtype=np.float64)
    tp = int((pos <= threshold).sum())
    fp = int((neg <= threshold).sum())
    tn = len(neg) - fp
    total = len(pos) + len(neg)
    return {
        "threshold": float(threshold),
        "accuracy": (tp + tn) / total if total else float("nan"),
        "balanced_accuracy": 0.5 * ((tp / len(pos) if len(pos) else 0.0)
                                    + (tn / len(neg) if len(neg) else 0.0)),
        "tpr": tp / len(pos) if len(pos) else float("nan"),
        "fpr": fp / len(neg) if len(neg) else float("nan"),
        "positives": int(len(pos)),
        "negatives": int(len(neg)),
    }


def verification_metrics(embeddings, labels, distance: str = "euclidean", threshold=None,
                         max_negatives: Optional[int] = 200000, n_boot: int = 1000,
                         seed: int = 0) -> dict:
    """Pair verification: AUC with bootstrap 95 % CI, and (given a threshold) accuracy,
    TPR and FPR. All positive pairs; all or ``max_negatives`` sampled negative pairs."""
    e = _embeddings(embeddings)
    labels = _labels(labels, len(e))
    pos_pairs, neg_pairs = pair_indices(labels, max_negatives=max_negatives, seed=seed)
    pos = pair_distances(e, pos_pairs, distance)
    neg = pair_distances(e, neg_pairs, distance)
    return verification_from_distances(pos, neg, threshold=threshold, n_boot=n_boot, seed=seed)


def verification_from_distances(pos, neg, threshold=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """``verification_metrics`` on precomputed positive / negative pair distances."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"verification needs same- and different-subject pairs "
                         f"(have {len(pos)} and {len(neg)})")
    lo, hi = bootstrap_auc(pos, neg, n_boot=n_boot, seed=seed)
    out = {"auc": roc_auc(pos, neg), "auc_ci95": [lo, hi], "bootstrap": int(n_boot),
           "positive_pairs": int(len(pos)), "negative_pairs": int(len(neg)),
           "pos_distance_mean": float(pos.mean()), "neg_distance_mean": float(neg.mean())}
    if threshold is not None:
        out["at_threshold"] = threshold_metrics(pos, neg, threshold)
    return out


# -- MIASD / MIESD --------------------------------------------------------------------------------

def cluster_distances(embeddings, labels, distance: str = "euclidean") -> dict:
    """MIASD / MIESD as in the Few-Shot Fingerprinting paper (Figure 2).

    For each subject with more than one image: centroid = mean embedding; intra = mean
    distance of its embeddings to its centroid; inter = mean distance of its centroid to the
    centroids of all other such subjects. Returns means and standard deviations over subjects
    plus the per-subject values (for histograms).
    """
    e = _embeddings(embeddings)
    labels = _labels(labels, len(e))
    groups = [idx for idx in _members(labels).values() if len(idx) > 1]
    if len(groups) < 2:
        raise ValueError(f"MIASD/MIESD need two subjects with more than one image "
                         f"(have {len(groups)})")
    centroids = np.stack([e[idx].mean(0) for idx in groups])
    intra = np.array([pairwise(e[idx], c[None], distance)[:, 0].mean()
                      for idx, c in zip(groups, centroids)])
    m = len(groups)
    # Row sums of the centroid distance matrix in blocks (m can be tens of thousands),
    # leaving out each centroid's (rounding-level) distance to itself.
    step = max(1, 20_000_000 // m)
    sums = []
    for i in range(0, m, step):
        d = pairwise(centroids[i:i + step], centroids, distance)
        d[np.arange(len(d)), np.arange(i, i + len(d))] = 0.0
        sums.append(d.sum(1))
    inter = np.concatenate(sums) / (m - 1)
    return {"miasd": float(intra.mean()), "miasd_std": float(intra.std()),
            "miesd": float(inter.mean()), "miesd_std": float(inter.std()),
            "subjects": int(m), "intra": intra.tolist(), "inter": inter.tolist()}
