"""``subject-fingerprint evaluate``: measure a fingerprint model the papers' way.

On the chosen subset of a split (default: test) it reports
* N-way K-shot Mean-Recall@K and Mean Hit@R (Few-Shot Fingerprinting, Table 1/2 layout),
* whole-gallery leave-one-out mAP@R, R-Precision, P@1 (Packhäuser et al.),
* verification ROC AUC with a bootstrap 95 % interval, and accuracy / TPR / FPR at the
  threshold calibrated on the validation split,
* MIASD / MIESD and the distance histograms of the paper's Figure 2, a t-SNE plot, a ROC plot,
* the pixel-correlation and SSIM (256 px) baselines on the same episodes,
and writes ``metrics.json``, ``results.md`` and PNG figures to ``--out``. With
``--write-calibration`` the fitted calibration and the figures go into the checkpoint.

``evaluate_embeddings`` is the file-free core used by training validation and tests.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import metrics as M

DEFAULT_WAYS = (20, 100)
DEFAULT_SHOTS = (1, 5)
SSIM_MAX_PAIRS = 60000   # about 10 minutes of skimage SSIM at 256 px on one core


# -- the file-free core --------------------------------------------------------------------------

def _settings(labels, ways, shots, groups, notes) -> list:
    """The (n_way, k_shot) settings the data allows; a note for each one it does not."""
    out = []
    for n in ways:
        for k in shots:
            eligible = len(M.eligible_subjects(labels, k, groups))
            if eligible >= n:
                out.append((int(n), int(k)))
            else:
                need = (f"at least {k + 1} images" if groups is None else
                        f"a query with at least {k} images in other modalities")
                notes.append(f"{n}-way {k}-shot skipped: needs {n} subjects with {need}, "
                             f"the data has {eligible}")
    return out


def evaluate_embeddings(embeddings, labels, ways: Sequence[int] = DEFAULT_WAYS,
                        shots: Sequence[int] = DEFAULT_SHOTS, episodes: int = 100, seed: int = 0,
                        max_r: int = 5, groups=None, distance: str = "euclidean",
                        threshold: Optional[float] = None, baselines: Sequence = (),
                        retrieval: bool = True, verification: bool = True, clusters: bool = True,
                        n_boot: int = 1000, max_negatives: int = 200000,
                        baseline_max_pairs: int = SSIM_MAX_PAIRS, keep_pair_distances: bool = False,
                        pair_head=None) -> dict:
    """Every figure of an evaluation, from embeddings and subject labels (no files).

    ``baselines``: objects from ``fingerprint_training.baselines`` (``name``, ``block``,
    callable ``(query, supports)``) over the same images, scored on the same episodes.
    Settings the data cannot support are listed in ``"notes"`` instead of failing.
    ``pair_head`` (a ``verification.PairHead``) adds ``"verification_head"``: the same pairs
    scored by the head's P(same subject) instead of the distance.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if len(e) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(e)} embeddings")
    notes: list = []
    counts = np.unique(labels, return_counts=True)[1]
    out = {
        "data": {"images": int(len(labels)), "subjects": int(len(counts)),
                 "subjects_with_2plus_images": int((counts >= 2).sum()),
                 "max_images_per_subject": int(counts.max()) if len(counts) else 0},
        "protocol": {"episodes": int(episodes), "seed": int(seed), "max_r": int(max_r),
                     "distance": distance, "cross_modal": groups is not None},
        "nway_kshot": [],
        "notes": notes,
    }
    settings = _settings(labels, ways, shots, groups, notes)
    for n, k in settings:
        out["nway_kshot"].append(M.nway_kshot(e, labels, n, k, episodes=episodes, seed=seed,
                                              max_r=max_r, groups=groups, distance=distance))
    if retrieval:
        try:
            out["retrieval"] = M.retrieval_metrics(e, labels, distance=distance)
        except ValueError as exc:
            notes.append(f"retrieval skipped: {exc}")
    pos_pairs = neg_pairs = None
    if verification:
        pos_pairs, neg_pairs = M.pair_indices(labels, max_negatives=max_negatives, seed=seed)
        if len(pos_pairs) and len(neg_pairs):
            pos = M.pair_distances(e, pos_pairs, distance)
            neg = M.pair_distances(e, neg_pairs, distance)
            out["verification"] = M.verification_from_distances(
                pos, neg, threshold=threshold, n_boot=n_boot, seed=seed)
            if keep_pair_distances:
                out["_pair_distances"] = (pos, neg)
            if pair_head is not None:
                from subject_fingerprint.verification import pair_probabilities

                f = e.astype(np.float32)

                def dissimilarity(pairs):  # 1 - P(same): ranked like a distance
                    return 1.0 - pair_probabilities(pair_head, f[pairs[:, 0]], f[pairs[:, 1]])

                out["verification_head"] = M.verification_from_distances(
                    dissimilarity(pos_pairs), dissimilarity(neg_pairs), threshold=0.5,
                    n_boot=n_boot, seed=seed)
        else:
            notes.append("verification skipped: needs same- and different-subject pairs")
    if clusters:
        try:
            out["clusters"] = M.cluster_distances(e, labels, distance=distance)
        except ValueError as exc:
            notes.append(f"MIASD/MIESD skipped: {exc}")
    if baselines:
        out["baselines"] = {}
        for b in baselines:
            out["baselines"][b.name] = _evaluate_baseline(
                b, labels, settings, episodes, seed, max_r, groups, retrieval,
                verification, n_boot, max_negatives, baseline_max_pairs, notes,
                keep_pair_distances)
    return out


