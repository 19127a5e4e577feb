"""Cross-domain evaluation: every model on the test split of every source, next to pixel
correlation on the same preprocessed images.

``subject-fingerprint evaluate NIH=path/a KER=path/b --split NIH=a.json KER=b.json
--model nih=m1.pt joint=m2.pt --out DIR`` writes ``cross_domain.json`` and
``cross_domain.md``: one row per (model, source), with N-way K-shot Mean-Recall@K, P@1 and
mAP@R of the model and of pixel correlation on the same episodes, and their difference.
A model is measured on sources it was trained on and on sources it has never seen alike;
the table says which (from the source names recorded in the checkpoint). Each row also gives
the false- and true-positive rates of the model's calibrated threshold on the evaluated pairs,
so a threshold that does not carry to new subjects or another hospital shows.
``--write-calibration`` first fits each model's calibration on the validation subjects of all
the sources given (pairs within a source only) and stores it in the checkpoint.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np


def _named(values: Sequence[str], what: str) -> Dict[str, str]:
    out = {}
    for text in values:
        name, sep, value = text.partition("=")
        if not sep:
            name, value = Path(text).stem, text
        if name in out:
            raise ValueError(f"two {what}s named {name!r}")
        out[name] = value
    return out


def trained_on(model) -> List[str]:
    """Source folder names a checkpoint was trained on (from its metadata), for the table."""
    t = model.metadata.get("training") or {}
    if t.get("sources"):
        return [Path(s["source"]).name for s in t["sources"]]
    src = t.get("source")
    return [Path(str(src)).name] if src else []


def _row(n_way, k_shot, result):
    for r in result.get("nway_kshot", []):
        if r["n_way"] == n_way and r["k_shot"] == k_shot:
            return r
    return None


def _operating_point(calibration, emb, labels) -> Optional[dict]:
    """False- and true-positive rates of ``calibration``'s threshold on these images' pairs:
    whether a threshold fitted on validation subjects holds on the evaluated ones."""
    from .calibration_fit import calibration_pairs

    if calibration is None:
        return None
    pos, neg = calibration_pairs(emb, labels)
    if len(neg) == 0:
        return None
    t = calibration.threshold
    return {"threshold": t, "target_fpr": calibration.target_fpr,
            "fpr": float(np.mean(neg <= t)), "tpr": float(np.mean(pos <= t)) if len(pos) else None}


def _calibrate_on_validation(model, path, found, split, embedder, batch_size, progress) -> None:
    """Fit the model's calibration on the validation subjects of every source, pairs within a
    source only, thresholds the smallest of the sources' (as multi-source training does), and
    store it in the checkpoint (in place, float16 kept)."""
    from subject_fingerprint.checkpoint import save_checkpoint

    from .calibration_fit import fit_calibration, within_source_pairs
    from .evaluate import _embed, _load_subset, _stored_half

    def validation(name):
        ds = _load_subset(found[name].records, split[name], "val", model, progress)
        return _embed(embedder, ds.images, batch_size), np.array(ds.subject_ids())

    pos, neg, groups = within_source_pairs(validation(name) for name in found)
    calibration = fit_calibration(pos, neg, target_fpr=0.01, neg_groups=groups)
    half = _stored_half(path)
    model.calibration = calibration
    stored = dict(model.metadata.get("metrics") or {})
    stored["calibration_fitted_on"] = "val of " + ", ".join(found) + " (pairs within each source)"
    model.metadata["metrics"] = stored
    save_checkpoint(model, path, half=half)


def run_cross_domain(sources: Dict[str, str], splits: Dict[str, str], models: Dict[str, str],
                     out: str, ways=(20,), shots=(1,), episodes: int = 100, seed: int = 0,
                     subset: str = "test", device: str = "auto", batch_size: int = 64,
                     progress: bool = False, write_calibration: bool = False) -> dict:
    """Every model on every source's ``subset`` next to pixel correlation; with
    ``write_calibration`` each model is first calibrated on the sources' validation subjects."""
    from subject_fingerprint.checkpoint import load_checkpoint
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.io import discover

    from .baselines import PixelCorrelation
    from .evaluate import _embed, _jsonable, _load_subset, _write_text, evaluate_embeddings
    from .splits import load_split

    missing = sorted(set(sources) - set(splits))
    if missing:
        raise ValueError(f"no --split for source(s) {', '.join(missing)} (give NAME=FILE)")
    t0 = time.time()
    found = {name: discover([path]) for name, path in sources.items()}
    split = {name: load_split(splits[name]) for name in sources}
    pixel_cache, rows = {}, []
    for mname, mpath in models.items():
        model = load_checkpoint(mpath)
        seen = trained_on(model)
        embedder = Embedder(model, device=device, batch_size=batch_size, progress=False)
        if write_calibration:
            _calibrate_on_validation(model, mpath, found, split, embedder, batch_size, progress)
        for sname, spath in sources.items():
            ds = _load_subset(found[sname].records, split[sname], subset, model, progress)
            labels = np.array(ds.subject_ids())
            emb = _embed(embedder, ds.images, batch_size)
            res = evaluate_embeddings(emb, labels, ways=ways, shots=shots, episodes=episodes,
                                      seed=seed, verification=False, clusters=False)
            key = (sname, repr(model.preprocessing))
            if key not in pixel_cache:  # pixel correlation on the very images the model saw
                pixel_cache[key] = evaluate_embeddings(
                    emb, labels, ways=ways, shots=shots, episodes=episodes, seed=seed,
                    verification=False, clusters=False,
                    baselines=[PixelCorrelation(ds.images.numpy())])["baselines"]["pixel-correlation"]
            base = pixel_cache[key]
            row = {"model": mname, "model_path": str(mpath), "model_id": model.model_id,
                   "source": sname, "source_path": str(spath),
                   "trained_on_source": any(n == Path(spath).name or n.startswith(Path(spath).name + " ")
                                            for n in seen),  # old checkpoints: "folder (description)"
                   "input_size": list(model.preprocessing.size), "images": len(labels),
                   "subjects": int(len(set(labels.tolist()))), "settings": [],
                   "notes": res["notes"]}
            for n in ways:
                for k in shots:
                    r, b = _row(n, k, res), _row(n, k, base)
                    if r is None:
                        continue
                    row["settings"].append({
                        "n_way": n, "k_shot": k, "model": r["mean_recall_at_k"],
                        "model_std": r.get("std_recall_at_k"),
                        "pixel_correlation": b["mean_recall_at_k"] if b else None,
                        "difference": r["mean_recall_at_k"] - b["mean_recall_at_k"] if b else None})
            rr, br = res.get("retrieval", {}), base.get("retrieval", {})
            row["retrieval"] = {"model": {k: rr.get(k) for k in ("precision_at_1", "map_at_r")},
                                "pixel_correlation": {k: br.get(k) for k in ("precision_at_1", "map_at_r")}}
            row["calibration"] = _operating_point(model.calibration, emb, labels)
            rows.append(row)
            if progress:
                print(_line(row))
    result = {"subset": subset, "episodes": episodes, "seed": seed, "rows": rows,
              "splits": dict(splits), "seconds": round(time.time() - t0, 1)}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = _jsonable(result)
    _write_text(out_dir / "cross_domain.json", json.dumps(clean, indent=1) + "\n")
    _write_text(out_dir / "cross_domain.md", cross_domain_markdown(clean))
    return clean


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def _line(row) -> str:
    s = row["settings"][0] if row["settings"] else {}
    return (f"{row['model']} on {row['source']}: {s.get('n_way')}-way {s.get('k_shot')}-shot "
            f"{_pct(s.get('model'))} (pixel correlation {_pct(s.get('pixel_correlation'))}), "
            f"P@1 {_pct(row['retrieval']['model']['precision_at_1'])}")


