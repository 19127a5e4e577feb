"""Seeded augmentation of preprocessed tensors (B, 1, H, W) or (B, 1, D, H, W).

2D (as the Few-Shot Fingerprinting X-ray setting): rotation +-5 degrees, shift +-5 %, scale
+-5 %, then brightness/contrast jitter. 3D: random affine (rotation about each axis, shift,
scale) and the same intensity jitter. Implemented with torch ``affine_grid``/``grid_sample`` so
it runs batched on the training device and is reproducible from a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = 5.0       # 2D: in-plane; 3D: about each axis
    shift: float = 0.05           # fraction of the field of view
    scale: float = 0.05           # +- relative zoom
    brightness: float = 0.1       # +- fraction of the image's standard deviation
    contrast: float = 0.1         # +- relative contrast around the image mean
    prob: float = 1.0             # probability that an image is augmented at all
    # Domain-shift options (0 = off, the paper's recipe): applied by ``augment_more.augment_batch``.
    gamma: float = 0.0            # log-gamma range: intensity curve x ** exp(U(-g, g))
    blur_sharpen: float = 0.0     # x + s * (x - blur(x)), s in U(-1, blur_sharpen), sigma 1 px
    noise: float = 0.0            # Gaussian noise, std up to this fraction of the image std
    jpeg: float = 0.0             # 2D: probability of 8x8 block-DCT quantisation (JPEG artefacts)
    down_up: float = 1.0          # largest down-then-up sampling factor (1 = off)
    erase: float = 0.0            # probability of one erased / burned-in rectangle
    bias_field: float = 0.0       # strength of a smooth multiplicative field exp(b * f)
    resolution: float = 1.0       # 3D: largest down-up factor along one random axis (thick slices)
    aspect: float = 0.0           # log-range of an area-keeping stretch of one axis against the rest
    extra_prob: float = 0.5       # probability of each domain-shift option, per image

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def has_extras(self) -> bool:
        return bool(self.gamma or self.blur_sharpen or self.noise or self.jpeg or self.erase
                    or self.bias_field or self.down_up > 1 or self.resolution > 1 or self.aspect)


def _uniform(n, bound, generator, device):
    return (torch.rand(n, generator=generator) * 2.0 - 1.0).mul(bound).to(device)


def _rotation_3d(ax, ay, az):
    cx, sx, cy, sy, cz, sz = ax.cos(), ax.sin(), ay.cos(), ay.sin(), az.cos(), az.sin()
    one, zero = torch.ones_like(ax), torch.zeros_like(ax)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def augment(x: torch.Tensor, generator: Optional[torch.Generator] = None,
            config: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Return an augmented copy of ``x``; random numbers come from ``generator`` (CPU)."""
    if x.dim() not in (4, 5):
        raise ValueError("expected (B, C, H, W) or (B, C, D, H, W)")
    b, dims, device = x.shape[0], x.dim() - 2, x.device
    rad = math.radians(config.rotate_deg)
    scale = 1.0 + _uniform(b, config.scale, generator, device)
    if dims == 2:
        ang = _uniform(b, rad, generator, device)
        rot = torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], 1).view(b, 2, 2)
    else:
        rot = _rotation_3d(*(_uniform(b, rad, generator, device) for _ in range(3)))
    # Normalised coordinates span [-1, 1], so a 5 % shift of the field of view is 0.1.
    shift = torch.stack([_uniform(b, 2 * config.shift, generator, device) for _ in range(dims)], 1)
    theta = torch.cat([rot / scale[:, None, None], shift[:, :, None]], 2).to(x.dtype)
    apply = (torch.rand(b, generator=generator) < config.prob).to(device)
    eye = torch.cat([torch.eye(dims, dtype=x.dtype, device=device),
                     torch.zeros(dims, 1, dtype=x.dtype, device=device)], 1)
    theta = torch.where(apply[:, None, None], theta, eye.expand_as(theta))
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Intensity jitter around each image's own statistics (preprocessing fixed their range).
    red = tuple(range(1, x.dim()))
    mean = out.mean(red, keepdim=True)
    std = out.std(red, keepdim=True).clamp_min(1e-6)
    shape = (b,) + (1,) * (x.dim() - 1)
    contrast = 1.0 + _uniform(b, config.contrast, generator, device).view(shape).to(x.dtype)
    bright = _uniform(b, config.brightness, generator, device).view(shape).to(x.dtype)
    jittered = (out - mean) * contrast + mean + bright * std
    return torch.where(apply.view(shape), jittered, x)
