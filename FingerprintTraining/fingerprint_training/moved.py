"""3D evaluation with moved queries: co-registered sequences share their geometry, so pixel
correlation re-identifies them almost perfectly; real repeat scans are not aligned.

Every query volume gets a seeded random rigid transform (rotation up to ``max_rotation``
degrees about each axis, shift up to ``max_shift`` of the field of view along each axis) and is
resampled (trilinear, zero outside) on the model's input grid; the supports stay where they
are. Episodes are cross-modal N-way K-shot (supports of other sequences than the query's),
drawn by ``metrics.sample_episodes``; the model and pixel correlation are scored on the same
episodes and the same moved volumes. Preprocessing pads to keep the physical aspect ratio, so
on a cubic input grid a rotation in normalised coordinates is rigid in millimetres too.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def rigid_transforms(n: int, max_rotation: float = 15.0, max_shift: float = 0.10,
                     seed: int = 0) -> torch.Tensor:
    """(n, 3, 4) affine_grid matrices: rotations U(-r, r) about x, y, z; shifts U(-s, s) FOV."""
    from .augment import _rotation_3d

    rng = np.random.default_rng(seed)
    ang = torch.from_numpy(rng.uniform(-1, 1, (n, 3)) * math.radians(max_rotation)).float()
    shift = torch.from_numpy(rng.uniform(-1, 1, (n, 3)) * 2.0 * max_shift).float()  # [-1, 1] spans the FOV
    rot = _rotation_3d(ang[:, 0], ang[:, 1], ang[:, 2])
    return torch.cat([rot, shift[:, :, None]], 2)


def move(volumes: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample (n, 1, D, H, W) volumes through ``theta`` (n, 3, 4)."""
    grid = F.affine_grid(theta.to(volumes.dtype), list(volumes.shape), align_corners=False)
    return F.grid_sample(volumes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _scores(dist_fn, episodes, labels, max_r=5):
    recalls, hits = [], {r: [] for r in range(1, max_r + 1)}
    for queries, supports in episodes:
        flat = supports.reshape(-1)
        d = np.stack([dist_fn(int(q), flat) for q in queries])      # (N, N*K)
        order = np.argsort(d, axis=1, kind="stable")
        rel = labels[flat][order] == labels[queries][:, None]
        k = supports.shape[1]
        recalls.append(rel[:, :k].sum(1).mean() / k)
        for r in hits:
            hits[r].append(rel[:, :r].any(1).mean())
    return {"mean_recall_at_k": float(np.mean(recalls)), "std_recall_at_k": float(np.std(recalls)),
            "mean_hit_at_r": {str(r): float(np.mean(v)) for r, v in hits.items()}}


def _p_at_1(dist_fn, labels, groups):
    """Each moved query against every unmoved volume of another sequence (leave-one-out)."""
    right = total = 0
    for q in range(len(labels)):
        gallery = np.flatnonzero(groups != groups[q])
        if not (labels[gallery] == labels[q]).any():
            continue
        d = dist_fn(q, gallery)
        right += int(labels[gallery[int(np.argmin(d))]] == labels[q])
        total += 1
    return right / total if total else None, total


def evaluate_moved(fixed_emb, moved_emb, fixed_pix, moved_pix, labels, groups,
                   ways: Sequence[int] = (10,), shots: Sequence[int] = (1,),
                   episodes: int = 100, seed: int = 0, canonical_pix=None) -> dict:
    """Model (Euclidean on embeddings) and pixel correlation, moved queries vs fixed supports.

    ``canonical_pix`` (fixed, moved) adds a second baseline, "pixel_correlation_canonical":
    pixel correlation after both sides were put in their canonical pose (canonical_pose.py),
    the fair reference for a model that canonicalises its inputs itself."""
    from subject_fingerprint.distances import pairwise

    from . import metrics as M
    from .baselines import PixelCorrelation

    labels, groups = np.asarray(labels), np.asarray(groups)
    fz = PixelCorrelation(fixed_pix).z
    mz = PixelCorrelation(moved_pix).z

    def model_d(q, s):
        return np.asarray(pairwise(moved_emb[[q]], fixed_emb[np.asarray(s)], "euclidean"))[0]

    def pixel_d(q, s):
        return np.clip(1.0 - fz[np.asarray(s)] @ mz[q], 0.0, 2.0)

    baselines = {"pixel_correlation": pixel_d}
    if canonical_pix is not None:
        cfz, cmz = (PixelCorrelation(np.asarray(a)).z for a in canonical_pix)
        baselines["pixel_correlation_canonical"] = \
            lambda q, s: np.clip(1.0 - cfz[np.asarray(s)] @ cmz[q], 0.0, 2.0)

    out = {"settings": [], "notes": []}
    for n in ways:
        for k in shots:
            try:
                eps = M.sample_episodes(labels, n, k, episodes, seed, groups)
            except ValueError as exc:
                out["notes"].append(str(exc))
                continue
            setting = {"n_way": int(n), "k_shot": int(k), "episodes": int(episodes),
                       "model": _scores(model_d, eps, labels)}
            setting.update({name: _scores(d, eps, labels) for name, d in baselines.items()})
            out["settings"].append(setting)
    p_model, queries = _p_at_1(model_d, labels, groups)
    out["precision_at_1"] = {"model": p_model, "queries": queries}
    out["precision_at_1"].update({name: _p_at_1(d, labels, groups)[0] for name, d in baselines.items()})
    return out


def run_moved(source: str, split_path: str, model_path: str, out: str, subset: str = "test",
              ways=(10,), shots=(1,), episodes: int = 100, seed: int = 0,
              max_rotation: float = 15.0, max_shift: float = 0.10, device: str = "auto",
              batch_size: int = 8, progress: bool = False, manifest=None) -> dict:
    from subject_fingerprint.checkpoint import load_checkpoint
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.io import discover

    from .evaluate import _embed, _jsonable, _load_subset, _write_text
    from .splits import load_split

    t0 = time.time()
    model = load_checkpoint(model_path)
    if model.spatial_dims != 3:
        raise ValueError(f"{model_path}: moved-query evaluation is for 3D models")
    found = discover([source], manifest=manifest)
    ds = _load_subset(found.records, load_split(split_path), subset, model, progress)
    moved = move(ds.images, rigid_transforms(len(ds), max_rotation, max_shift, seed))
    embedder = Embedder(model, device=device, batch_size=batch_size, progress=False)
    fixed_emb = _embed(embedder, ds.images, batch_size)
    moved_emb = _embed(embedder, moved, batch_size)
    from subject_fingerprint.canonical_pose import CanonicalPose

    pose = CanonicalPose()
    with torch.no_grad():
        canonical = (pose(ds.images).numpy(), pose(moved).numpy())
    res = evaluate_moved(fixed_emb, moved_emb, ds.images.numpy(), moved.numpy(),
                         np.array(ds.subject_ids()), ds.groups, ways, shots, episodes, seed,
                         canonical_pix=canonical)
    res.update({"model": {"path": str(model_path), "model_id": model.model_id},
                "source": str(source), "split": str(split_path), "subset": subset,
                "images": len(ds), "subjects": len(set(ds.subject_ids())),
                "transform": {"max_rotation_deg": max_rotation, "max_shift_fov": max_shift, "seed": seed},
                "load_failures": [f"{f.path}: {f.reason}" for f in list(found.failures) + list(ds.failures)],
                "seconds": round(time.time() - t0, 1)})
    clean = _jsonable(res)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "moved.json", json.dumps(clean, indent=1) + "\n")
    _write_text(out_dir / "moved.md", moved_markdown(clean))
    return clean


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def moved_markdown(res: dict) -> str:
    t = res["transform"]
    lines = [f"# Moved-query evaluation of {html.escape(Path(res['model']['path']).name)} on "
             f"{html.escape(res['subset'])} ({res['images']} volumes, {res['subjects']} subjects)", "",
             f"Queries rotated up to {t['max_rotation_deg']} degrees about each axis and shifted up to "
             f"{100 * t['max_shift_fov']:.0f} % of the field of view (seed {t['seed']}); supports "
             f"unmoved and of another sequence.", "",
             "| setting | model MRe@K | model Hit@5 | pixel corr. MRe@K | pixel Hit@5 | difference "
             "| pixel corr. after canonical pose MRe@K |",
             "|---|---|---|---|---|---|---|"]
    for s in res["settings"]:
        m, p = s["model"], s["pixel_correlation"]
        c = s.get("pixel_correlation_canonical") or {}
        lines.append(f"| {s['n_way']}-way {s['k_shot']}-shot | {_pct(m['mean_recall_at_k'])} | "
                     f"{_pct(m['mean_hit_at_r'].get('5'))} | {_pct(p['mean_recall_at_k'])} | "
                     f"{_pct(p['mean_hit_at_r'].get('5'))} | "
                     f"{100 * (m['mean_recall_at_k'] - p['mean_recall_at_k']):+.1f} | "
                     f"{_pct(c.get('mean_recall_at_k'))} |")
    p1 = res["precision_at_1"]
    lines += ["", f"P@1 (each moved query against every unmoved volume of another sequence, "
                  f"{p1['queries']} queries): model {_pct(p1['model'])}, pixel correlation "
                  f"{_pct(p1['pixel_correlation'])}, pixel correlation after canonical pose "
                  f"{_pct(p1.get('pixel_correlation_canonical'))}."]
    lines += [f"- {html.escape(n)}" for n in res.get("notes", [])]
    return "\n".join(lines) + "\n"
