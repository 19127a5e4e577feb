"""Same-subject posteriors for subject pairs: score, likelihood ratio, prior, decision.

A *subject pair* is scored from all its images: for every image, the distance to the closest
image of the other subject, averaged over the images of both subjects (a symmetric
nearest-image distance; for one image each it is the image distance). The likelihood ratio
``LR(s) = p(s | same) / p(s | different)`` is a logistic link in the score, fitted on the data
at hand (same-ID halves vs different-ID subject pairs inside each dataset, see
:func:`fit_on_data`) and combined with the model's stored calibration (image level, fitted on a
balanced set, so its logit is a log likelihood ratio). The prior comes from the comparison:
the number of candidate pairs and the number of same-subject pairs among them, estimated from
the data by a two-component mixture fit (:func:`estimate_matches`). The posterior follows
from both, and :func:`decide` reports the most probable pairs while the expected number of
false ones, the sum of ``1 - posterior``, stays within a target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np

from .distances import euclidean

# Pseudo-count of same-ID subjects the stored calibration is worth when combined with the
# data's: with fewer same-ID subjects than this in the data, the model's link weighs more.
STORED_WEIGHT = 10
# Below this many same-ID subjects the data alone cannot calibrate the link.
MIN_SAME_FOR_FIT = 5
# Different-ID subject pairs used per dataset for the data calibration (all if fewer).
MAX_REFERENCE_PAIRS = 50000
# The default rule reports no pair less likely the same subject than this.
MIN_POSTERIOR = 0.5
# Self-check: warn below these.
MIN_AUC = 0.80
MIN_RECALL = 0.20


def _logistic(z):
    z = np.clip(np.asarray(z, dtype=np.float64), -500, 500)
    ez = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + ez), ez / (1.0 + ez))


# -- subject-pair scores -------------------------------------------------------------------------

def group_rows(labels) -> Tuple[np.ndarray, list]:
    """``(codes, keys)``: an int code per row and the distinct labels, in first-seen order."""
    keys: dict = {}
    codes = np.array([keys.setdefault(v, len(keys)) for v in list(labels)], dtype=np.int64)
    return codes, list(keys)


def score_matrix(x: np.ndarray, x_codes: np.ndarray, y: np.ndarray, y_codes: np.ndarray,
                 n_x: Optional[int] = None, n_y: Optional[int] = None,
                 block: int = 2048) -> np.ndarray:
    """Symmetric nearest-image score of every subject of x against every subject of y.

    ``score[A, B] = (sum_{i in A} min_{j in B} d_ij + sum_{j in B} min_{i in A} d_ij)
    / (|A| + |B|)``. Computed in row blocks, so memory is (block x len(y)) plus the
    (subjects x subjects) result.
    """
    n_x = int(x_codes.max()) + 1 if n_x is None else n_x
    n_y = int(y_codes.max()) + 1 if n_y is None else n_y
    sum_xy = np.zeros((n_x, n_y))  # sum over A's images of their nearest distance in B
    min_yx = np.full((len(y), n_x), np.inf)  # each y image's nearest distance in each A
    for lo in range(0, len(x), block):
        d = euclidean(x[lo:lo + block], y)
        codes = x_codes[lo:lo + block]
        near_b = np.full((len(d), n_y), np.inf)
        np.minimum.at(near_b.T, y_codes, d.T)  # per x image, nearest in each subject of y
        np.add.at(sum_xy, codes, near_b)
        np.minimum.at(min_yx.T, codes, d)
    sum_yx = np.zeros((n_y, n_x))
    np.add.at(sum_yx, y_codes, min_yx)
    count_x = np.bincount(x_codes, minlength=n_x).astype(float)
    count_y = np.bincount(y_codes, minlength=n_y).astype(float)
    return (sum_xy + sum_yx.T) / (count_x[:, None] + count_y[None, :])


def pair_score(x: np.ndarray, y: np.ndarray) -> float:
    """Score of one subject pair from its images (rows of x and of y)."""
    d = euclidean(x, y)
    return float((d.min(1).sum() + d.min(0).sum()) / (d.shape[0] + d.shape[1]))


# -- calibration on the data at hand ---------------------------------------------------------------

@dataclass
class DataReference:
    """Subject-pair scores of known truth inside the datasets."""

    same: np.ndarray  # one score per subject with >= 2 images: its images split in two halves
    different: np.ndarray  # scores of different-ID subject pairs within a dataset
    same_images: np.ndarray  # image distances of same-ID pairs (for the histogram)
    different_images: np.ndarray  # image distances of different-ID pairs within a dataset
    different_drawn: bool = False  # True when the different-ID pairs are a sample

    @property
    def auc(self) -> Optional[float]:
        """P(score of a same-ID pair < score of a different-ID pair) (ties count half)."""
        if len(self.same) == 0 or len(self.different) == 0:
            return None
        diff = np.sort(self.different)
        below = np.searchsorted(diff, self.same, side="left")
        ties = np.searchsorted(diff, self.same, side="right") - below
        return float(np.mean((len(diff) - below - ties + 0.5 * ties) / len(diff)))


def reference_scores(datasets, seed: int = 0, max_pairs: int = MAX_REFERENCE_PAIRS) -> DataReference:
    """Same-ID and different-ID subject-pair scores inside each dataset.

    Same-ID: each subject with two or more images has them split at random into two halves,
    scored as if they were two subjects (what a subject split over two exports looks like).
    Different-ID: pairs of subjects of one dataset. Among these are the few duplicates the run
    looks for; the logistic fit and the quantiles used are not moved by a handful of them.
    """
    rng = np.random.default_rng(seed)
    same, different, same_img, diff_img = [], [], [], []
    drawn = False
    for ds in datasets:
        emb = np.asarray(ds.embeddings, dtype=np.float64)
        codes, keys = group_rows(ds.subject_ids.tolist())
        members = [np.flatnonzero(codes == c) for c in range(len(keys))]
        for rows in members:
            if len(rows) >= 2:
                rows = rng.permutation(rows)
                half = len(rows) // 2
                same.append(pair_score(emb[rows[:half]], emb[rows[half:]]))
                d = euclidean(emb[rows])
                same_img.extend(d[np.triu_indices(len(rows), 1)].tolist())
        n = len(keys)
        if n < 2:
            continue
        # Subjects drawn (without replacement) so that the pairs stay under max_pairs.
        keep_subjects = n if n * (n - 1) // 2 <= max_pairs else int(math.sqrt(2 * max_pairs))
        chosen = np.sort(rng.choice(n, size=keep_subjects, replace=False)) if keep_subjects < n \
            else np.arange(n)
        drawn = drawn or keep_subjects < n
        remap = np.full(n, -1)
        remap[chosen] = np.arange(len(chosen))
        rows = np.flatnonzero(remap[codes] >= 0)
        sub_codes = remap[codes[rows]]
        scores = score_matrix(emb[rows], sub_codes, emb[rows], sub_codes,
                              len(chosen), len(chosen))
        iu = np.triu_indices(len(chosen), 1)
        different.extend(scores[iu].tolist())
        d = euclidean(emb[rows])
        ii, jj = np.triu_indices(len(rows), 1)
        other = sub_codes[ii] != sub_codes[jj]
        diff_img.extend(d[ii[other], jj[other]].tolist())
    return DataReference(np.array(same), np.array(different), np.array(same_img),
                         np.array(diff_img), drawn)


@dataclass(frozen=True)
class DataFit:
    """Likelihood ratio measured on the data: same-ID scores ~ Normal(mu1, sd1); the lower
    tail of the different-ID scores ~ Normal(mu0, sd0), fitted to its empirical quantiles
    (a normal probability plot of the lower fifth), which follows the tail where the
    decisions are made rather than the bulk. The ratio is made monotone (a closer pair is
    never less likely the same subject, a farther one never more)."""

    mu1: float
    sd1: float
    mu0: float
    sd0: float

    @property
    def vertex(self) -> Tuple[float, float]:
        """(score, curvature sign) of the quadratic log LR's turning point."""
        a = 1 / self.sd0 ** 2 - 1 / self.sd1 ** 2
        if a == 0:
            return math.nan, 0.0
        return float((self.mu0 / self.sd0 ** 2 - self.mu1 / self.sd1 ** 2) / a), float(np.sign(a))

    def log_lr(self, scores):
        """Never rising with the score: a narrower same-ID spread makes the quadratic peak,
        held to its left; a wider one makes it dip, held to its right."""
        s = np.asarray(scores, dtype=np.float64)
        v, sign = self.vertex
        if sign < 0:
            s = np.maximum(s, v)
        elif sign > 0:
            s = np.minimum(s, v)
        return (-0.5 * ((s - self.mu1) / self.sd1) ** 2 + 0.5 * ((s - self.mu0) / self.sd0) ** 2
                + math.log(self.sd0 / self.sd1))


