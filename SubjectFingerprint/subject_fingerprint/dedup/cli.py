"""``subject-fingerprint dedup``: find subjects shared across and within datasets."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import EXIT_FOUND, EXIT_OK


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "dedup", help="find subjects shared across and within datasets",
        description="Compare every image of every DATASET (a folder: DICOM export, manifest "
                    "folder or folder per subject; or an embedding library .h5) and report "
                    "subjects that are probably the same person, and exact or near duplicate "
                    "images. Name a dataset with NAME=PATH.")
    p.add_argument("datasets", nargs="+", metavar="DATASET")
    p.add_argument("--out", required=True, help="report folder (created)")
    p.add_argument("--model", help="model checkpoint (.pt); default: the bundled starter model")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--max-false-pairs", type=float,
                       help="report the most probable subject pairs while the expected number of "
                            "false ones stays at most this (default: 1 per 1000 subjects compared)")
    group.add_argument("--threshold", type=float,
                       help="instead: report subject pairs with an image pair closer than this "
                            "embedding distance")
    group.add_argument("--max-fpr", type=float,
                       help="instead: the threshold for this false-positive rate per image pair "
                            "from the model's calibration")
    p.add_argument("--near-duplicate-distance", type=float,
                   help="image pairs closer than this are near duplicates "
                        "(default: a tenth of the threshold)")
    p.add_argument("--heatmaps", type=int, default=24, metavar="N",
                   help="Grad-CAM heatmaps of the pair similarity for up to N image pairs of the "
                        "reported subject pairs (default 24; 0: none)")
    p.add_argument("--save-libraries", metavar="DIR",
                   help="save the embeddings of each folder as DIR/NAME.h5 for next time")
    p.add_argument("--fail-on-overlap", action="store_true",
                   help="exit with 1 when a suspected shared subject is found (for pipelines)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def choose_threshold(model, threshold=None, max_fpr=None):
    """(threshold, false-positive rate or None) from the options and the model's calibration."""
    from ..errors import FingerprintError

    if threshold is not None:
        if threshold <= 0:
            raise FingerprintError("--threshold must be positive")
        return float(threshold), None
    calibration = model.calibration
    if calibration is None:
        raise FingerprintError(
            "this model has no calibration, so there is no default threshold: pass --threshold "
            "(or calibrate it with `subject-fingerprint evaluate --write-calibration`)")
    if max_fpr is not None:
        if not 0 < max_fpr < 1:
            raise FingerprintError("--max-fpr must be between 0 and 1")
        return float(calibration.threshold_for_fpr(max_fpr)), float(max_fpr)
    return float(calibration.threshold), float(calibration.target_fpr)