def cross_domain_markdown(result: dict) -> str:
    """One table: model x source, values in %. Names are escaped (they come from the user)."""
    esc = html.escape
    lines = [f"# Cross-domain evaluation ({esc(str(result['subset']))} splits, "
             f"{result['episodes']} episodes, seed {result['seed']})", "",
             "| model | source | seen in training | input | N-way K-shot | model MRe@K | pixel corr. | "
             "difference | model P@1 | pixel P@1 | model mAP@R | pixel mAP@R | FPR (TPR) at the "
             "calibrated threshold |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        rm, rp = row["retrieval"]["model"], row["retrieval"]["pixel_correlation"]
        cal = row.get("calibration")
        op = (f"{_pct(cal['fpr'])} ({_pct(cal['tpr'])}) at target {_pct(cal['target_fpr'])}"
              if cal else "–")
        for s in row["settings"] or [{}]:
            diff = s.get("difference")
            lines.append(
                f"| {esc(row['model'])} | {esc(row['source'])} | {'yes' if row['trained_on_source'] else 'no'} | "
                f"{'x'.join(str(v) for v in row['input_size'])} | {s.get('n_way', '–')}-way {s.get('k_shot', '–')}-shot | "
                f"{_pct(s.get('model'))} | {_pct(s.get('pixel_correlation'))} | "
                f"{'–' if diff is None else f'{100 * diff:+.1f}'} | {_pct(rm['precision_at_1'])} | "
                f"{_pct(rp['precision_at_1'])} | {_pct(rm['map_at_r'])} | {_pct(rp['map_at_r'])} | {op} |")
    notes = sorted({n for row in result["rows"] for n in row.get("notes", [])})
    if notes:
        lines += [""] + [f"- {esc(n)}" for n in notes]
    return "\n".join(lines) + "\n"


def main_from_args(args) -> dict:
    """``evaluate`` with several NAME=PATH sources or several models."""
    return run_cross_domain(_named(args.source, "source"), _named(args.split, "split"),
                            _named(args.model, "model"), args.out, ways=args.ways,
                            shots=args.shots, episodes=args.episodes, seed=args.seed,
                            subset=args.subset, device=args.device,
                            batch_size=args.batch_size, progress=not args.quiet,
                            write_calibration=getattr(args, "write_calibration", False))