def fit_data(same: np.ndarray, different: np.ndarray) -> DataFit:
    from scipy.stats import norm

    same = np.asarray(same, dtype=np.float64)
    diff = np.sort(np.asarray(different, dtype=np.float64))
    # Robust location and spread of the same-ID scores (a few odd splits do not move them).
    mu1 = float(np.median(same))
    sd1 = float(max(1.4826 * np.median(np.abs(same - mu1)), np.std(same) * 0.5, 1e-6))
    lo = max(3.0 / len(diff), 1e-3)
    probs = np.geomspace(lo, 0.2, 12) if lo < 0.2 else np.array([0.1, 0.2])
    z = norm.ppf(probs)
    q = np.quantile(diff, probs)
    sd0, mu0 = np.polyfit(z, q, 1)
    if not sd0 > 0:
        mu0, sd0 = float(np.median(diff)), float(max(np.std(diff), 1e-6))
    return DataFit(mu1, sd1, float(mu0), float(sd0))


@dataclass(frozen=True)
class PairLink:
    """log LR(score): the data's fit, the model's stored logistic link, or a weighted
    average of both (log-linear pooling), and where it came from."""

    data: Optional[DataFit]
    coef: Optional[float]  # the model's stored link: log LR = coef * d + intercept
    intercept: Optional[float]
    source: str  # "data", "model" or "data+model"
    data_weight: float = 0.0
    details: dict = field(default_factory=dict, compare=False)

    def log_lr(self, scores):
        s = np.asarray(scores, dtype=np.float64)
        out = np.zeros(s.shape)
        if self.data is not None and self.data_weight > 0:
            out = out + self.data_weight * self.data.log_lr(s)
        if self.coef is not None and self.data_weight < 1:
            out = out + (1 - self.data_weight) * (self.coef * s + self.intercept)
        return out

    def score_for_log_lr(self, log_lr: float) -> float:
        """Largest score whose log LR is still >= ``log_lr`` (the ratio falls with the score)."""
        grid = np.linspace(0.0, 4.0, 4001)
        values = self.log_lr(grid)
        above = np.flatnonzero(values >= log_lr)
        return float(grid[above[-1]]) if len(above) else 0.0

    def to_dict(self) -> dict:
        d = {"source": self.source, "data_weight": round(self.data_weight, 4)}
        if self.data is not None:
            d["data_fit"] = {k: getattr(self.data, k) for k in ("mu1", "sd1", "mu0", "sd0")}
        if self.coef is not None:
            d["model_link"] = {"coef": self.coef, "intercept": self.intercept}
        return {**d, **self.details}


