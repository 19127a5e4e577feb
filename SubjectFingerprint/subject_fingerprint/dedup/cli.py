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
    group.add_argument("--threshold", type=float,
                       help="embedding distance below which two images count as the same subject")
    group.add_argument("--max-fpr", type=float,
                       help="pick the threshold for this false-positive rate per image pair "
                            "from the model's calibration")
    p.add_argument("--near-duplicate-distance", type=float,
                   help="image pairs closer than this are near duplicates "
                        "(default: a tenth of the threshold)")
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
    from ..lookup import resolve_model
    from . import engine
    from .datasets import load_dataset
    from .report import write_report

    started = time.perf_counter()
    if len(args.datasets) < 1:
        raise ValueError("give at least one dataset")
    model = resolve_model(args.model)
    threshold, fpr = choose_threshold(model, args.threshold, args.max_fpr)
    near = args.near_duplicate_distance if args.near_duplicate_distance is not None else threshold / 10
    save_dir = Path(args.save_libraries) if args.save_libraries else None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)

    datasets = [load_dataset(text, model, device=args.device, batch_size=args.batch_size,
                             save_dir=save_dir, progress=not args.quiet)
                for text in args.datasets]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"two datasets share a name ({', '.join(names)}); name them NAME=PATH")

    close = engine.find_pairs(datasets, threshold, near=near)
    suspects = engine.subject_pairs(datasets, close, model.calibration)
    exact = engine.exact_duplicates(datasets)
    exact_keys = {(p.a, p.i, p.b, p.j) for p in exact}
    near_pairs = [p for p in close if p.distance <= near and (p.a, p.i, p.b, p.j) not in exact_keys]
    # images.csv: the image pairs behind each suspected subject pair, then exact duplicates.
    image_pairs = sorted((p for p in close if (p.a, p.i, p.b, p.j) not in exact_keys),
                         key=lambda p: p.distance) + exact
    same, different = engine.distance_samples(datasets)

    across = [s for s in suspects if s.a != s.b]
    summary = {
        "datasets": [{"name": d.name, "images": len(d), "subjects": d.n_subjects,
                      "library": d.library, "unreadable": len(d.failures)} for d in datasets],
        "images": sum(len(d) for d in datasets),
        "subjects": sum(d.n_subjects for d in datasets),
        "suspected_shared_subjects": len(across),
        "suspected_within_dataset_pairs": len(suspects) - len(across),
        "close_image_pairs": len(close),
        "exact_duplicate_pairs": len(exact),
        "near_duplicate_pairs": len(near_pairs),
        "near_duplicate_distance": near,
        "model_id": model.model_id,
        "threshold": threshold,
        "false_positive_rate": fpr,
        "threshold_source": "--threshold" if args.threshold is not None else (
            "--max-fpr" if args.max_fpr is not None else "model calibration"),
        "unreadable_files": [{"dataset": d.name, "path": f.path, "reason": f.reason}
                             for d in datasets for f in d.failures],
        "seconds": 0.0,
    }
    summary["seconds"] = round(time.perf_counter() - started, 3)
    write_report(Path(args.out), datasets, suspects, image_pairs, summary, same, different)

    print(f"{summary['images']} images of {summary['subjects']} subjects in {len(datasets)} "
          f"dataset(s); threshold {threshold:.4g}"
          + (f" (false-positive rate {fpr:g} per image pair)" if fpr is not None else ""))
    print(f"suspected shared subjects across datasets: {len(across)}; within a dataset: "
          f"{summary['suspected_within_dataset_pairs']}; exact duplicate pairs: {len(exact)}; "
          f"near duplicates: {len(near_pairs)}")
    for f in summary["unreadable_files"]:
        print(f"unreadable: {f['path']}: {f['reason']}", file=sys.stderr)
    print(f"report: {Path(args.out) / 'index.html'}")
    found = bool(suspects)
    return EXIT_FOUND if (found and args.fail_on_overlap) else EXIT_OK