def run(args) -> int:
    from .. import posterior as post
    from ..checkpoint import default_model_path
    from ..errors import FingerprintError
    from ..lookup import resolve_model
    from . import engine
    from .datasets import load_dataset
    from .decide import decide
    from .report import write_report

    started = time.perf_counter()
    if len(args.datasets) < 1:
        raise ValueError("give at least one dataset")
    model = resolve_model(args.model)
    override = args.threshold is not None or args.max_fpr is not None
    threshold, fpr = choose_threshold(model, args.threshold, args.max_fpr) if override \
        else (None, None)
    save_dir = Path(args.save_libraries) if args.save_libraries else None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)

    datasets = [load_dataset(text, model, device=args.device, batch_size=args.batch_size,
                             save_dir=save_dir, progress=not args.quiet)
                for text in args.datasets]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"two datasets share a name ({', '.join(names)}); name them NAME=PATH")

    n_subjects = sum(d.n_subjects for d in datasets)
    max_false = args.max_false_pairs if args.max_false_pairs is not None else n_subjects / 1000
    if max_false <= 0:
        raise FingerprintError("--max-false-pairs must be positive")
    reference = post.reference_scores(datasets)
    try:
        link = post.combine(reference, model.calibration)
    except ValueError as exc:
        if threshold is None:
            raise FingerprintError(str(exc)) from exc
        link = None
    exact = engine.exact_duplicates(datasets)
    if link is None:
        # No calibration at all, but an explicit threshold: the model's distances alone.
        link = post.PairLink(None, -1.0, 0.0, "none (uncalibrated model: --threshold only)", 0.0,
                             {"same_id_subjects": len(reference.same), "auc": reference.auc})
    rule = "max-false-pairs" if not override else (
        "--threshold" if args.threshold is not None else "--max-fpr")
    decision = decide(datasets, link, reference, max_false_pairs=None if override else max_false,
                      threshold=threshold, rule=rule, exact=exact)
    near = args.near_duplicate_distance if args.near_duplicate_distance is not None \
        else decision.close_distance / 10
    close = engine.find_pairs(datasets, near, near=near)
    exact_keys = {(p.a, p.i, p.b, p.j) for p in exact}
    near_pairs = [p for p in close if (p.a, p.i, p.b, p.j) not in exact_keys]
    reported = decision.reported
    across = [p for p in reported if not p.within]
    cross = [c for c in decision.comparisons if c.a != c.b]
    shared_est = sum(c.estimated_matches for c in cross)
    model_path = Path(args.model) if args.model else default_model_path()
    summary = {
        "datasets": [{"name": d.name, "images": len(d), "subjects": d.n_subjects,
                      "library": d.library, "unreadable": len(d.failures)} for d in datasets],
        "images": sum(len(d) for d in datasets),
        "subjects": n_subjects,
        "suspected_shared_subjects": len(across),
        "suspected_within_dataset_pairs": len(reported) - len(across),
        "exact_duplicate_pairs": len(exact),
        "near_duplicate_pairs": len(near_pairs),
        "near_duplicate_distance": near,
        "model_id": model.model_id,
        "model_file": model_path.name,
        "decision_rule": rule,
        "max_false_pairs": None if override else max_false,
        "expected_false_pairs": round(decision.expected_false_pairs, 6),
        "posterior_level": decision.level,
        "threshold": threshold,
        "false_positive_rate": fpr,
        "threshold_source": rule if override else None,
        "close_image_distance": decision.close_distance,
        "calibration": link.to_dict(),
        "estimated_shared_subjects": round(shared_est, 3),
        "unconfirmed_shared_subjects": max(0, int(round(shared_est)) - len(across)),
        "comparisons": [{"dataset_a": names[c.a], "dataset_b": names[c.b],
                         "candidate_pairs": c.n_pairs,
                         "estimated_same_subject_pairs": round(c.estimated_matches, 3),
                         "prior": c.prior} for c in decision.comparisons],
        "self_check": decision.check.to_dict(),
        "unreadable_files": [{"dataset": d.name, "path": f.path, "reason": f.reason}
                             for d in datasets for f in d.failures],
        "seconds": 0.0,
    }
    summary["seconds"] = round(time.perf_counter() - started, 3)
    heatmaps = None
    if args.heatmaps > 0 and reported:
        from ..pair_heatmap import heatmaps_for_pairs

        # The best image pair of every reported subject pair first, then the others.
        order = [p.image_pairs[0] for p in reported if p.image_pairs] + \
            [ip for p in reported for ip in p.image_pairs[1:]]
        heatmaps = heatmaps_for_pairs(model, datasets, order, limit=args.heatmaps)
    summary["heatmaps"] = 0 if heatmaps is None else len(heatmaps) // 2
    summary["seconds"] = round(time.perf_counter() - started, 3)
    write_report(Path(args.out), datasets, decision, exact, near_pairs, summary, heatmaps)

    for warning in decision.check.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"{summary['images']} images of {n_subjects} subjects in {len(datasets)} dataset(s); "
          f"calibration: {link.source}; "
          + (f"decision: at most {max_false:.3g} expected false subject pairs"
             if not override else f"decision: {rule} (image distance {threshold:.4g})"))
    print(f"suspected shared subjects across datasets: {len(across)} (estimated shared: "
          f"{shared_est:.1f}, {summary['unconfirmed_shared_subjects']} not confirmed); within a "
          f"dataset: {summary['suspected_within_dataset_pairs']}; expected false pairs among "
          f"them: {decision.expected_false_pairs:.3g}; exact duplicate pairs: {len(exact)}; "
          f"near duplicates: {len(near_pairs)}")
    for f in summary["unreadable_files"]:
        print(f"unreadable: {f['path']}: {f['reason']}", file=sys.stderr)
    print(f"report: {Path(args.out) / 'index.html'}")
    found = bool(reported)
    return EXIT_FOUND if (found and args.fail_on_overlap) else EXIT_OK