def combine(reference: DataReference, stored=None) -> PairLink:
    """The link used for the run: the data's, the model's stored one, or both weighted by how
    many same-ID subjects the data has. Raises ValueError when neither is usable."""
    n_same = len(reference.same)
    data = None
    if n_same >= MIN_SAME_FOR_FIT and len(reference.different) >= 20:
        data = fit_data(reference.same, reference.different)
    details = {"same_id_subjects": n_same, "different_id_pairs": int(len(reference.different)),
               "auc": reference.auc}
    coef = intercept = None
    if stored is not None:
        coef, intercept = stored.coef, stored.intercept
        if len(reference.different_images):
            # How the model's stored operating point holds on these images.
            details["model_threshold"] = stored.threshold
            details["model_fpr"] = stored.target_fpr
            details["observed_fpr_at_model_threshold"] = float(
                np.mean(reference.different_images <= stored.threshold))
    if data is not None and stored is not None:
        link = PairLink(data, coef, intercept, "data+model", n_same / (n_same + STORED_WEIGHT),
                        details)
    elif data is not None:
        link = PairLink(data, None, None, "data", 1.0, details)
    elif stored is not None:
        link = PairLink(None, coef, intercept, "model", 0.0, details)
    else:
        raise ValueError(
            f"the model has no stored calibration and these datasets have {n_same} subjects "
            f"with two or more images (at least {MIN_SAME_FOR_FIT} are needed to calibrate on "
            f"the data): pass --threshold")
    if data is not None and stored is not None:
        # Disagreement: largest gap in log10 LR over the scores that matter here (from the
        # lower same-ID scores to the different-ID median).
        lo = float(np.quantile(reference.same, 0.05))
        hi = float(np.median(reference.different))
        grid = np.linspace(min(lo, hi), max(lo, hi), 50)
        gap = data.log_lr(grid) - (stored.coef * grid + stored.intercept)
        details["max_log10_lr_disagreement"] = float(np.max(np.abs(gap)) / math.log(10))
    return link


# -- prior and posterior ---------------------------------------------------------------------------

