"""Moved-query 3D evaluation (moved.py): rigid transforms, and scoring on synthetic volumes."""

import numpy as np
import torch

from fingerprint_training.moved import evaluate_moved, move, rigid_transforms


def test_rigid_transforms_are_seeded_rotations_within_range():
    t = rigid_transforms(20, max_rotation=15, max_shift=0.1, seed=4)
    assert torch.equal(t, rigid_transforms(20, 15, 0.1, seed=4))
    r = t[:, :, :3]
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3).expand(20, 3, 3), atol=1e-5)
    assert t[:, :, 3].abs().max() <= 0.2 + 1e-6
    angle = torch.rad2deg(torch.acos(((r.diagonal(dim1=1, dim2=2).sum(1) - 1) / 2).clamp(-1, 1)))
    assert angle.max() < 15 * 3 ** 0.5 and angle.max() > 3
    v = torch.rand(2, 1, 8, 8, 8)
    assert torch.allclose(move(v, rigid_transforms(2, 0, 0)), v, atol=1e-5)


def test_moved_queries_defeat_pixel_correlation_but_not_an_invariant_embedding():
    rng = np.random.default_rng(0)
    n_sub, size = 12, 16
    base = torch.nn.functional.interpolate(torch.rand(n_sub, 1, 10, 10, 10), size=(size,) * 3,
                                           mode="trilinear", align_corners=False)
    vols = torch.cat([base, base * 0.8 + 0.1 * torch.rand_like(base)])   # two "sequences"
    labels = np.tile(np.arange(n_sub), 2)
    groups = np.repeat([0, 1], n_sub)
    moved = move(vols, rigid_transforms(len(vols), 15, 0.1, seed=1))
    emb = rng.normal(size=(n_sub, 8))[labels]                          # a perfect, invariant model
    r = evaluate_moved(emb, emb, vols.numpy(), moved.numpy(), labels, groups,
                       ways=(10, 30), shots=(1,), episodes=20)
    s = r["settings"][0]
    assert s["n_way"] == 10 and s["model"]["mean_recall_at_k"] == 1.0
    assert s["pixel_correlation"]["mean_recall_at_k"] < 1.0
    assert r["precision_at_1"]["model"] == 1.0 and r["precision_at_1"]["queries"] == 24
    assert any("30-way" in n for n in r["notes"])
    still = evaluate_moved(emb, emb, vols.numpy(), vols.numpy(), labels, groups, ways=(10,), episodes=20)
    assert still["settings"][0]["pixel_correlation"]["mean_recall_at_k"] > s["pixel_correlation"]["mean_recall_at_k"]


def test_canonical_pose_baseline_is_scored_on_the_same_episodes():
    from subject_fingerprint.canonical_pose import CanonicalPose

    n_sub, size = 10, 24
    g = torch.Generator().manual_seed(0)
    axes = torch.linspace(-1, 1, size)
    z, y, x = torch.meshgrid(axes, axes, axes, indexing="ij")
    vols = []
    for s in range(n_sub):  # ellipsoids of distinct shapes, textured
        r = 0.45 + 0.4 * torch.rand(3, generator=g)
        inside = (x / r[0]) ** 2 + (y / r[1]) ** 2 + (z / r[2]) ** 2 <= 1
        vols.append(inside.float() * (0.6 + 0.4 * torch.rand((size,) * 3, generator=g)))
    vols = torch.stack(vols)[:, None]
    vols = torch.cat([vols, vols * 0.9])
    labels, groups = np.tile(np.arange(n_sub), 2), np.repeat([0, 1], n_sub)
    moved = move(vols, rigid_transforms(len(vols), 15, 0.1, seed=2))
    pose = CanonicalPose()
    emb = np.eye(n_sub)[labels]
    r = evaluate_moved(emb, emb, vols.numpy(), moved.numpy(), labels, groups, ways=(5,),
                       episodes=20, canonical_pix=(pose(vols).numpy(), pose(moved).numpy()))
    s = r["settings"][0]
    assert s["pixel_correlation_canonical"]["mean_recall_at_k"] >= s["pixel_correlation"]["mean_recall_at_k"]
    assert set(r["precision_at_1"]) == {"model", "queries", "pixel_correlation",
                                        "pixel_correlation_canonical"}
