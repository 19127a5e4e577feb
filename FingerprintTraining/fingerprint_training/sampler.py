"""Subject-balanced batches: P subjects x K images, from a seeded stream shared by all ranks.

Batch ``step`` is a pure function of (seed, step): resuming at step s gives exactly the batches
an uninterrupted run would have drawn, and under DDP every rank draws the same P x world_size
subjects and takes its own slice of them, so ranks never share a subject in a step.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class SubjectBatchSampler:
    """Yields arrays of dataset indices, P subjects x K images per batch.

    ``labels``: subject index of each image; ``groups``: modality code of each image (used when
    ``cross_modal`` requires each subject's K images to span at least two modalities). Subjects
    with fewer than two images (two modalities if cross-modal) are distractors: never sampled.
    """

    def __init__(self, labels: Sequence[int], subjects_per_batch: int, images_per_subject: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 groups: Optional[Sequence[int]] = None, cross_modal: bool = False):
        labels = np.asarray(labels)
        self.groups = np.zeros(len(labels), dtype=np.int64) if groups is None else np.asarray(groups)
        self.cross_modal = bool(cross_modal)
        by_subject = {}
        for idx, lab in enumerate(labels.tolist()):
            by_subject.setdefault(lab, []).append(idx)
        self.members = []
        for lab in sorted(by_subject):
            idx = np.asarray(by_subject[lab], dtype=np.int64)
            if len(idx) < 2:
                continue
            if self.cross_modal and len(np.unique(self.groups[idx])) < 2:
                continue
            self.members.append(idx)
        if not self.members:
            raise ValueError("no subject with two or more images (of two modalities, if "
                             "cross-modal): nothing to train on")
        if images_per_subject < 2:
            raise ValueError("images per subject must be at least 2")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError("rank must be in [0, world_size)")
        # Fewer eligible subjects than requested: shrink P so ranks stay subject-disjoint.
        self.P = max(1, min(int(subjects_per_batch), len(self.members) // self.world_size))
        if self.P * self.world_size > len(self.members):
            raise ValueError(f"{len(self.members)} trainable subjects cannot feed {self.world_size} ranks")
        self.K = int(images_per_subject)

    @property
    def num_subjects(self) -> int:
        return len(self.members)

    @property
    def batch_size(self) -> int:
        return self.P * self.K

    def _images(self, rng, idx: np.ndarray) -> np.ndarray:
        if len(idx) >= self.K:
            chosen = rng.choice(idx, self.K, replace=False)
        else:  # all images, topped up with repeats (augmentation makes the repeats differ)
            chosen = np.concatenate([rng.permutation(idx), rng.choice(idx, self.K - len(idx))])
        if self.cross_modal and len(np.unique(self.groups[chosen])) < 2:
            others = idx[self.groups[idx] != self.groups[chosen[0]]]
            chosen[-1] = rng.choice(others)
        return chosen

    def batch(self, step: int) -> np.ndarray:
        """Dataset indices of this rank's batch at ``step``."""
        rng = np.random.default_rng([self.seed, int(step)])
        picked = rng.choice(len(self.members), self.P * self.world_size, replace=False)
        images = [self._images(rng, self.members[s]) for s in picked]  # same draws on every rank
        mine = images[self.rank * self.P:(self.rank + 1) * self.P]
        return np.concatenate(mine)


class InstanceBatchSampler:
    """Self-supervised batches: P images x K augmented copies, every image its own "subject"
    (singletons included). Used for pretraining before subject-level training."""

    def __init__(self, num_images: int, images_per_batch: int, copies: int = 2, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_images < 2:
            raise ValueError("need at least two images")
        self.n, self.seed, self.rank, self.world_size = int(num_images), int(seed), int(rank), int(world_size)
        self.P = max(1, min(int(images_per_batch), self.n // self.world_size))
        self.K = max(2, int(copies))

    @property
    def batch_size(self) -> int:
        return self.P * self.K

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(step), 1])
        picked = rng.choice(self.n, self.P * self.world_size, replace=False)
        mine = picked[self.rank * self.P:(self.rank + 1) * self.P]
        return np.repeat(mine, self.K)