def estimate_matches(log_lr: np.ndarray, n_pairs: int, cap: Optional[float] = None,
                     iterations: int = 200) -> float:
    """Expected number of same-subject pairs among ``n_pairs`` candidate pairs.

    EM for the weight of a two-component mixture whose components are known up to their
    ratio (the likelihood ratio): the pairs not in ``log_lr`` (not close enough to score)
    count as LR = 0. ``cap`` bounds the answer (one subject has at most one counterpart).
    """
    n_pairs = max(int(n_pairs), 1)
    cap = float(n_pairs if cap is None else min(cap, n_pairs))
    lr = np.exp(np.clip(np.asarray(log_lr, dtype=np.float64), -700, 700))
    pi = min(1.0 / n_pairs, cap / n_pairs)
    for _ in range(iterations):
        resp = pi * lr / (pi * lr + 1.0 - pi)
        new = min(float(resp.sum()) / n_pairs, cap / n_pairs)
        new = max(new, 0.5 / n_pairs)  # keep a floor of half a pair: a prior of zero never recovers
        if abs(new - pi) <= 1e-9 * max(pi, 1e-12):
            pi = new
            break
        pi = new
    return pi * n_pairs


def posterior(log_lr, prior: float):
    """P(same | score) for a pair with this log LR and prior probability ``prior``."""
    prior = min(max(float(prior), 1e-300), 1 - 1e-12)
    return _logistic(np.asarray(log_lr, dtype=np.float64) + math.log(prior / (1 - prior)))


def null_cap(scores: np.ndarray, n_pairs: int, null_scores: np.ndarray) -> np.ndarray:
    """Upper bound on the posterior of each pair from the empirical null.

    Among the ``n_pairs`` pairs compared, about ``n_pairs * F0(s)`` different-subject pairs
    score ``s`` or better, F0 being the share of different-ID pairs inside the datasets that
    do; among the R pairs observed at or below ``s``, at least that many are then false
    (a tail-area false discovery rate, made monotone like q-values). This holds whatever the
    shape of the score distributions, where the likelihood ratio's fit may not.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0 or len(null_scores) == 0:
        return np.ones(len(scores))
    null = np.sort(np.asarray(null_scores, dtype=np.float64))
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    f0 = np.searchsorted(null, ranked, side="right") / len(null)
    fdr = np.minimum(1.0, n_pairs * f0 / np.arange(1, len(ranked) + 1))
    fdr = np.minimum.accumulate(fdr[::-1])[::-1]
    cap = np.empty(len(scores))
    cap[order] = 1.0 - fdr
    return cap


def decide(posteriors: Sequence[float], max_false: float,
           min_posterior: float = MIN_POSTERIOR) -> Tuple[np.ndarray, float]:
    """Report the most probable pairs while ``sum(1 - posterior)`` stays <= ``max_false``,
    and only pairs at least ``min_posterior`` likely (a pair more likely false than not is
    not worth a reviewer's time, however loose the budget).

    Returns (mask of the reported pairs, expected number of false pairs among them).
    """
    p = np.asarray(posteriors, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    cost = np.cumsum(1.0 - p[order])
    n = int(np.searchsorted(cost, max_false + 1e-12, side="right"))
    n = min(n, int(np.sum(p >= min_posterior)))
    mask = np.zeros(len(p), dtype=bool)
    mask[order[:n]] = True
    return mask, float(cost[n - 1]) if n else 0.0


@dataclass
class SelfCheck:
    """How well the model separates subjects on these datasets."""

    auc: Optional[float]
    estimated_recall: Optional[float]
    same_id_subjects: int
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"auc": self.auc, "estimated_recall": self.estimated_recall,
                "same_id_subjects": self.same_id_subjects, "warnings": list(self.warnings)}


def self_check(reference: DataReference, link: PairLink, prior: float,
               level: Optional[float]) -> SelfCheck:
    """AUC of same-ID vs different-ID subject pairs, and the share of same-ID pairs whose
    posterior (with this run's prior) would pass the posterior ``level`` of the decision."""
    auc = reference.auc
    recall = None
    if len(reference.same) and level is not None:
        recall = float(np.mean(posterior(link.log_lr(reference.same), prior) >= level))
    check = SelfCheck(auc, recall, int(len(reference.same)))
    if len(reference.same) < MIN_SAME_FOR_FIT:
        check.warnings.append(
            f"only {len(reference.same)} subject(s) with two or more images in these datasets: "
            f"the model could not be checked on them, and probabilities rest on the model's "
            f"stored calibration alone")
    if auc is not None and auc < MIN_AUC:
        check.warnings.append(
            f"the model separates subjects poorly on these images (same-ID vs different-ID "
            f"AUC {auc:.2f}, below {MIN_AUC:.2f}): most shared subjects cannot be confirmed; "
            f"use a model trained for this kind of image")
    if recall is not None and recall < MIN_RECALL:
        check.warnings.append(
            f"at the requested false-pair level the model would confirm only about "
            f"{recall:.0%} of the shared subjects (estimated from same-ID subjects split in "
            f"two): an empty or short list does not mean the datasets are disjoint")
    return check
