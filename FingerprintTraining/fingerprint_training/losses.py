"""The training objective: pytorch-metric-learning's triplet margin, contrastive and
multi-similarity losses (averaged over their non-zero terms), a miner from :mod:`.mining` and
PML's cross-batch memory, put together as options by :class:`MetricObjective`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.reducers import AvgNonZeroReducer, MultipleReducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from .mining import MINERS, Algorithm1Miner, EuclideanDistance, build_miner, other_modality_only

LOSSES = ("triplet", "contrastive", "multi-similarity")
PAIR_LOSSES = ("contrastive", "multi-similarity")  # scored on pairs: miner "all" = every pair


def build_loss(name: str, margin: float, pos_margin: float = 0.0):
    """PML ``TripletMarginLoss(margin)`` or ``ContrastiveLoss(pos_margin, neg_margin=margin)`` on
    Euclidean distances, each part averaged over its non-zero terms (``AvgNonZeroReducer``; the
    contrastive loss adds the positive and the negative part); or ``MultiSimilarityLoss`` (Wang
    et al. 2019, alpha 2, beta 50, base = ``margin``) on cosine similarities, averaged over the
    anchors that have pairs."""
    if name == "triplet":
        return pml_losses.TripletMarginLoss(margin=margin, distance=EuclideanDistance(),
                                            reducer=AvgNonZeroReducer(collect_stats=True))
    if name == "contrastive":
        parts = {k: AvgNonZeroReducer(collect_stats=True) for k in ("pos_loss", "neg_loss")}
        return pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=margin,
                                          distance=EuclideanDistance(),
                                          reducer=MultipleReducers(parts))
    if name == "multi-similarity":
        return pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=margin,
                                              reducer=AvgNonZeroReducer(collect_stats=True))
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def _active_terms(loss_fn) -> int:
    """Terms with a non-zero loss in the last call (from the reducers' records)."""
    reducer = loss_fn.reducer
    parts = reducer.reducers.values() if isinstance(reducer, MultipleReducers) else [reducer]
    return int(sum(getattr(r, "num_past_filter", 0) for r in parts))


@dataclass
class StepStats:
    """What one loss evaluation used (logged every step)."""
    candidates: int = 0       # anchor-positive pairs available
    used_triplets: int = 0    # triplets (or pairs, for the contrastive loss) that entered the loss
    active: int = 0           # of those, the ones with a non-zero loss
    memory: int = 0           # cross-batch memory entries used (besides the batch itself)


class MetricObjective:
    """Loss of a batch of embeddings: options, not forks.

    loss: "triplet" | "contrastive" | "multi-similarity"; miner: "algorithm1" | "batch-hard" |
    "all" (for the pair losses "all" uses every pair, other miners the pairs of the mined
    triplets); margin: triplet margin, the contrastive negative margin or the multi-similarity
    base; normalize: L2-normalise embeddings first (required by multi-similarity, whose cosine
    similarities the saved model must reproduce); xbm_size > 0: PML's cross-batch memory,
    filled from the start and used from step ``xbm_start`` on; cross_modal: positives must be
    of another modality (group).
    """

    def __init__(self, loss: str = "triplet", miner: str = "algorithm1", margin: float = 4.0,
                 normalize: bool = False, xbm_size: int = 0, embedding_dim: int = 128,
                 cross_modal: bool = False, pos_margin: float = 0.0, xbm_start: int = 0):
        if miner not in MINERS:
            raise ValueError(f"unknown miner {miner!r}; choose one of {MINERS}")
        if cross_modal and (miner == "batch-hard" or xbm_size > 0):
            # The farthest positive must be chosen among other-modality images, which PML's
            # BatchHardMiner cannot be told; the memory keeps no modalities.
            raise ValueError("cross-modal positives work with the algorithm1 and all miners, "
                             "without a cross-batch memory")
        if loss == "multi-similarity" and not normalize:
            raise ValueError("the multi-similarity loss scores cosine similarities: train with "
                             "normalised embeddings (--normalize) so the saved model gives them")
        self.loss, self.miner_name, self.margin = loss, miner, float(margin)
        self.loss_fn = build_loss(loss, self.margin, float(pos_margin))
        # "all" for a pair loss means every pair: no miner at all.
        self.miner = None if (loss in PAIR_LOSSES and miner == "all") else build_miner(miner, self.margin)
        if self.miner is not None:
            self.miner.collect_stats = True
        self.normalize, self.cross_modal = bool(normalize), bool(cross_modal)
        self.xbm_start = int(xbm_start)
        self.memory = (pml_losses.CrossBatchMemory(self.loss_fn, int(embedding_dim),
                                                   memory_size=int(xbm_size), miner=self.miner)
                       if xbm_size > 0 else None)

    def reset_memory(self) -> None:
        if self.memory is not None:
            self.memory.reset_queue()

    def _indices(self, emb, labels, ref, ref_labels):
        if self.miner is not None:
            return self.miner(emb, labels, ref, ref_labels)
        return lmu.get_all_pairs_indices(labels, ref_labels)

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor,
                 groups: Optional[torch.Tensor] = None, generator=None, step: int = 0):
        """Loss for one batch; ``groups`` are modality codes (for cross-modal positives).
        Returns (loss, StepStats). The batch enters the memory (when there is one)."""
        emb = embeddings.float()
        if self.normalize:
            emb = F.normalize(emb, dim=1)
        labels = labels.to(emb.device)
        if isinstance(self.miner, Algorithm1Miner):
            self.miner.generator = generator
        stats = StepStats()
        mem = self.memory
        if mem is not None:
            if len(emb) > mem.memory_size:
                raise ValueError(f"the cross-batch memory ({mem.memory_size}) must hold at least "
                                 f"one batch ({len(emb)} images)")
            mem.embedding_memory = mem.embedding_memory.to(emb.device)
            mem.label_memory = mem.label_memory.to(emb.device)
            mem.add_to_memory(emb.detach(), labels, len(emb))
        if mem is not None and step >= self.xbm_start:
            filled = mem.memory_size if mem.has_been_filled else mem.queue_idx
            ref, ref_labels = mem.embedding_memory[:filled], mem.label_memory[:filled]
            indices = mem.create_indices_tuple(emb, labels, ref, ref_labels, None, True)
            stats.memory = int(filled - len(emb))
        else:
            ref, ref_labels = emb, labels
            indices = self._indices(emb, labels, None, None)
        if self.cross_modal:
            if groups is None:
                raise ValueError("cross-modal positives need modality groups")
            indices = other_modality_only(indices, groups.to(emb.device))
        loss = self.loss_fn(emb, labels, indices, ref, ref_labels)
        if self.loss in PAIR_LOSSES and len(indices) == 3:
            indices = lmu.convert_to_pairs(indices, labels, ref_labels)  # the pairs PML scores
        stats.used_triplets = int(indices[1].numel() + (indices[3].numel() if len(indices) == 4 else 0))
        stats.active = _active_terms(self.loss_fn)
        matches, _ = lmu.get_matches_and_diffs(labels, labels if ref is emb else ref_labels)
        stats.candidates = int(matches.sum()) - (0 if ref is emb else len(emb))
        return loss, stats

    def state_dict(self) -> Optional[dict]:
        """The memory's content (for exact resume), or None without a memory."""
        if self.memory is None:
            return None
        m = self.memory
        return {"embeddings": m.embedding_memory.detach().cpu().clone(),
                "labels": m.label_memory.detach().cpu().clone(),
                "queue_idx": int(m.queue_idx), "filled": bool(m.has_been_filled)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if state is None or self.memory is None:
            return
        m = self.memory
        if tuple(state["embeddings"].shape) != tuple(m.embedding_memory.shape):
            raise ValueError("cross-batch memory size/dimension differ from the saved state")
        m.embedding_memory = state["embeddings"].clone().float()
        m.label_memory = state["labels"].clone().long()
        m.queue_idx, m.has_been_filled = int(state["queue_idx"]), bool(state["filled"])
