"""Canonical pose: each image resampled into the frame of its own intensity moments.

A repeat scan is not aligned with the first one: the head sits a few degrees and millimetres
elsewhere. Rather than hoping the network learns that invariance from a few dozen subjects, a
``CanonicalPose`` layer in front of it undoes rigid motion analytically: the image's
intensity-weighted centroid becomes the grid centre and its principal axes (the eigenvectors of
the intensity-weighted covariance) the grid axes. Of the axis orders and signs the eigenvectors
allow, the one closest to the image's own axes is taken, so an image within some 20 degrees of
the scanner's orientation keeps its anatomical orientation (left stays left) and the frame is
stable: the same volume moved by up to 15 degrees and 10 % of the field of view comes back
with a correlation of 0.97-1.00 to its unmoved self (BENCHMARKS.md).

Intensity weighting, not a foreground mask, is what worked across MRI sequences: on the
lgg-mri-80 test split, pixel correlation of moved queries rose from 14.7 % (10-way 1-shot) to
87.1 % once both sides were canonicalised, against 57-76 % with foreground masks at several
thresholds.
The pose is estimated without gradients and in float32/float64 whatever the autocast; it has
no weights, and the network behind it is an ordinary ResNet.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def canonical_theta(x: torch.Tensor) -> torch.Tensor:
    """(B, n, n+1) ``affine_grid`` matrices that sample images ``x`` (B, 1, *spatial) in their
    canonical frame: rotation = principal axes (nearest the image axes), shift = centroid."""
    n = x.dim() - 2
    b = x.shape[0]
    eye = torch.eye(n, n + 1, device=x.device).expand(b, n, n + 1)
    grid = F.affine_grid(eye, list(x.shape), align_corners=False).reshape(b, -1, n)
    w = x.float().reshape(b, -1).clamp(min=0)
    total = w.sum(1).clamp(min=1e-12)
    centre = torch.einsum("bp,bpi->bi", w, grid) / total[:, None]
    d = (grid - centre[:, None, :]).double()
    cov = torch.einsum("bp,bpi,bpj->bij", w.double(), d, d) / total.double()[:, None, None]
    _, vectors = torch.linalg.eigh(cov)  # columns: principal axes
    # Axis order nearest the image axes: the permutation with the largest |diagonal|.
    perms = torch.tensor(list(itertools.permutations(range(n))), device=x.device)
    rows = torch.arange(n, device=x.device).expand(len(perms), n)
    best = vectors.abs()[:, rows, perms].sum(2).argmax(1)               # (B,)
    rot = torch.gather(vectors, 2, perms[best][:, None, :].expand(b, n, n))
    signs = torch.sign(torch.diagonal(rot, dim1=1, dim2=2))
    rot = rot * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None, :]
    # A reflection is not a pose: flip the axis that is least sure of its sign.
    flip = torch.linalg.det(rot) < 0
    if flip.any():
        weakest = torch.diagonal(rot, dim1=1, dim2=2).abs().argmin(1)
        fix = torch.ones(b, n, dtype=rot.dtype, device=x.device)
        fix[flip, weakest[flip]] = -1.0
        rot = rot * fix[:, None, :]
    return torch.cat([rot.float(), centre[:, :, None]], 2)


class CanonicalPose(nn.Module):
    """Resample each image into its canonical frame (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            with torch.no_grad():
                grid = F.affine_grid(canonical_theta(x), list(x.shape), align_corners=False)
            out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        return out.to(x.dtype)


class CanonicalPoseNetwork(nn.Module):
    """``CanonicalPose`` then the embedding network (``.resnet``)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.pose = CanonicalPose()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(self.pose(x))
