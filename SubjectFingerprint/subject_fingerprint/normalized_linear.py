"""The embedding layer of a model trained on L2-normalised embeddings.

Training with ``--normalize`` compares unit-length embeddings; if the saved network returned
the raw ones, every distance the engine computes (library, query, dedup, calibration) would be
a different one from the distance trained and validated on. So such a network ends in this
layer: ``nn.Linear``'s parameters under ``nn.Linear``'s names (weights move freely between the
two kinds of model), with a unit-length output.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class NormalizedLinear(nn.Linear):
    """``nn.Linear`` whose output rows are L2-normalised."""

    def forward(self, x):
        return F.normalize(super().forward(x), dim=1)