def _evaluate_baseline(b, labels, settings, episodes, seed, max_r, groups, retrieval,
                       verification, n_boot, max_negatives, max_pairs, notes, keep) -> dict:
    from .baselines import episode_pairs

    # Expensive measures (SSIM) get a pair budget; cheap ones (pixel correlation) do not.
    expensive = hasattr(b, "pairs_computed")
    n = len(labels)
    all_pairs = n * (n - 1) // 2
    res: dict = {"nway_kshot": []}
    t0 = time.time()
    for nw, k in settings:
        need = min(all_pairs, episode_pairs(nw, k, episodes))
        if expensive and need > max_pairs:
            notes.append(f"{b.name} {nw}-way {k}-shot skipped: about {need} image pairs "
                         f"exceed the budget of {max_pairs}")
            continue
        res["nway_kshot"].append(M.nway_kshot_from_distances(
            b, labels, nw, k, episodes=episodes, seed=seed, max_r=max_r, groups=groups, name=b.name))
    if retrieval:
        if expensive and all_pairs > max_pairs:
            notes.append(f"{b.name} retrieval skipped: {all_pairs} image pairs exceed the "
                         f"budget of {max_pairs}")
        else:
            try:
                res["retrieval"] = M.retrieval_metrics(labels=labels, block_fn=b.block,
                                                       block_size=256)
            except ValueError:
                pass
    if verification:
        cap = max_negatives if not expensive else max(1000, min(max_negatives, max_pairs // 4))
        pos_pairs, neg_pairs = M.pair_indices(labels, max_negatives=cap, seed=seed,
                                              max_positives=None if not expensive else cap)
        if len(pos_pairs) and len(neg_pairs):
            pos = np.array([b(int(i), [int(j)])[0] for i, j in pos_pairs])
            neg = np.array([b(int(i), [int(j)])[0] for i, j in neg_pairs])
            res["verification"] = M.verification_from_distances(pos, neg, n_boot=n_boot, seed=seed)
            if keep:
                res["_pair_distances"] = (pos, neg)
    res["seconds"] = round(time.time() - t0, 2)
    return res


# -- Markdown -------------------------------------------------------------------------------------

def _pct(v) -> str:
    return "–" if v is None else f"{100.0 * v:.2f}"


def _find(rows, n, k):
    for r in rows:
        if r["n_way"] == n and r["k_shot"] == k:
            return r
    return None


def results_markdown(result: dict, title: str = "") -> str:
    """Tables laid out like the Few-Shot Fingerprinting paper's Tables 1 and 2 (values in %),
    plus retrieval, verification and cluster tables."""
    lines = [f"# {title or 'Evaluation'}", ""]
    d = result.get("data", {})
    if d:
        lines += [f"{d['images']} images of {d['subjects']} subjects "
                  f"({d['subjects_with_2plus_images']} with two or more images); "
                  f"{result['protocol']['episodes']} episodes, seed {result['protocol']['seed']}, "
                  f"{result['protocol']['distance']} distance.", ""]
    ours = result.get("nway_kshot", [])
    bases = result.get("baselines", {})
    order = [n for n in ("ssim", "pixel-correlation") if n in bases] + \
        [n for n in bases if n not in ("ssim", "pixel-correlation")]
    names = {"ssim": "SSIM", "pixel-correlation": "PixCorr"}
    max_r = result.get("protocol", {}).get("max_r", 5)
    cols = [names.get(n, n) for n in order] + ["Ours"]
    lines += ["## Table 1: N-way K-shot (Mean-Recall@K, Mean Hit@1, Mean Hit@%d), %%" % max_r, ""]
    head = "| N-way-K-shot | " + " | ".join(
        f"MRe@K {c}" for c in cols) + " | " + " | ".join(f"MH@1 {c}" for c in cols) + \
        " | " + " | ".join(f"MH@{max_r} {c}" for c in cols) + " |"
    lines += [head, "|" + "---|" * (1 + 3 * len(cols))]
    for r in ours:
        n, k = r["n_way"], r["k_shot"]
        per = [_find(bases[b].get("nway_kshot", []), n, k) for b in order] + [r]
        cells = [_pct(x["mean_recall_at_k"]) if x else "–" for x in per]
        cells += [_pct(x["mean_hit_at_r"]["1"]) if x else "–" for x in per]
        cells += [_pct(x["mean_hit_at_r"][str(max_r)]) if x else "–" for x in per]
        lines.append(f"| {n}-{k} | " + " | ".join(cells) + " |")
    if not ours:
        lines.append("| (no setting possible) |" + " |" * (3 * len(cols)))
    lines += ["", "## Table 2: our model, N-way K-shot (Mean-Recall@K, Mean Hit@R), %", ""]
    rs = list(range(1, max_r + 1))
    lines += ["| N-way-K-shot | MRe@K | " + " | ".join(f"MH@{r}" for r in rs) + " | std MRe@K |",
              "|" + "---|" * (3 + len(rs))]
    for r in ours:
        lines.append(f"| {r['n_way']}-{r['k_shot']} | {_pct(r['mean_recall_at_k'])} | " +
                     " | ".join(_pct(r["mean_hit_at_r"][str(x)]) for x in rs) +
                     f" | {_pct(r['std_recall_at_k'])} |")
    lines += ["", "## Whole-gallery leave-one-out retrieval (Packhäuser et al.), %", "",
              "| method | mAP@R | R-Precision | P@1 | queries | gallery |", "|---|---|---|---|---|---|"]
    rows = [(names.get(b, b), bases[b].get("retrieval")) for b in order] + \
        [("Ours", result.get("retrieval"))]
    for name, r in rows:
        if r:
            lines.append(f"| {name} | {_pct(r['map_at_r'])} | {_pct(r['r_precision'])} | "
                         f"{_pct(r['precision_at_1'])} | {r['queries']} | {r['gallery']} |")
        else:
            lines.append(f"| {name} | – | – | – | – | – |")
    lines += ["", "## Verification (same vs different subject pairs)", "",
              "| method | AUC | 95 % CI | pos pairs | neg pairs | threshold | accuracy | TPR | FPR |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = [(names.get(b, b), bases[b].get("verification")) for b in order] + \
        [("Ours", result.get("verification"))]
    if result.get("verification_head"):
        rows.append(("Ours, pair-verification head (1 - P(same); threshold 0.5)",
                     result["verification_head"]))
    for name, v in rows:
        if not v:
            lines.append(f"| {name} |" + " – |" * 8)
            continue
        t = v.get("at_threshold")
        tcells = (f"{t['threshold']:.4g} | {_pct(t['accuracy'])} | {_pct(t['tpr'])} | "
                  f"{_pct(t['fpr'])}") if t else "– | – | – | –"
        lines.append(f"| {name} | {v['auc']:.4f} | {v['auc_ci95'][0]:.4f}–{v['auc_ci95'][1]:.4f} | "
                     f"{v['positive_pairs']} | {v['negative_pairs']} | {tcells} |")
    c = result.get("clusters")
    if c:
        lines += ["", "## Cluster distances (Few-Shot Fingerprinting, Figure 2)", "",
                  "| MIASD | MIESD | subjects |", "|---|---|---|",
                  f"| {c['miasd']:.3f} ± {c['miasd_std']:.3f} | {c['miesd']:.3f} ± "
                  f"{c['miesd_std']:.3f} | {c['subjects']} |"]
    cal = result.get("calibration")
    if cal:
        lines += ["", f"Calibration (fitted on {cal.get('fitted_on', '?')}): "
                  f"p(same) = sigmoid({cal['coef']:.4g} · d + {cal['intercept']:.4g}); "
                  f"threshold {cal['threshold']:.4g} at target FPR {cal['target_fpr']:g}."]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def _load_subset(records, split, subset, model, progress):
    from .data import preload
    from .splits import records_in

    if subset == "all":
        wanted = set(split.get("train", [])) | set(split.get("val", [])) | set(split.get("test", []))
        chosen = [r for r in records if r.subject_id in wanted]
    else:
        chosen = records_in(records, split, subset)
    if not chosen:
        raise ValueError(f"no image of the split's {subset!r} subjects was found in the source")
    return preload(chosen, model.preprocessing, progress=progress, description=f"loading {subset}")


def _embed(embedder, images, batch_size) -> np.ndarray:
    parts = [embedder.embed_tensor(images[i:i + batch_size]).numpy()
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 1), np.float32)


def _stored_half(path) -> bool:
    """Whether a checkpoint keeps its weights in float16 (to re-save it the same way)."""
    import torch

    payload = torch.load(str(path), map_location="cpu", weights_only=True)
    return any(getattr(t, "dtype", None) == torch.float16 for t in payload["state_dict"].values())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _write_text(path: Path, text: str) -> None:
    """Atomic write (temporary file, then rename) with ordinary 0644 permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def summary_for_checkpoint(result: dict, subset: str) -> dict:
    """The headline figures stored in the checkpoint's metadata["metrics"]."""
    s = {"nway_kshot": [{k: r[k] for k in ("n_way", "k_shot", "episodes", "mean_recall_at_k",
                                           "mean_hit_at_r")} for r in result.get("nway_kshot", [])]}
    for key in ("retrieval", "verification"):
        if key in result:
            s[key] = {k: v for k, v in result[key].items() if not k.startswith("_")}
    if "clusters" in result:
        s["clusters"] = {k: result["clusters"][k] for k in ("miasd", "miasd_std", "miesd", "miesd_std")}
    s["subset"] = subset
    s["data"] = result.get("data", {})
    return s


def run(args) -> dict:
    """The evaluation itself; returns the result dict (also written to ``args.out``)."""
    from subject_fingerprint.checkpoint import default_model_path, load_checkpoint, save_checkpoint
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.io import discover

    from .calibration_fit import calibration_pairs, fit_calibration
    from .splits import load_split

    progress = not getattr(args, "quiet", False)
    out_dir = Path(args.out)
    t0 = time.time()
    args.model = str(args.model or default_model_path())
    model = load_checkpoint(args.model)
    split = load_split(args.split)
    found = discover([args.source], manifest=args.manifest)
    embedder = Embedder(model, device=args.device, batch_size=args.batch_size, progress=False)
    if embedder.device_notice and progress:
        print(embedder.device_notice, file=sys.stderr)

    ds = _load_subset(found.records, split, args.subset, model, progress)
    emb = _embed(embedder, ds.images, args.batch_size)
    labels = np.array(ds.subject_ids())
    groups = ds.groups if args.cross_modal else None

    # Calibration on another subset (validation by default), else the checkpoint's own.
    calibration, cal_info, notes = None, None, []
    if args.calibrate_on != "none":
        try:
            cal_ds = ds if args.calibrate_on == args.subset else \
                _load_subset(found.records, split, args.calibrate_on, model, progress)
            cal_emb = emb if cal_ds is ds else _embed(embedder, cal_ds.images, args.batch_size)
            pos, neg = calibration_pairs(cal_emb, np.array(cal_ds.subject_ids()),
                                         seed=args.seed, distance=args.distance)
            calibration = fit_calibration(pos, neg, target_fpr=args.target_fpr)
            cal_info = dict(calibration.to_dict(), fitted_on=args.calibrate_on,
                            positive_pairs=int(len(pos)), negative_pairs=int(len(neg)))
        except ValueError as exc:
            notes.append(f"calibration on {args.calibrate_on!r} not fitted: {exc}")
    if calibration is None and model.calibration is not None:
        calibration = model.calibration
        cal_info = dict(calibration.to_dict(), fitted_on="checkpoint")

    baselines = []
    if args.baselines:
        from .baselines import PixelCorrelation, SSIMDistance

        pixels = ds.images.numpy()
        baselines = [SSIMDistance(pixels) if model.spatial_dims == 2
                     else SSIMDistance(pixels, size=0), PixelCorrelation(pixels)]

    result = evaluate_embeddings(
        emb, labels, ways=args.ways, shots=args.shots, episodes=args.episodes, seed=args.seed,
        max_r=args.max_r, groups=groups, distance=args.distance,
        threshold=calibration.threshold if calibration is not None else None,
        baselines=baselines, n_boot=args.bootstrap, baseline_max_pairs=args.ssim_max_pairs,
        keep_pair_distances=True, pair_head=model.pair_head)
    result["notes"] = notes + result["notes"]
    if cal_info:
        result["calibration"] = cal_info
    result["model"] = {"path": str(args.model), "model_id": model.model_id,
                       "spatial_dims": model.spatial_dims, "embedding_dim": model.embedding_dim}
    result["run"] = {"source": str(args.source), "split": str(args.split), "subset": args.subset,
                     "load_failures": [f"{f.path}: {f.reason}" for f in
                                       list(found.failures) + list(ds.failures)],
                     "device": str(embedder.device)}

    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that failed leaves nothing
    figures = {}
    if not args.no_plots:
        from . import plots

        thr = calibration.threshold if calibration is not None else None
        if "clusters" in result:
            c = result["clusters"]
            figures["cluster_histogram"] = plots.distance_histograms(
                c["intra"], c["inter"], out_dir / "cluster_distances.png",
                title="Per-subject intra vs inter distances (Fig. 2)").name
        if "_pair_distances" in result:
            pos, neg = result["_pair_distances"]
            figures["pair_histogram"] = plots.pair_histograms(
                pos, neg, out_dir / "pair_distances.png", threshold=thr).name
            curves = {"Ours": (pos, neg)}
            for name, b in result.get("baselines", {}).items():
                if "_pair_distances" in b:
                    curves[name] = b["_pair_distances"]
            figures["roc"] = plots.roc_plot(curves, out_dir / "roc.png").name
        t = plots.tsne_plot(emb, labels, out_dir / "tsne.png", seed=args.seed)
        if t is not None:
            figures["tsne"] = t.name
    result["figures"] = figures
    result["run"]["seconds"] = round(time.time() - t0, 1)

    clean = _jsonable(result)
    _write_text(out_dir / "metrics.json", json.dumps(clean, indent=1) + "\n")
    _write_text(out_dir / "results.md", results_markdown(
        clean, title=f"Evaluation of {Path(args.model).name} on {args.subset}"))

    if args.write_calibration:
        if calibration is None:
            raise ValueError("no calibration to write (fitting failed or --calibrate-on none)")
        half = _stored_half(args.model)
        model.metadata["calibration"] = calibration.to_dict()
        stored = dict(model.metadata.get("metrics") or {})
        stored[f"evaluation_{args.subset}"] = summary_for_checkpoint(clean, args.subset)
        stored["calibration_fitted_on"] = cal_info.get("fitted_on") if cal_info else None
        model.metadata["metrics"] = stored
        model.network.to("cpu")
        save_checkpoint(model, args.model, half=half)  # atomic replace
    return clean
