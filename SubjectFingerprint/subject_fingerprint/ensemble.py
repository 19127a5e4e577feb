"""Ensembles: one fingerprint model made of several trained ones.

An ensemble embeds an image with every member and concatenates the members' L2-normalised
embeddings, scaled so that the result has unit length: its squared euclidean distance is the
mean of the members' squared distances on the unit sphere, so members trained apart (other
input sizes, other augmentations) vote with equal weight. The input is prepared with the
preprocessing of the member that takes the largest input; a member that takes a smaller one
gets it shrunk inside the network, the way the preprocessing shrinks images
(``preprocess.resize_tensor``).

The checkpoint's architecture block is ``{"name": "ensemble", "spatial_dims", "embedding_dim",
"members": [each member's architecture plus its input "size"]}``; the weights are stored under
``members.<i>.``.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .preprocess import resize_tensor


class EnsembleNetwork(nn.Module):
    """Members' unit-length embeddings side by side, divided by the square root of their
    number."""

    def __init__(self, members, sizes):
        super().__init__()
        if len(members) != len(sizes) or not members:
            raise ValueError("an ensemble needs one input size per member, and at least one member")
        self.members = nn.ModuleList(members)
        self.sizes = [tuple(int(s) for s in size) for size in sizes]
        # ONNX (opset 17) has no antialiased resize, and torch's exporter dumps the whole graph
        # to stdout when it meets one: the backends read this and do not try.
        self.onnx_unsupported = ("a member takes smaller 2D images (antialiased resize)"
                                 if len(self.sizes[0]) == 2 and len(set(self.sizes)) > 1 else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [F.normalize(net(resize_tensor(x, size)).float(), dim=1)
                 for net, size in zip(self.members, self.sizes)]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))


def is_ensemble(architecture: dict) -> bool:
    return (architecture or {}).get("name") == "ensemble"


def build_ensemble(architecture: dict) -> EnsembleNetwork:
    """An untrained ``EnsembleNetwork`` of the shape an architecture block describes."""
    from .model import build_resnet_from

    members = architecture.get("members") or []
    if not members:
        raise ValueError("the ensemble's architecture names no members")
    return EnsembleNetwork([build_resnet_from(m) for m in members], [m["size"] for m in members])


def _compatible(models) -> None:
    """Raise ``ValueError`` unless the members can share one preprocessed input."""
    first = models[0]
    for i, m in enumerate(models[1:], start=2):
        a, b = first.preprocessing, m.preprocessing
        if m.spatial_dims != first.spatial_dims:
            raise ValueError(f"member 1 embeds {first.spatial_dims}D images, member {i} "
                             f"{m.spatial_dims}D ones")
        for field in ("resize", "clip_percentiles", "spacing"):
            if getattr(a, field) != getattr(b, field):
                raise ValueError(f"members 1 and {i} prepare images differently ({field}: "
                                 f"{getattr(a, field)!r} and {getattr(b, field)!r})")
        if sorted(m.modalities) != sorted(first.modalities):
            raise ValueError(f"members 1 and {i} were trained on different modalities "
                             f"({first.modalities} and {m.modalities})")
    for i, m in enumerate(models, start=1):
        if m.preprocessing.test_shift:
            raise ValueError(f"member {i} embeds with test-time views; combine the models "
                             f"without them and derive views of the ensemble instead")


def combine(models):
    """The ensemble ``FingerprintModel`` of ``models`` (two or more, same kind of image).

    Nothing fitted on the members' embeddings carries over (calibration, figures, pair head):
    calibrate the ensemble on validation subjects before using its probabilities.
    """
    from .model import FingerprintModel

    models = list(models)
    if len(models) < 2:
        raise ValueError("an ensemble needs at least two models")
    _compatible(models)
    largest = max(models, key=lambda m: math.prod(m.preprocessing.size))
    members = [{**m.architecture, "size": list(m.preprocessing.size)} for m in models]
    if any(is_ensemble(a) for a in members):
        raise ValueError("a member is itself an ensemble; combine its members instead")
    # Copies: the members stay usable (and trainable) on their own without changing the ensemble.
    network = EnsembleNetwork([copy.deepcopy(m.network) for m in models],
                              [m.preprocessing.size for m in models])
    sources, seen = [], set()
    for m in models:
        for s in (m.metadata.get("training") or {}).get("sources") or []:
            if s.get("source") not in seen:
                seen.add(s.get("source"))
                sources.append(s)
    metadata = {
        "architecture": {"name": "ensemble", "spatial_dims": largest.spatial_dims,
                         "embedding_dim": sum(m.embedding_dim for m in models), "members": members},
        "modalities": list(largest.modalities),
        "training": {"ensemble_of": [{"model_id": m.model_id, "training": m.metadata.get("training")}
                                     for m in models],
                     "sources": sources},
        "calibration": None,
        "metrics": {},
    }
    return FingerprintModel(network.eval(), largest.preprocessing, metadata)
