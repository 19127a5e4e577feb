"""Canonical pose: an image moved rigidly comes back to the same frame, without reflection, and a
model built with it saves, loads and embeds moved and unmoved copies alike."""

import math

import numpy as np
import pytest
import torch

from subject_fingerprint.canonical_pose import CanonicalPose, canonical_theta


def _ellipsoid(size=32, radii=(0.7, 0.5, 0.35), seed=0):
    """An off-centre, textured ellipsoid (B=1): distinct principal axes, like a head."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(axes, axes, axes, indexing="ij")
    inside = ((x - 0.1) / radii[0]) ** 2 + (y / radii[1]) ** 2 + ((z + 0.05) / radii[2]) ** 2 <= 1
    texture = 0.5 + 0.5 * torch.rand((size,) * 3, generator=g)
    return (inside.float() * texture)[None, None]


def _move(x, degrees, shift):
    from fingerprint_training.augment import _rotation_3d

    a = torch.tensor([math.radians(d) for d in degrees])
    rot = _rotation_3d(a[None, 0], a[None, 1], a[None, 2])
    theta = torch.cat([rot, torch.tensor(shift, dtype=torch.float32)[None, :, None]], 2)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, align_corners=False)


def _corr(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("degrees,shift", [((12, -9, 14), (0.08, -0.1, 0.05)),
                                           ((-15, 15, -15), (-0.1, 0.1, 0.1))])
def test_a_moved_volume_returns_to_the_same_frame(degrees, shift):
    x = _ellipsoid()
    moved = _move(x, degrees, shift)
    assert _corr(x, moved) < 0.8                       # the move really misaligns
    pose = CanonicalPose()
    assert _corr(pose(x), pose(moved)) > 0.97


def test_pose_is_a_rotation_near_the_image_axes_and_no_reflection():
    x = torch.cat([_ellipsoid(seed=s) for s in range(3)] +
                  [_move(_ellipsoid(seed=3), (10, 5, -8), (0, 0, 0))])
    theta = canonical_theta(x)
    rot = theta[:, :, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-4)
    assert torch.all(torch.linalg.det(rot) > 0.999)
    assert torch.all(torch.diagonal(rot, dim1=1, dim2=2) > 0.9)   # nearest the image axes
    assert torch.allclose(theta[0, :, 3], torch.tensor([0.1, 0.0, -0.05]), atol=0.03)  # centroid


def test_two_dimensional_images_and_empty_ones():
    img = _ellipsoid(size=32)[:, :, 16]                # a 2D ellipse slice (1, 1, 32, 32)
    rot = canonical_theta(img)[0, :, :2]
    assert torch.allclose(rot @ rot.T, torch.eye(2), atol=1e-4) and torch.det(rot) > 0
    out = CanonicalPose()(torch.zeros(2, 1, 16, 16))   # nothing to weigh: no NaN
    assert torch.isfinite(out).all()


def test_model_with_canonical_pose_saves_loads_and_ignores_motion(tmp_path):
    from subject_fingerprint.checkpoint import load_checkpoint, save_checkpoint
    from subject_fingerprint.model import FingerprintModel
    from subject_fingerprint.preprocess import Preprocessing

    prep = Preprocessing(spatial_dims=3, size=(32, 32, 32))
    torch.manual_seed(0)
    model = FingerprintModel.create(3, depth=10, embedding_dim=8, preprocessing=prep,
                                    canonical_pose=True)
    torch.manual_seed(0)
    plain = FingerprintModel.create(3, depth=10, embedding_dim=8, preprocessing=prep)
    assert model.architecture["canonical_pose"] is True and "canonical_pose" not in plain.architecture
    assert model.model_id != plain.model_id
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.model_id == model.model_id
    x = _ellipsoid()
    moved = _move(x, (12, -9, 14), (0.08, -0.1, 0.05))
    with torch.no_grad():
        e, em = loaded.network.eval()(torch.cat([x, moved])).numpy()
        p, pm = plain.network.eval()(torch.cat([x, moved])).numpy()
    # The posed model sees nearly the same input; the plain one does not.
    assert np.linalg.norm(e - em) < 0.5 * np.linalg.norm(p - pm)
