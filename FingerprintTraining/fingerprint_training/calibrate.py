"""Fit the distance -> same-subject probability link and the FPR thresholds of a model.

A logistic regression (scikit-learn, balanced class weights, since negatives outnumber
positives by orders of magnitude) on held-out pair distances gives the probability; the
distance threshold for a target false-positive rate is the matching lower quantile of the
negative (different-subject) distances, which does not depend on the class balance.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .metrics import pair_distances, pair_indices

# FPR operating points stored in the table (log-spaced; callers interpolate between them).
DEFAULT_FPRS = tuple(float(f) for f in np.logspace(-4, np.log10(0.5), 17))


def threshold_at_fpr(neg_distances, fpr: float) -> float:
    """Largest distance threshold whose FPR on these negatives is at most ``fpr``
    (decision: same subject when distance <= threshold).

    With m negatives sorted ascending, accepting the j smallest gives FPR j/m; we take
    j = floor(fpr * m) and place the threshold halfway between the j-th and (j+1)-th
    negative distance (below the smallest one when j = 0).
    """
    neg = np.sort(np.asarray(neg_distances, dtype=np.float64))
    if len(neg) == 0:
        raise ValueError("no negative distances to set a threshold")
    fpr = float(fpr)
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    j = int(np.floor(fpr * len(neg) + 1e-9))
    if j >= len(neg):
        return float(neg[-1])
    upper = neg[j]
    lower = neg[j - 1] if j > 0 else upper - max(abs(upper) * 1e-6, 1e-9)
    if lower == upper:
        # Ties at the boundary: step just below them so they stay rejected.
        return float(np.nextafter(upper, -np.inf))
    return float(0.5 * (lower + upper))


def fit_calibration(pos_distances, neg_distances, target_fpr: float = 0.01,
                    fprs=DEFAULT_FPRS):
    """Fit a ``subject_fingerprint.calibration.Calibration`` on validation pair distances.

    ``coef``/``intercept``: logistic regression of "same subject" on distance (balanced
    class weights, a negative slope is enforced by the data: positives are closer).
    ``threshold``: distance threshold at ``target_fpr`` on the negatives;
    ``fpr_table``: [fpr, threshold] for each of ``fprs`` (plus the target).
    """
    from sklearn.linear_model import LogisticRegression
    from subject_fingerprint.calibration import Calibration

    pos = np.asarray(pos_distances, dtype=np.float64).ravel()
    neg = np.asarray(neg_distances, dtype=np.float64).ravel()
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError(f"calibration needs at least 2 same-subject and 2 different-subject "
                         f"pairs (have {len(pos)} and {len(neg)})")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("calibration distances must be finite")
    x = np.concatenate([pos, neg])[:, None]
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    # Scale the distances for the solver, then fold the scale back into the coefficient.
    scale = float(np.std(x)) or 1.0
    lr = LogisticRegression(class_weight="balanced", C=1e4, max_iter=1000)
    lr.fit(x / scale, y)
    coef = float(lr.coef_[0, 0]) / scale
    intercept = float(lr.intercept_[0])
    if coef >= 0:
        raise ValueError("same-subject pairs are not closer than different-subject pairs; "
                         "the model cannot be calibrated on these distances")
    table = sorted({float(f) for f in fprs} | {float(target_fpr)})
    fpr_table = tuple((f, threshold_at_fpr(neg, f)) for f in table)
    return Calibration(coef=coef, intercept=intercept,
                       threshold=threshold_at_fpr(neg, target_fpr),
                       target_fpr=float(target_fpr), fpr_table=fpr_table)


def calibration_pairs(embeddings, labels, max_negatives: Optional[int] = 200000, seed: int = 0,
                      distance: str = "euclidean"):
    """Distances of all same-subject pairs and of a seeded sample of different-subject
    pairs (all of them when there are few). Returns (pos_distances, neg_distances)."""
    pos_pairs, neg_pairs = pair_indices(labels, max_negatives=max_negatives, seed=seed)
    return (pair_distances(embeddings, pos_pairs, distance),
            pair_distances(embeddings, neg_pairs, distance))


def fit_from_embeddings(embeddings, labels, target_fpr: float = 0.01, seed: int = 0,
                        max_negatives: Optional[int] = 200000):
    """``fit_calibration`` on the pairs of a labelled embedding set (e.g. the validation split)."""
    pos, neg = calibration_pairs(embeddings, labels, max_negatives=max_negatives, seed=seed)
    return fit_calibration(pos, neg, target_fpr=target_fpr)
