"""Triplet margin and contrastive losses, and :class:`MetricObjective`, which puts embedding
normalisation, mining, the cross-batch memory and the loss together as options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .mining import MINERS, CrossBatchMemory, Triplets, mine, pair_masks, pairwise_distances

LOSSES = ("triplet", "contrastive")


def triplet_margin_loss(dist: torch.Tensor, triplets: Triplets, margin: float,
                        reduction: str = "mean"):
    """mean(relu(d(a,p) - d(a,n) + margin)) over the triplets.

    ``reduction="nonzero"`` averages over the triplets with a positive loss only (useful with
    every triplet mined, where most are already satisfied). Returns (loss, active) with
    ``active`` the number of triplets with a positive loss. No triplet -> a zero that still
    depends on ``dist`` (so DDP sees every parameter used).
    """
    if len(triplets) == 0:
        return dist.sum() * 0.0, 0
    values = F.relu(dist[triplets.anchor, triplets.positive]
                    - dist[triplets.anchor, triplets.negative] + margin)
    active = int((values > 0).sum())
    if reduction == "nonzero":
        return values.sum() / max(active, 1), active
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}")
    return values.mean(), active


def contrastive_loss(dist: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
                     pos_margin: float = 0.0, neg_margin: float = 1.0):
    """Contrastive loss as in pytorch-metric-learning's ContrastiveLoss (Packhäuser et al.):
    positives pay relu(d - pos_margin), negatives relu(neg_margin - d); each part is averaged
    over its non-zero terms and the two parts are added. Returns (loss, active pairs)."""
    pos = F.relu(dist[pos_mask] - pos_margin)
    neg = F.relu(neg_margin - dist[neg_mask])
    n_pos, n_neg = int((pos > 0).sum()), int((neg > 0).sum())
    loss = dist.sum() * 0.0
    if n_pos:
        loss = loss + pos.sum() / n_pos
    if n_neg:
        loss = loss + neg.sum() / n_neg
    return loss, n_pos + n_neg


@dataclass
class StepStats:
    """What one loss evaluation used (logged every step)."""
    candidates: int = 0       # anchor-positive pairs available
    used_triplets: int = 0    # triplets (or pairs, for the contrastive loss) that entered the loss
    active: int = 0           # of those, the ones with a non-zero loss
    memory: int = 0           # cross-batch memory entries used


class MetricObjective:
    """Loss of a batch of embeddings: options, not forks.

    loss: "triplet" | "contrastive"; miner: "algorithm1" | "batch-hard" | "all"
    (for the contrastive loss "all" uses every pair, other miners the pairs of the mined
    triplets); margin: triplet margin or the contrastive negative margin; normalize: L2-normalise
    embeddings first; xbm_size > 0: cross-batch memory used from step ``xbm_start`` on.
    """

    def __init__(self, loss: str = "triplet", miner: str = "algorithm1", margin: float = 4.0,
                 normalize: bool = False, xbm_size: int = 0, embedding_dim: int = 128,
                 cross_modal: bool = False, pos_margin: float = 0.0, xbm_start: int = 0):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        if miner not in MINERS:
            raise ValueError(f"unknown miner {miner!r}; choose one of {MINERS}")
        self.loss, self.miner, self.margin = loss, miner, float(margin)
        self.normalize, self.cross_modal = bool(normalize), bool(cross_modal)
        self.pos_margin = float(pos_margin)
        self.xbm_start = int(xbm_start)
        self.memory = CrossBatchMemory(xbm_size, embedding_dim) if xbm_size > 0 else None

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                 groups: Optional[torch.Tensor] = None, generator=None, step: int = 0):
        """Loss for one batch; ``ids`` identify images (dataset indices), ``groups`` modalities.
        Returns (loss, StepStats). Enqueues the batch into the memory afterwards."""
        emb = embeddings.float()
        if self.normalize:
            emb = F.normalize(emb, dim=1)
        device = emb.device
        labels, ids = labels.to(device), ids.to(device)
        groups = groups.to(device) if groups is not None else torch.zeros_like(labels)
        ref, r_labels, r_ids, r_groups = emb, labels, ids, groups
        used_memory = 0
        if self.memory is not None and len(self.memory) and step >= self.xbm_start:
            m_emb, m_labels, m_ids, m_groups = self.memory.get(device)
            ref = torch.cat([emb, m_emb])
            r_labels, r_ids, r_groups = (torch.cat([labels, m_labels]), torch.cat([ids, m_ids]),
                                         torch.cat([groups, m_groups]))
            used_memory = int(m_emb.shape[0])
        dist = pairwise_distances(emb, ref)
        pos_mask, neg_mask = pair_masks(labels, r_labels, ids, r_ids, groups, r_groups,
                                        self.cross_modal)
        stats = StepStats(memory=used_memory)
        if self.loss == "triplet":
            triplets = mine(self.miner, dist, pos_mask, neg_mask, generator)
            reduction = "nonzero" if self.miner == "all" else "mean"
            loss, active = triplet_margin_loss(dist, triplets, self.margin, reduction)
            stats.candidates, stats.used_triplets, stats.active = triplets.candidates, len(triplets), active
        else:
            if self.miner != "all":
                triplets = mine(self.miner, dist, pos_mask, neg_mask, generator)
                pm = torch.zeros_like(pos_mask)
                nm = torch.zeros_like(neg_mask)
                pm[triplets.anchor, triplets.positive] = True
                nm[triplets.anchor, triplets.negative] = True
                pos_mask, neg_mask = pm, nm
                stats.candidates = triplets.candidates
            else:
                stats.candidates = int(pos_mask.sum())
            loss, active = contrastive_loss(dist, pos_mask, neg_mask, self.pos_margin, self.margin)
            stats.used_triplets, stats.active = int(pos_mask.sum() + neg_mask.sum()), active
        if self.memory is not None:
            self.memory.enqueue(emb.detach(), labels, ids, groups)
        return loss, stats
