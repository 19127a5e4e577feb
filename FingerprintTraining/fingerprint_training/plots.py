"""Evaluation figures (matplotlib, Agg backend, PNG files).

* ``distance_histograms``: like the Few-Shot Fingerprinting paper's Figure 2 (B): binned
  per-subject intra-subject distances (to the subject's centroid) and inter-subject distances
  (centroid to other centroids), with the calibrated threshold as a line when given.
* ``pair_histograms``: same- vs different-subject pair distances with the threshold.
* ``tsne_plot``: t-SNE of embeddings coloured by subject for the subjects with most images.
* ``roc_plot``: verification ROC curve(s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def distance_histograms(intra: Sequence[float], inter: Sequence[float], path,
                        threshold: Optional[float] = None, title: str = "") -> Path:
    """Figure 2 (B) style histogram of per-subject intra (blue) and inter (red) distances."""
    plt = _pyplot()
    intra, inter = np.asarray(intra, float), np.asarray(inter, float)
    fig, ax = plt.subplots(figsize=(6, 4))
    both = np.concatenate([intra, inter])
    bins = np.linspace(both.min(), both.max(), 40) if both.size and both.max() > both.min() else 20
    ax.hist(intra, bins=bins, color="tab:blue", alpha=0.6,
            label=f"intra-subject (MIASD {intra.mean():.3g} ± {intra.std():.2g})")
    ax.hist(inter, bins=bins, color="tab:red", alpha=0.6,
            label=f"inter-subject (MIESD {inter.mean():.3g} ± {inter.std():.2g})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("distance")
    ax.set_ylabel("subjects")
    ax.set_title(title or "Intra- vs inter-subject distances")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pair_histograms(pos: Sequence[float], neg: Sequence[float], path,
                    threshold: Optional[float] = None, title: str = "") -> Path:
    """Density histograms of same-subject vs different-subject pair distances."""
    plt = _pyplot()
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    fig, ax = plt.subplots(figsize=(6, 4))
    both = np.concatenate([pos, neg])
    bins = np.linspace(both.min(), both.max(), 50) if both.size and both.max() > both.min() else 20
    ax.hist(neg, bins=bins, density=True, color="tab:red", alpha=0.55,
            label=f"different subject ({len(neg)} pairs)")
    ax.hist(pos, bins=bins, density=True, color="tab:blue", alpha=0.55,
            label=f"same subject ({len(pos)} pairs)")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("distance")
    ax.set_ylabel("density")
    ax.set_title(title or "Pair distances")
    ax.legend(fontsize=8)
    return _save(fig, path)


def tsne_plot(embeddings, labels, path, top_subjects: int = 10, seed: int = 0,
              title: str = "", max_points: int = 3000) -> Optional[Path]:
    """t-SNE (scikit-learn) of the embeddings; the ``top_subjects`` subjects with most images
    in colour, the others grey. Above ``max_points`` images, all of the top subjects' images
    and a seeded sample of the rest are shown (t-SNE is quadratic-ish in time).
    Returns None when there are too few points for t-SNE."""
    from sklearn.manifold import TSNE

    e = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if len(e) > max_points:
        values, counts = np.unique(labels, return_counts=True)
        top = values[np.argsort(-counts, kind="stable")[:top_subjects]]
        keep = np.isin(labels, top)
        rest = np.flatnonzero(~keep)
        room = max(0, max_points - int(keep.sum()))
        pick = np.random.default_rng(seed).choice(rest, size=min(room, len(rest)), replace=False)
        keep[pick] = True
        e, labels = e[keep], labels[keep]
    n = len(e)
    if n < 5:
        return None
    xy = TSNE(n_components=2, perplexity=float(min(30, max(2, (n - 1) // 3))),
              init="pca", random_state=seed).fit_transform(e)
    values, counts = np.unique(labels, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")[:top_subjects]]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    rest = ~np.isin(labels, top)
    ax.scatter(xy[rest, 0], xy[rest, 1], s=8, c="lightgrey", label="other subjects")
    cmap = plt.get_cmap("tab10" if len(top) <= 10 else "tab20")
    for i, s in enumerate(top):
        m = labels == s
        ax.scatter(xy[m, 0], xy[m, 1], s=18, color=cmap(i % cmap.N), label=str(s))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {n} embeddings")
    ax.legend(fontsize=6, loc="best", markerscale=0.8)
    return _save(fig, path)


def roc_plot(curves: dict, path, title: str = "") -> Path:
    """ROC curves: ``curves`` maps a name to (pos_distances, neg_distances)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (pos, neg) in curves.items():
        pos, neg = np.asarray(pos, float), np.asarray(neg, float)
        y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
        s = -np.concatenate([pos, neg])
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title or "Verification ROC")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)
