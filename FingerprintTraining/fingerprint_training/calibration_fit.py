"""Fit the distance -> same-subject probability link and the FPR thresholds of a model.

A logistic regression (scikit-learn, balanced class weights, since negatives outnumber
positives by orders of magnitude) on held-out pair distances gives the probability; the
distance threshold for a target false-positive rate is the matching lower quantile of the
negative (different-subject) distances, which does not depend on the class balance.
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning

from .metrics import pair_distances, pair_indices

# FPR operating points stored in the table (log-spaced; callers interpolate between them).
DEFAULT_FPRS = tuple(float(f) for f in np.logspace(-4, np.log10(0.5), 17))


def thresholds_at_fprs(pos_distances, neg_distances, fprs) -> list:
    """For each FPR in ``fprs``: the largest distance threshold whose FPR on these negatives is
    at most that FPR (decision: same subject when distance <= threshold).

    The operating points are scikit-learn's ``roc_curve`` (every distinct distance, none
    dropped); the threshold sits halfway between the last accepted distance and the first
    rejected one (just below the smallest distance when nothing is accepted), so pairs tied at
    the boundary stay rejected.
    """
    from sklearn.metrics import roc_curve

    pos = np.asarray(pos_distances, dtype=np.float64).ravel()
    neg = np.asarray(neg_distances, dtype=np.float64).ravel()
    if len(neg) == 0:
        raise ValueError("no negative distances to set a threshold")
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    with warnings.catch_warnings():  # no positives: the TPR is undefined, the FPR is not
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr_at, _, score_at = roc_curve(y, -np.concatenate([pos, neg]), drop_intermediate=False)
    dist_at = -score_at  # ascending distances; dist_at[0] = -inf accepts nothing
    out = []
    for fpr in fprs:
        fpr = float(fpr)
        if not 0.0 <= fpr <= 1.0:
            raise ValueError(f"fpr must be in [0, 1], got {fpr}")
        i = int(np.searchsorted(fpr_at, fpr + 1e-9, side="right")) - 1
        if i + 1 >= len(dist_at):
            out.append(float(dist_at[-1]))
        elif i == 0:
            upper = dist_at[1]
            out.append(float(upper - max(abs(upper) * 1e-6, 1e-9)))
        else:
            out.append(float(0.5 * (dist_at[i] + dist_at[i + 1])))
    return out


def threshold_at_fpr(neg_distances, fpr: float, pos_distances=()) -> float:
    """:func:`thresholds_at_fprs` for one FPR."""
    return thresholds_at_fprs(pos_distances, neg_distances, [fpr])[0]


def fit_calibration(pos_distances, neg_distances, target_fpr: float = 0.01,
                    fprs=DEFAULT_FPRS, neg_groups=None):
    """Fit a ``subject_fingerprint.calibration.Calibration`` on validation pair distances.

    ``coef``/``intercept``: logistic regression of "same subject" on distance (balanced
    class weights, a negative slope is enforced by the data: positives are closer).
    ``threshold``: distance threshold at ``target_fpr`` on the negatives;
    ``fpr_table``: [fpr, threshold] for each of ``fprs`` (plus the target).
    ``neg_groups`` (one code per negative, e.g. its source): each threshold is the smallest of
    the groups' own, so the FPR stays within the target on every group, not only on average.
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
    if neg_groups is None:
        thresholds = thresholds_at_fprs(pos, neg, table)
    else:
        groups = np.asarray(neg_groups).ravel()
        if len(groups) != len(neg):
            raise ValueError("neg_groups needs one code per negative distance")
        # Each group's thresholds from its negatives alone (the positives have no group).
        thresholds = np.min([thresholds_at_fprs((), neg[groups == g], table)
                             for g in np.unique(groups)], axis=0).tolist()
    fpr_table = tuple(zip(table, thresholds))
    return Calibration(coef=coef, intercept=intercept,
                       threshold=dict(fpr_table)[float(target_fpr)],
                       target_fpr=float(target_fpr), fpr_table=fpr_table)


def calibration_pairs(embeddings, labels, max_negatives: Optional[int] = 200000, seed: int = 0,
                      distance: str = "euclidean"):
    """Distances of all same-subject pairs and of a seeded sample of different-subject
    pairs (all of them when there are few). Returns (pos_distances, neg_distances)."""
    pos_pairs, neg_pairs = pair_indices(labels, max_negatives=max_negatives, seed=seed)
    return (pair_distances(embeddings, pos_pairs, distance),
            pair_distances(embeddings, neg_pairs, distance))


def within_source_pairs(embedded):
    """``(pos, neg, groups)`` over ``embedded``, pairs of (embeddings, labels) of one source
    each: the pairs of every source, never across sources (an adult film and a child's are easy
    negatives that would dilute the false-positive rate), ``groups`` the source of each negative
    (for ``fit_calibration(..., neg_groups=groups)``)."""
    pos, neg, groups = [], [], []
    for i, (embeddings, labels) in enumerate(embedded):
        p, n = calibration_pairs(embeddings, labels)
        pos.append(p)
        neg.append(n)
        groups.append(np.full(len(n), i))
    return np.concatenate(pos), np.concatenate(neg), np.concatenate(groups)


def fit_from_embeddings(embeddings, labels, target_fpr: float = 0.01, seed: int = 0,
                        max_negatives: Optional[int] = 200000):
    """``fit_calibration`` on the pairs of a labelled embedding set (e.g. the validation split)."""
    pos, neg = calibration_pairs(embeddings, labels, max_negatives=max_negatives, seed=seed)
    return fit_calibration(pos, neg, target_fpr=target_fpr)
