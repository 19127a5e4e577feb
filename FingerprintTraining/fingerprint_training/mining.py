"""Triplet miners, as pytorch-metric-learning (PML) miners so that every PML loss can use them.

* ``algorithm1``: the Few-Shot Fingerprinting paper's Algorithm 1 (:class:`Algorithm1Miner`,
  written here because the method is the paper's own);
* ``batch-hard``: PML's ``BatchHardMiner`` (Hermans et al. 2017);
* ``all``: PML's ``TripletMarginMiner(type_of_triplets="all")``, every triplet that violates
  the margin (the others have a zero loss anyway).

All of them measure distances with :class:`EuclideanDistance`, which is
``subject_fingerprint.distances.euclidean`` behind PML's distance interface (raw embeddings, no
normalisation: the paper's unnormalised L2; the objective normalises first when asked).
Positives are images of the same subject other than the anchor itself (by position), as in
PML; an image drawn twice into one batch gives two augmented copies, which count as positives.
"""

from __future__ import annotations

from typing import Optional

import torch
from pytorch_metric_learning.distances import BaseDistance
from pytorch_metric_learning.miners import BaseMiner, BatchHardMiner, TripletMarginMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from subject_fingerprint.distances import euclidean

MINERS = ("algorithm1", "batch-hard", "all")


class EuclideanDistance(BaseDistance):
    """PML distance object for ``subject_fingerprint.distances.euclidean`` (finite gradient at
    zero distance, unlike ``torch.cdist``)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("normalize_embeddings", False)
        super().__init__(**kwargs)

    def compute_mat(self, query_emb, ref_emb):
        return euclidean(query_emb, ref_emb)

    def pairwise_distance(self, query_emb, ref_emb):
        return euclidean(query_emb, ref_emb).diagonal()


class Algorithm1Miner(BaseMiner):
    """The Few-Shot Fingerprinting paper's Algorithm 1 ("batched hard triplet mining").

    For every anchor-positive pair (a, p): the hard set is every reference n of another subject
    with d(a, n) <= d(a, p); one of them is picked uniformly at random; the pair is dropped when
    the set is empty (the paper removes a_i and p_i; the seed code fell back to the hardest
    negative instead, which the paper does not do). ``generator`` (settable per step) makes the
    random choice reproducible.
    """

    def __init__(self, generator: Optional[torch.Generator] = None, **kwargs):
        kwargs.setdefault("distance", EuclideanDistance())
        super().__init__(**kwargs)
        self.generator = generator

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        dist = self.distance(embeddings, ref_emb)
        matches, diffs = lmu.get_matches_and_diffs(labels, ref_labels)
        a, p = torch.where(matches)
        if a.numel() == 0:
            return a, p, p.clone()
        d_ap = dist[a, p]
        hard = diffs[a].bool() & (dist[a] <= d_ap[:, None])
        keep = hard.any(1)
        # Uniform choice among the hard set: the argmax of i.i.d. uniform scores over the set.
        scores = torch.rand(hard.shape, generator=self.generator, device="cpu").to(dist.device)
        n = scores.masked_fill(~hard, -1.0).argmax(1)
        return a[keep], p[keep], n[keep]


def build_miner(name: str, margin: float) -> Optional[BaseMiner]:
    """The miner called ``name`` (one of :data:`MINERS`) on Euclidean distances."""
    if name == "algorithm1":
        return Algorithm1Miner()
    if name == "batch-hard":
        return BatchHardMiner(distance=EuclideanDistance())
    if name == "all":
        return TripletMarginMiner(margin=margin, type_of_triplets="all", distance=EuclideanDistance())
    raise ValueError(f"unknown miner {name!r}; choose one of {MINERS}")


def other_modality_only(indices_tuple, groups: torch.Tensor):
    """Keep the (anchor, positive) pairs of an index tuple whose modalities differ (cross-modal
    positives); negatives are kept as they are. Works on triplets (a, p, n) and on pair tuples
    (a1, p, a2, n) of one batch."""
    keep = groups[indices_tuple[0]] != groups[indices_tuple[1]]
    if len(indices_tuple) == 3:
        return tuple(t[keep] for t in indices_tuple)
    a1, p, a2, n = indices_tuple
    return a1[keep], p[keep], a2, n
