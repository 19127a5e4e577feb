"""The ``evaluate`` command: its options, and the dispatch to the single evaluation
(``evaluate.run``), the cross-domain table (``crossdomain``) or moved 3D queries (``moved``).

It sits above those three modules, which build on ``evaluate``'s helpers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from subject_fingerprint.errors import EXIT_ERROR, EXIT_FOUND, EXIT_OK

from . import metrics as M
from .evaluate import DEFAULT_SHOTS, DEFAULT_WAYS, SSIM_MAX_PAIRS, run


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``subject-fingerprint evaluate``."""
    p.add_argument("source", nargs="+", help="image folder, DICOM tree or file set (as for "
                   "index/train); several as NAME=PATH for the cross-domain table")
    p.add_argument("--model", nargs="+", help="checkpoint to evaluate (default: the bundled starter "
                   "model); several as NAME=FILE: every model on every source, crossdomain.py")
    p.add_argument("--manifest", help="manifest CSV (subject_id,image_path[,modality,view])")
    p.add_argument("--split", required=True, nargs="+",
                   help="split JSON (train/val/test subject lists); NAME=FILE per source when several")
    p.add_argument("--moved-queries", action="store_true",
                   help="3D: move every query by a seeded random rigid transform (moved.py), "
                        "cross-modal, next to pixel correlation on the same moved volumes")
    p.add_argument("--max-rotation", type=float, default=15.0, help="moved queries: degrees per axis")
    p.add_argument("--max-shift", type=float, default=0.10, help="moved queries: fraction of the FOV")
    p.add_argument("--subset", choices=("test", "val", "all"), default="test",
                   help="which subjects to evaluate on (default: test)")
    p.add_argument("--out", required=True, help="output folder (metrics.json, results.md, PNGs)")
    p.add_argument("--episodes", type=int, default=100, help="episodes per N-way K-shot setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ways", type=int, nargs="+", default=list(DEFAULT_WAYS), help="N values")
    p.add_argument("--shots", type=int, nargs="+", default=list(DEFAULT_SHOTS), help="K values")
    p.add_argument("--max-r", type=int, default=5, help="largest R of Mean Hit@R")
    p.add_argument("--distance", choices=M.DISTANCES, default="euclidean")
    p.add_argument("--cross-modal", action="store_true",
                   help="supports must come from modalities other than the query's")
    p.add_argument("--baselines", action="store_true",
                   help="also score pixel correlation and SSIM (256 px) on the same episodes")
    p.add_argument("--ssim-max-pairs", type=int, default=SSIM_MAX_PAIRS,
                   help="skip SSIM measurements that need more image pairs than this")
    p.add_argument("--calibrate-on", choices=("val", "test", "all", "none"), default="val",
                   help="subset to fit the distance calibration on (default: val)")
    p.add_argument("--target-fpr", type=float, default=0.01)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the AUC")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--write-calibration", action="store_true",
                   help="store the calibration and the figures in the checkpoint (in place)")
    p.add_argument("--quiet", action="store_true")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="evaluate a model on a split (N-way K-shot, "
                                              "mAP@R, AUC, baselines)")
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    """Entry point of ``subject-fingerprint evaluate``; returns the exit code."""
    from subject_fingerprint.errors import FingerprintError

    out_dir = Path(args.out)
    existed = out_dir.exists()
    try:
        if not args.model:
            from subject_fingerprint.checkpoint import default_model_path

            args.model = [str(default_model_path())]  # raises a clear error if it is missing
        many = [v for v in (args.source, args.model, args.split) if isinstance(v, list)]
        if any(len(v) > 1 for v in many) or any("=" in str(v[0]) for v in many if v):
            from .crossdomain import cross_domain_markdown, main_from_args
            result = main_from_args(args)
            if not getattr(args, "quiet", False):
                print(cross_domain_markdown(result))
            return EXIT_OK
        for name in ("source", "model", "split"):  # one of each: the single evaluation
            value = getattr(args, name)
            setattr(args, name, value[0] if isinstance(value, list) else value)
        if getattr(args, "moved_queries", False):
            from .moved import moved_markdown, run_moved
            result = run_moved(args.source, args.split, args.model, args.out, subset=args.subset,
                               ways=args.ways, shots=args.shots, episodes=args.episodes,
                               seed=args.seed, max_rotation=args.max_rotation,
                               max_shift=args.max_shift, device=args.device,
                               progress=not args.quiet, manifest=args.manifest)
            if not args.quiet:
                print(moved_markdown(result))
            return EXIT_FOUND if result["load_failures"] else EXIT_OK
        result = run(args)
    except (FingerprintError, ValueError, OSError) as exc:
        if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed run leaves no empty folder behind
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not getattr(args, "quiet", False):
        print((Path(args.out) / "results.md").read_text(encoding="utf-8"))
    # Exit 1 when some images could not be read (they were left out and listed in metrics.json).
    return EXIT_FOUND if result["run"]["load_failures"] else EXIT_OK
