"""From embedded datasets to decided subject pairs: score every subject pair from all its
images, turn the score into a likelihood ratio and a posterior with the prior of the
comparison, and report the pairs the decision rule keeps.

Kept apart from ``engine`` (the all-pairs image kernel): this module only calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .. import posterior as post
from ..distances import euclidean
from . import engine

# Above this many subject pairs in one comparison, only pairs with a close image pair are
# scored (the others have a negligible likelihood ratio); below it every pair is scored.
DENSE_LIMIT = 10_000_000
# Image pairs a large block scores at most (about): the closest ones.
MAX_CANDIDATE_IMAGE_PAIRS = 20_000_000
# Image pairs shown per subject pair in the report.
MAX_SHOWN_IMAGE_PAIRS = 8
# Pairs below this posterior are not kept as candidates (unless a threshold reports them).
KEEP_POSTERIOR = 1e-6


@dataclass
class ScoredPair:
    """A subject pair with its evidence."""

    a: int
    subject_a: str
    b: int
    subject_b: str
    score: float  # symmetric nearest-image distance
    log_lr: float
    posterior: float
    min_distance: float = math.inf
    n_close_pairs: int = 0
    image_pairs: List[engine.ImagePair] = field(default_factory=list)  # closest first
    exact_duplicate: bool = False
    reported: bool = False

    @property
    def likelihood_ratio(self) -> float:
        return math.exp(min(self.log_lr, 700.0))

    @property
    def within(self) -> bool:
        return self.a == self.b

    @property
    def best(self) -> engine.ImagePair:
        return self.image_pairs[0]


@dataclass
class Comparison:
    """One block of the run (two datasets, or one dataset with itself)."""

    a: int
    b: int
    n_pairs: int  # candidate subject pairs
    estimated_matches: float
    prior: float
    scores: np.ndarray  # scores of every pair scored (for the histogram)


@dataclass
class Decision:
    pairs: List[ScoredPair]  # every pair kept as a candidate, most probable first
    comparisons: List[Comparison]
    link: post.PairLink
    reference: post.DataReference
    rule: str  # "max-false-pairs", "--threshold" or "--max-fpr"
    max_false_pairs: Optional[float]
    expected_false_pairs: float
    level: Optional[float]  # lowest posterior reported (posterior rule)
    threshold: Optional[float]  # image distance threshold (threshold rules)
    close_distance: float  # image pairs closer than this count as close
    check: post.SelfCheck = None

    @property
    def reported(self) -> List[ScoredPair]:
        return [p for p in self.pairs if p.reported]


def _subject_index(ds) -> Tuple[np.ndarray, list]:
    return post.group_rows(ds.subject_ids.tolist())


def _score_block(da, db, same: bool, loose: float):
    """(list of (A, B, score)) for the subject pairs of one block, and the pair count."""
    ca, ka = _subject_index(da)
    cb, kb = _subject_index(db)
    n_pairs = len(ka) * (len(ka) - 1) // 2 if same else len(ka) * len(kb)
    if n_pairs == 0:
        return [], 0, ka, kb, None
    if len(ka) * len(kb) <= DENSE_LIMIT:
        scores = post.score_matrix(np.asarray(da.embeddings, np.float64), ca,
                                   np.asarray(db.embeddings, np.float64), cb, len(ka), len(kb))
        if same:
            np.fill_diagonal(scores, np.inf)
            ii, jj = np.triu_indices(len(ka), 1)
        else:
            ii, jj = np.indices(scores.shape).reshape(2, -1)
        # Mutual nearest subjects: an upper bound on the pairs that can be the same subject.
        row_best, col_best = scores.argmin(1), scores.argmin(0)
        mnn = np.flatnonzero(col_best[row_best] == np.arange(len(ka)))
        mnn_scores = scores[mnn, row_best[mnn]]
        return (list(zip(ii.tolist(), jj.tolist(), scores[ii, jj].tolist())), n_pairs, ka, kb,
                mnn_scores)
    # Large block: only subject pairs with an image pair closer than `loose` are scored.
    ii, jj, _ = engine.close_pairs(da.embeddings, db.embeddings, loose, same=same)
    keys = set()
    for i, j in zip(ca[ii].tolist(), cb[jj].tolist()):
        if same and i == j:
            continue
        keys.add((min(i, j), max(i, j)) if same else (i, j))
    rows_a = [np.flatnonzero(ca == c) for c in range(len(ka))]
    rows_b = rows_a if same else [np.flatnonzero(cb == c) for c in range(len(kb))]
    out = [(i, j, post.pair_score(da.embeddings[rows_a[i]], db.embeddings[rows_b[j]]))
           for i, j in sorted(keys)]
    return out, n_pairs, ka, kb, None


def _evidence(pair: ScoredPair, datasets, close: float) -> None:
    """Fill the image pairs (closest first), the closest distance and the close count."""
    da, db = datasets[pair.a], datasets[pair.b]
    ra = np.flatnonzero(da.subject_ids == pair.subject_a)
    rb = np.flatnonzero(db.subject_ids == pair.subject_b)
    d = euclidean(da.embeddings[ra], db.embeddings[rb])
    order = np.argsort(d, axis=None, kind="stable")
    hashes_a, hashes_b = da.content_hashes[ra], db.content_hashes[rb]
    shown = []
    for flat in order[:MAX_SHOWN_IMAGE_PAIRS].tolist():
        i, j = divmod(flat, d.shape[1])
        exact = bool(hashes_a[i]) and hashes_a[i] == hashes_b[j]
        shown.append(engine.ImagePair(pair.a, int(ra[i]), pair.b, int(rb[j]),
                                      0.0 if exact else float(d[i, j]), exact))
    pair.image_pairs = shown
    pair.min_distance = float(min(d.min(), 0.0 if any(p.exact_duplicate for p in shown) else np.inf))
    pair.n_close_pairs = int(np.sum(d <= close))


def decide(datasets, link: post.PairLink, reference: post.DataReference,
           max_false_pairs: Optional[float] = None, threshold: Optional[float] = None,
           rule: str = "max-false-pairs", exact: Optional[List[engine.ImagePair]] = None
           ) -> Decision:
    """Score, weigh and decide every subject pair of ``datasets``.

    Default rule: report the most probable pairs while the expected number of false pairs
    (sum of 1 - posterior) is at most ``max_false_pairs``. With ``threshold`` (an image
    distance) instead, report the pairs whose closest image pair is within it, as before;
    their posteriors and expected false pairs are reported all the same.
    """
    exact = engine.exact_duplicates(datasets) if exact is None else exact
    exact_keys = set()
    for p in exact:
        sa, sb = datasets[p.a].subject_ids[p.i], datasets[p.b].subject_ids[p.j]
        if (p.a, sa) != (p.b, sb):
            left, right = sorted([(p.a, sa), (p.b, sb)])
            exact_keys.add((left, right))

    # Image pairs closer than where the likelihood ratio is 1 are "close".
    close = threshold if threshold is not None else max(link.score_for_log_lr(0.0), 0.0)

    def loose_for(da, db) -> float:
        """Image distance below which pairs of a large block are scored: the different-ID
        quantile that keeps about MAX_CANDIDATE_IMAGE_PAIRS image pairs (at most 5 %)."""
        if not len(reference.different_images):
            return close
        share = min(0.05, MAX_CANDIDATE_IMAGE_PAIRS / max(len(da) * len(db), 1))
        return float(np.quantile(reference.different_images, share))
    pairs: List[ScoredPair] = []
    comparisons: List[Comparison] = []
    for a in range(len(datasets)):
        for b in range(a, len(datasets)):
            same = a == b
            scored, n_pairs, ka, kb, mnn = _score_block(datasets[a], datasets[b], same,
                                                        loose_for(datasets[a], datasets[b]))
            if not n_pairs:
                continue
            scores = np.array([s for _, _, s in scored])
            log_lr = link.log_lr(scores) if len(scores) else np.zeros(0)
            cap = min(len(ka), len(kb)) if not same else len(ka) / 2
            if mnn is not None:
                # Mutually nearest subjects with a likelihood ratio above 1 (each symmetric
                # pair of one dataset is counted twice there).
                cap = min(cap, max(float(np.sum(link.log_lr(mnn) > 0)) / (2 if same else 1), 1.0))
            # Pairs sharing an exact duplicate image are known matches: kept out of the fit.
            known = np.array([tuple(sorted([(a, ka[i]), (b, kb[j])])) in exact_keys
                              for i, j, _ in scored], dtype=bool)
            n_known = int(known.sum())
            matches = post.estimate_matches(log_lr[~known], n_pairs - n_known,
                                            cap=max(cap - n_known, 1.0)) if n_pairs > n_known else 0.0
            prior = matches / max(n_pairs - n_known, 1)
            matches += n_known
            probs = np.atleast_1d(post.posterior(log_lr, prior))
            if not same:
                # Across datasets, the different-ID pairs inside them are an empirical null.
                probs = np.minimum(probs, post.null_cap(scores, n_pairs, reference.different))
            comparisons.append(Comparison(a, b, n_pairs, matches, prior, scores))
            for (i, j, s), llr, pr in zip(scored, log_lr.tolist(), probs.tolist()):
                sa, sb = ka[i], kb[j]
                left, right = sorted([(a, sa), (b, sb)])
                is_exact = (left, right) in exact_keys
                pairs.append(ScoredPair(left[0], left[1], right[0], right[1], s, llr,
                                        1.0 if is_exact else pr, exact_duplicate=is_exact))
    if threshold is not None:
        # The old rule: every subject pair with an image pair within the threshold.
        close_keys = set()
        for p in engine.find_pairs(datasets, threshold):
            sa, sb = datasets[p.a].subject_ids[p.i], datasets[p.b].subject_ids[p.j]
            if (p.a, sa) != (p.b, sb):
                close_keys.add(tuple(sorted([(p.a, sa), (p.b, sb)])))
        for p in pairs:
            p.reported = ((p.a, p.subject_a), (p.b, p.subject_b)) in close_keys or p.exact_duplicate
        expected = float(sum(1.0 - p.posterior for p in pairs if p.reported))
        level = None
    else:
        mask, expected = post.decide([p.posterior for p in pairs], max_false_pairs)
        for p, m in zip(pairs, mask.tolist()):
            p.reported = m or p.exact_duplicate
        reported = [p.posterior for p in pairs if p.reported]
        level = min(reported) if reported else None
    # Keep the reported pairs and the plausible ones (the report shows those not confirmed).
    pairs = [p for p in pairs if p.reported or p.posterior >= KEEP_POSTERIOR]
    pairs.sort(key=lambda p: (-p.reported, -p.posterior, p.score))
    for p in pairs:
        if p.reported or p.posterior >= 0.01:
            _evidence(p, datasets, close)
    decision = Decision(pairs, comparisons, link, reference, rule, max_false_pairs, expected,
                        level, threshold, close)
    cross = [c for c in comparisons if c.a != c.b]
    prior = cross[0].prior if cross else (comparisons[0].prior if comparisons else 0.0)
    check_level = level if level is not None else (
        1.0 - (max_false_pairs or 1e-3) if threshold is None else None)
    decision.check = post.self_check(reference, link, prior, check_level)
    return decision
