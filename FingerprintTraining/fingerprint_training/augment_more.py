"""Augmentations that imitate what differs between hospitals and scanners, batched in torch.

2D: intensity curves (gamma), blur and sharpening, noise, JPEG artefacts (8x8 block-DCT
quantisation, as a heavily compressed copy has), down-and-up sampling, random erasing
(burned-in text, markers), a lost aspect ratio (copies squashed to a square, as the Kermany
images were). 3D: smooth intensity non-uniformity (bias field) and thick-slice resolution loss;
rigid misalignment is the affine step of ``augment`` with wider ranges.

Each option is applied to each image with probability ``extra_prob``; every random number comes
from the caller's CPU ``torch.Generator``, so a step's augmentation is reproducible (exact
resume). MONAI has per-sample equivalents (RandBiasField, RandGaussianSharpen,
RandCoarseDropout...); these run on the whole batch on the training device instead.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from .augment import AugmentConfig, augment

# JPEG's standard luminance quantisation table (ITU-T T.81, Annex K), in 8-bit grey levels.
_JPEG_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)

PRESETS = {
    # The Few-Shot Fingerprinting paper's X-ray recipe (the default of AugmentConfig).
    "paper": AugmentConfig(),
    # 2D, for models meant to work on X-rays from other hospitals.
    "domain-2d": AugmentConfig(rotate_deg=10.0, shift=0.08, scale=0.12, brightness=0.2, contrast=0.25,
                               gamma=0.4, blur_sharpen=1.0, noise=0.08, jpeg=0.3, down_up=2.0,
                               erase=0.3, bias_field=0.3, extra_prob=0.4),
    # 3D: misalignment up to the moved-query evaluation's range, bias field, thick slices.
    "domain-3d": AugmentConfig(rotate_deg=15.0, shift=0.10, scale=0.08, brightness=0.15, contrast=0.2,
                               gamma=0.3, blur_sharpen=0.5, noise=0.05, bias_field=0.4,
                               resolution=3.0, extra_prob=0.5),
    "none": None,
}


def preset(name: str, dims: int = 2, **overrides) -> AugmentConfig:
    """The named preset ("domain" picks domain-2d or domain-3d by ``dims``), with overrides."""
    if name == "domain":
        name = "domain-3d" if dims == 3 else "domain-2d"
    if name not in PRESETS or PRESETS[name] is None:
        raise ValueError(f"unknown augmentation preset {name!r}; use paper, domain, "
                         f"domain-2d or domain-3d")
    if (overrides.get("aspect") or 0) < 0:
        raise ValueError(f"the aspect range is a log-ratio of at least 0, not {overrides['aspect']}")
    if not 0 <= (overrides.get("scale") or 0) < 1:
        raise ValueError(f"the zoom range is a fraction in [0, 1), not {overrides['scale']}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def augment_batch(x: torch.Tensor, gen, cfg: AugmentConfig) -> torch.Tensor:
    """The training augmentation: the paper's affine and intensity jitter (``augment``), then
    the domain-shift options that ``cfg`` turns on, drawn after the paper's draws so that
    its recipe stays unchanged."""
    x = augment(x, gen, cfg)
    return domain_shift(x, gen, cfg) if cfg.has_extras() else x


def _u(n, lo, hi, gen):
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def _gauss_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    dims = x.dim() - 2
    conv = F.conv2d if dims == 2 else F.conv3d
    out = x
    for axis in range(dims):  # separable: one 1D kernel per axis, replicate edges
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = k.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), k.view(shape))
    return out


def _dct_matrix(n: int = 8, dtype=torch.float32, device=None) -> torch.Tensor:
    i = torch.arange(n, dtype=dtype, device=device)
    m = torch.cos(math.pi * (2 * i[None] + 1) * i[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def _jpeg(x: torch.Tensor, quality_scale: torch.Tensor) -> torch.Tensor:
    """Quantise 8x8 block DCT coefficients (x in [0, 1]) with JPEG's table times a scale."""
    b, c, h, w = x.shape
    ph, pw = (-h) % 8, (-w) % 8
    y = F.pad(x, (0, pw, 0, ph), mode="replicate") * 255.0 - 128.0
    H, W = y.shape[2:]
    blocks = y.reshape(b, c, H // 8, 8, W // 8, 8).permute(0, 1, 2, 4, 3, 5)
    d = _dct_matrix(8, x.dtype, x.device)
    coef = d @ blocks @ d.T
    q = (_JPEG_LUMA.to(x.device, x.dtype)[None] * quality_scale.view(b, 1, 1).to(x.dtype)).clamp_min(1.0)
    q = q.view(b, 1, 1, 1, 8, 8)
    coef = torch.round(coef / q) * q
    back = (d.T @ coef @ d).permute(0, 1, 2, 4, 3, 5).reshape(b, c, H, W)
    return ((back + 128.0) / 255.0)[:, :, :h, :w]


def _smooth_field(b, dims, size, gen, device, dtype, grid=3):
    coarse = torch.randn((b, 1) + (grid,) * dims, generator=gen).to(device, dtype)
    mode = "bilinear" if dims == 2 else "trilinear"
    f = F.interpolate(coarse, size=tuple(size), mode=mode, align_corners=True)
    return f / f.flatten(1).abs().amax(1).clamp_min(1e-6).view((b,) + (1,) * (dims + 1))


def domain_shift(x: torch.Tensor, gen, cfg: AugmentConfig) -> torch.Tensor:
    """Apply the domain-shift options of ``cfg`` to a batch (B, 1, *spatial)."""
    b, dims, size = x.shape[0], x.dim() - 2, x.shape[2:]
    shape = (b,) + (1,) * (x.dim() - 1)
    red = tuple(range(1, x.dim()))
    dev, dt = x.device, x.dtype

    def chosen():
        return (torch.rand(b, generator=gen) < cfg.extra_prob).to(dev).view(shape)

    out = x
    if cfg.bias_field:
        field = torch.exp(_smooth_field(b, dims, size, gen, dev, dt) * _u(b, 0, cfg.bias_field, gen).to(dev, dt).view(shape))
        out = torch.where(chosen(), out * field, out)
    if cfg.gamma:
        lo, hi = out.amin(red, keepdim=True), out.amax(red, keepdim=True)
        span = (hi - lo).clamp_min(1e-6)
        g = torch.exp(_u(b, -cfg.gamma, cfg.gamma, gen)).to(dev, dt).view(shape)
        curved = lo + span * ((out - lo) / span).clamp(0, 1) ** g
        out = torch.where(chosen(), curved, out)
    if cfg.blur_sharpen:
        s = _u(b, -1.0, cfg.blur_sharpen, gen).to(dev, dt).view(shape)
        sharp = out + s * (out - _gauss_blur(out, 1.0))
        out = torch.where(chosen(), sharp, out)
    if cfg.down_up > 1 or (dims == 3 and cfg.resolution > 1):
        factors = _u(b, 1.0, max(cfg.down_up, cfg.resolution if dims == 3 else 1.0), gen)
        axes = torch.randint(0, dims, (b,), generator=gen)
        pick = chosen().view(b)
        mode = "bilinear" if dims == 2 else "trilinear"
        rows = []
        for i in range(b):  # sizes differ per image: one at a time (cheap at these sizes)
            xi = out[i:i + 1]
            if bool(pick[i]) and float(factors[i]) > 1.05:
                f = float(factors[i])
                if dims == 3:  # thick slices: lose resolution along one axis only
                    small = [int(s) for s in size]
                    small[int(axes[i])] = max(2, int(round(size[int(axes[i])] / f)))
                else:
                    small = [max(4, int(round(s / f))) for s in size]
                lowres = F.interpolate(xi, size=tuple(small), mode=mode, align_corners=False, antialias=dims == 2)
                xi = F.interpolate(lowres, size=tuple(size), mode=mode, align_corners=False)
            rows.append(xi)
        out = torch.cat(rows)
    if cfg.jpeg and dims == 2:
        scale = _u(b, 0.5, 4.0, gen)  # about JPEG quality 90 down to 15
        pick = (torch.rand(b, generator=gen) < cfg.jpeg).to(dev).view(shape)
        out = torch.where(pick, _jpeg(out.clamp(0, 1), scale), out)
    if cfg.noise:
        std = out.std(red, keepdim=True)
        sigma = _u(b, 0, cfg.noise, gen).to(dev, dt).view(shape) * std
        noise = torch.randn(out.shape, generator=gen).to(dev, dt)
        out = torch.where(chosen(), out + sigma * noise, out)
    if cfg.erase:
        # One rectangle (box) of 1-8 % of the field, filled with white (burned-in text,
        # markers) or with the image mean (cut-out), per chosen image.
        pick = (torch.rand(b, generator=gen) < cfg.erase).to(dev)
        frac = _u(b, 0.01, 0.08, gen)
        aspect = torch.exp(_u(b, -1.0, 1.0, gen))
        mask = torch.ones((b,) + tuple(size), dtype=torch.bool, device=dev)
        for axis in range(dims):
            n = size[axis]
            side = (frac ** (1.0 / dims)) * (aspect ** (1 if axis == 0 else -1 / max(1, dims - 1)))
            length = (side.clamp(0.02, 0.9) * n).round().clamp_min(1)
            start = (torch.rand(b, generator=gen) * (n - length + 1)).floor()
            coord = torch.arange(n, device=dev).view((1,) + (1,) * axis + (n,) + (1,) * (dims - 1 - axis))
            lo = start.to(dev).view((b,) + (1,) * dims)
            hi = (start + length).to(dev).view((b,) + (1,) * dims)
            mask &= (coord >= lo) & (coord < hi)
        white = (torch.rand(b, generator=gen) < 0.5).to(dev).view((b,) + (1,) * dims)
        fill = torch.where(white, out.amax(red).view((b,) + (1,) * dims), out.mean(red).view((b,) + (1,) * dims))
        mask = (mask & pick.view((b,) + (1,) * dims)).unsqueeze(1)
        out = torch.where(mask, fill.unsqueeze(1).to(dt), out)
    if cfg.aspect:
        out = torch.where(chosen(), _stretch(out, gen, cfg.aspect), out)
    return out


def _stretch(x: torch.Tensor, gen, log_range: float) -> torch.Tensor:
    """Stretch one random axis of each image against the others by a ratio exp(U(-r, r)),
    keeping the area (volume): what squashing a copy to a square does to its anatomy. Drawn
    last, so that presets without it keep their random numbers."""
    b, dims = x.shape[0], x.dim() - 2
    ratio = _u(b, -log_range, log_range, gen)
    axis = torch.randint(0, dims, (b,), generator=gen)
    picked = F.one_hot(axis, dims).bool()
    # Log-zoom r (d-1)/d along the chosen axis and -r/d along each other one: ratio exp(r),
    # the log-zooms sum to 0 (area or volume kept).
    zoom = torch.where(picked, ratio[:, None] * (dims - 1) / dims, -ratio[:, None] / dims)
    # affine_grid maps output to input coordinates, in (x, y[, z]) order: the inverse zoom,
    # axes reversed from the tensor's (..., H, W) order.
    theta = torch.zeros(b, dims, dims + 1)
    theta[:, range(dims), range(dims)] = torch.exp(-zoom).flip(1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
