"""Domain-shift augmentation (augment_more.py): reproducible, shape- and range-safe, and each
option really changes the image the way it says."""

from dataclasses import replace

import pytest
import torch

from fingerprint_training.augment import AugmentConfig, augment
from fingerprint_training.augment_more import _dct_matrix, _jpeg, augment_batch, domain_shift, preset


def _batch(dims=2, b=6, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((b, 1) + (n,) * dims, generator=g)
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1) if dims == 2 else x


@pytest.mark.parametrize("dims,name", [(2, "domain"), (3, "domain")])
def test_presets_are_reproducible_and_keep_shape(dims, name):
    x = _batch(dims, n=16 if dims == 3 else 32)
    cfg = preset(name, dims)
    a = augment_batch(x, torch.Generator().manual_seed(5), cfg)
    b = augment_batch(x, torch.Generator().manual_seed(5), cfg)
    c = augment_batch(x, torch.Generator().manual_seed(6), cfg)
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_paper_preset_is_the_old_recipe():
    x = _batch()
    assert not preset("paper").has_extras()
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(1), preset("paper")),
                       augment(x, torch.Generator().manual_seed(1), AugmentConfig()))
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        preset("strong")


def test_dct_is_orthonormal_and_jpeg_quantises_blocks():
    d = _dct_matrix(8)
    assert torch.allclose(d @ d.T, torch.eye(8), atol=1e-6)
    x = _batch(b=2)
    fine = _jpeg(x, torch.tensor([0.01, 0.01]))
    coarse = _jpeg(x, torch.tensor([8.0, 8.0]))
    assert (fine - x).abs().max() < 2 / 255
    assert (coarse - x).abs().mean() > 5 * (fine - x).abs().mean()


def _only(**kw):
    return AugmentConfig(rotate_deg=0, shift=0, scale=0, brightness=0, contrast=0, extra_prob=1.0, **kw)


def test_each_option_changes_the_image():
    x = _batch()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    blur = domain_shift(x, g(), _only(blur_sharpen=1.0))
    assert not torch.equal(blur, x)
    noisy = domain_shift(x, g(), _only(noise=0.2))
    assert (noisy - x).std() > 0.02 * x.std()
    erased = domain_shift(x, g(), _only(erase=1.0))
    changed = (erased != x).flatten(1).float().mean(1)
    assert ((changed > 0.005) & (changed < 0.2)).all()   # one box of 1-8 % of the field each
    down = domain_shift(x, g(), _only(down_up=4.0))
    assert not torch.equal(down, x) and down.shape == x.shape
    v = _batch(3, b=4, n=12)
    field = domain_shift(v, g(), _only(bias_field=0.5))
    ratio = field / v.clamp_min(1e-3)
    assert ratio.std() > 0.01                         # a multiplicative, varying field
    thick = domain_shift(v, g(), _only(resolution=3.0))
    assert thick.shape == v.shape and torch.isfinite(thick).all()


def test_aspect_stretches_one_axis_and_keeps_the_area():
    """A centred square becomes a rectangle with the drawn ratio; off (0) draws nothing, so the
    presets without it keep their random numbers."""
    from fingerprint_training.augment_more import _stretch

    x = torch.zeros(8, 1, 64, 64)
    x[:, :, 24:40, 24:40] = 1.0
    out = _stretch(x, torch.Generator().manual_seed(3), 0.5)
    for img in out[:, 0] > 0.5:
        rows, cols = img.any(1).sum().item(), img.any(0).sum().item()
        assert max(rows, cols) / min(rows, cols) <= 1.75           # exp(0.5) = 1.65, plus a pixel
        assert abs(rows * cols - 256) / 256 < 0.25                  # area of the 16 x 16 square
    ratios = [max(r, c) / min(r, c) for r, c in ((i.any(1).sum().item(), i.any(0).sum().item())
                                                 for i in out[:, 0] > 0.5)]
    assert max(ratios) > 1.2                                        # it does stretch
    v = torch.zeros(2, 1, 16, 16, 16)
    assert _stretch(v, torch.Generator().manual_seed(0), 0.3).shape == v.shape
    cfg = preset("domain", 2)
    assert cfg.aspect == 0 and preset("domain", 2, aspect=0.4).aspect == 0.4
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with_off = augment_batch(x, g1, cfg)
    assert torch.equal(with_off, augment_batch(x, g2, preset("domain", 2, aspect=None)))
    with pytest.raises(ValueError, match="aspect"):
        preset("domain", 2, aspect=-1)


def test_scale_override_widens_the_zoom():
    # A centred 16 x 16 square: its side after augmentation measures the zoom drawn.
    x = torch.zeros(256, 1, 64, 64)
    x[:, :, 24:40, 24:40] = 1.0

    def sides(cfg):
        out = augment(x, torch.Generator().manual_seed(3), replace(cfg, rotate_deg=0.0, shift=0.0))
        return torch.tensor([i.any(1).sum().item() for i in out[:, 0] > 0.5], dtype=torch.float32)

    narrow, wide = sides(preset("domain", 2)), sides(preset("domain", 2, scale=0.35))
    assert narrow.min() >= 13 and narrow.max() <= 19               # 16 px x (1 +- 0.12)
    assert wide.min() <= 12 and wide.max() >= 21                   # 16 px x (1 +- 0.35)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="zoom"):
            preset("domain", 2, scale=bad)
