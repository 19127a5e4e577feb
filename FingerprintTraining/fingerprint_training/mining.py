"""Triplet mining on distance matrices, and a cross-batch memory of past embeddings.

Everything works on a distance matrix ``dist`` of shape (Q, R) between Q query embeddings
(the current batch: every image is an anchor) and R reference embeddings (the current batch,
optionally followed by the cross-batch memory), with two boolean masks of the same shape:
``pos_mask[i, j]`` (j is a valid positive for anchor i: same subject, not the same image, and a
different modality if cross-modal positives are required) and ``neg_mask[i, j]`` (j is of another
subject). Miners return a :class:`Triplets` of index tensors (anchor into Q, positive and
negative into R).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

MINERS = ("algorithm1", "batch-hard", "all")


@dataclass
class Triplets:
    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    candidates: int = 0  # anchor-positive pairs considered before dropping (for the log)

    def __len__(self) -> int:
        return int(self.anchor.numel())


def pairwise_distances(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Euclidean distances (n, m), with a gradient that stays finite at zero distance.

    torch.cdist's backward is NaN at exactly 0, which happens for repeated images.
    """
    y = x if y is None else y
    x, y = x.float(), y.float()
    sq = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * (x @ y.t())
    return sq.clamp_min(1e-12).sqrt()


def pair_masks(q_labels, r_labels, q_ids=None, r_ids=None, q_groups=None, r_groups=None,
               cross_modal: bool = False):
    """(pos_mask, neg_mask) between queries and references.

    ``*_ids`` identify images (the same image is never its own positive); ``*_groups`` are
    modality codes used when ``cross_modal`` requires positives of another modality.
    """
    same = q_labels[:, None] == r_labels[None, :]
    pos = same.clone()
    if q_ids is not None and r_ids is not None:
        pos &= q_ids[:, None] != r_ids[None, :]
    elif pos.shape[0] == pos.shape[1]:
        pos.fill_diagonal_(False)
    if cross_modal:
        if q_groups is None or r_groups is None:
            raise ValueError("cross-modal positives need modality groups")
        pos &= q_groups[:, None] != r_groups[None, :]
    return pos, ~same


def _empty(device) -> Triplets:
    e = torch.zeros(0, dtype=torch.long, device=device)
    return Triplets(e, e.clone(), e.clone(), 0)


def mine_algorithm1(dist: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> Triplets:
    """The Few-Shot Fingerprinting paper's Algorithm 1 ("batched hard triplet mining").

    For every anchor-positive pair (a, p): the hard set is every reference n of another subject
    with d(a, n) <= d(a, p); one of them is picked uniformly at random; the pair is dropped when
    the set is empty (the paper removes a_i and p_i; the seed code fell back to the hardest
    negative instead, which the paper does not do).
    """
    dist = dist.detach()
    a, p = pos_mask.nonzero(as_tuple=True)
    if a.numel() == 0:
        return _empty(dist.device)
    d_ap = dist[a, p]
    hard = neg_mask[a] & (dist[a] <= d_ap[:, None])
    keep = hard.any(1)
    # Uniform choice among the hard set: the argmax of i.i.d. uniform scores over the set.
    scores = torch.rand(hard.shape, generator=generator, device="cpu").to(dist.device)
    scores = scores.masked_fill(~hard, -1.0)
    n = scores.argmax(1)
    return Triplets(a[keep], p[keep], n[keep], candidates=int(a.numel()))


def mine_batch_hard(dist: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> Triplets:
    """Batch-hard (Hermans et al. 2017): per anchor, its farthest positive and closest negative."""
    dist = dist.detach()
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not bool(valid.any()):
        return _empty(dist.device)
    far_pos = dist.masked_fill(~pos_mask, float("-inf")).argmax(1)
    near_neg = dist.masked_fill(~neg_mask, float("inf")).argmin(1)
    a = valid.nonzero(as_tuple=True)[0]
    return Triplets(a, far_pos[a], near_neg[a], candidates=int(pos_mask.any(1).sum()))


def mine_all(dist: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> Triplets:
    """Every valid (anchor, positive, negative) triplet."""
    a, p = pos_mask.nonzero(as_tuple=True)
    if a.numel() == 0:
        return _empty(dist.device)
    rows = neg_mask[a]  # (pairs, R)
    pair_idx, n = rows.nonzero(as_tuple=True)
    return Triplets(a[pair_idx], p[pair_idx], n, candidates=int(a.numel()))


_MINERS = {"algorithm1": mine_algorithm1, "batch-hard": mine_batch_hard, "all": mine_all}


def mine(name: str, dist, pos_mask, neg_mask, generator=None) -> Triplets:
    try:
        miner = _MINERS[name]
    except KeyError:
        raise ValueError(f"unknown miner {name!r}; choose one of {MINERS}") from None
    return miner(dist, pos_mask, neg_mask, generator)


class CrossBatchMemory:
    """FIFO queue of detached past embeddings with their labels, image ids and modality groups
    (cross-batch memory, Wang et al. 2020 "XBM"; used as a memory of 128 by Packhäuser et al.).

    The current batch is compared with the batch *and* the memory, so the memory adds positives
    and negatives without any extra forward pass; only the current batch gets gradients.
    """

    def __init__(self, size: int, dim: int):
        if size <= 0:
            raise ValueError("memory size must be positive")
        self.size, self.dim = int(size), int(dim)
        self.embeddings = torch.zeros(self.size, self.dim)
        self.labels = torch.zeros(self.size, dtype=torch.long)
        self.ids = torch.zeros(self.size, dtype=torch.long)
        self.groups = torch.zeros(self.size, dtype=torch.long)
        self.ptr = 0
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    def enqueue(self, embeddings, labels, ids, groups=None) -> None:
        """Add a batch (oldest entries are overwritten first)."""
        embeddings = embeddings.detach().float().cpu()
        n = embeddings.shape[0]
        if n == 0:
            return
        if groups is None:
            groups = torch.zeros(n, dtype=torch.long)
        if n >= self.size:  # keep only the newest entries
            embeddings, labels, ids, groups = (t[-self.size:] for t in (embeddings, labels, ids, groups))
            n = self.size
        idx = (self.ptr + torch.arange(n)) % self.size
        self.embeddings[idx] = embeddings
        self.labels[idx] = labels.cpu().long()
        self.ids[idx] = ids.cpu().long()
        self.groups[idx] = groups.cpu().long()
        self.ptr = int((self.ptr + n) % self.size)
        self.filled = min(self.size, self.filled + n)

    def get(self, device=None):
        """(embeddings, labels, ids, groups) of the filled part, oldest first."""
        if self.filled < self.size:
            order = torch.arange(self.filled)
        else:
            order = (self.ptr + torch.arange(self.size)) % self.size
        out = (self.embeddings[order], self.labels[order], self.ids[order], self.groups[order])
        return tuple(t.to(device) for t in out) if device is not None else out

    def state_dict(self) -> dict:
        return {"size": self.size, "dim": self.dim, "embeddings": self.embeddings.clone(),
                "labels": self.labels.clone(), "ids": self.ids.clone(),
                "groups": self.groups.clone(), "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if int(state["size"]) != self.size or int(state["dim"]) != self.dim:
            raise ValueError("cross-batch memory size/dimension differ from the saved state")
        self.embeddings = state["embeddings"].clone().float()
        self.labels = state["labels"].clone().long()
        self.ids = state["ids"].clone().long()
        self.groups = state["groups"].clone().long()
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
