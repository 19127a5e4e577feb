"""Pair-verification head: the probability that two embeddings show the same subject.

As in Packhäuser et al. (siamese network, binary cross-entropy), an option next to the
distance: a small network reads a pair of embeddings and says "same" or "different". Its input
is ``[|a - b|, a * b]``, so the score is symmetric in the pair by construction. The head never
changes the embeddings (training feeds it detached ones), so a model with a head makes the same
library as the model without it, and its model ID does not cover the head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

HIDDEN = 64


class PairHead(nn.Module):
    """``forward(a, b)`` -> logits (B,) of "same subject" for embedding pairs ``a[i], b[i]``."""

    def __init__(self, embedding_dim: int, hidden: int = HIDDEN, normalize: bool = False):
        super().__init__()
        self.embedding_dim, self.hidden = int(embedding_dim), int(hidden)
        self.normalize = bool(normalize)  # as the model's training did: L2-normalised inputs
        self.net = nn.Sequential(nn.Linear(2 * self.embedding_dim, self.hidden), nn.ReLU(),
                                 nn.Linear(self.hidden, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            a, b = nn.functional.normalize(a, dim=1), nn.functional.normalize(b, dim=1)
        return self.net(torch.cat([(a - b).abs(), a * b], dim=1)).squeeze(1)

    def config(self) -> dict:
        return {"embedding_dim": self.embedding_dim, "hidden": self.hidden,
                "normalize": self.normalize, "input": "abs-difference, product"}

    @classmethod
    def from_config(cls, config: dict) -> "PairHead":
        return cls(int(config["embedding_dim"]), int(config.get("hidden", HIDDEN)),
                   bool(config.get("normalize", False)))


def batch_pair_loss(head: PairHead, embeddings: torch.Tensor, labels: torch.Tensor):
    """Binary cross-entropy over every pair i < j of a training batch, the positives weighted
    up to the negatives' total (a P x K batch has K-1 positives per anchor and (P-1) K
    negatives). Returns ``(loss, accuracy)``; ``embeddings`` should be detached."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=embeddings.device)
    target = (labels[i] == labels[j]).float()
    positives = target.sum()
    if positives == 0 or positives == len(target):
        # Nothing to learn from; a zero loss that still touches every weight (DDP needs that).
        return head(embeddings[:1], embeddings[:1]).sum() * 0.0, float("nan")
    logits = head(embeddings[i], embeddings[j])
    pos_weight = (len(target) - positives) / positives
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    accuracy = float(((logits > 0).float() == target).float().mean())
    return loss, accuracy


@torch.no_grad()
def pair_probabilities(head: PairHead, a, b, batch: int = 65536) -> np.ndarray:
    """P(same subject) for the rows ``a[n], b[n]`` (NumPy or torch, float32), in batches."""
    head = head.eval()
    a = torch.as_tensor(np.asarray(a, dtype=np.float32))
    b = torch.as_tensor(np.asarray(b, dtype=np.float32))
    device = next(head.parameters()).device
    out = [torch.sigmoid(head(a[s:s + batch].to(device), b[s:s + batch].to(device))).cpu()
           for s in range(0, len(a), batch)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)
