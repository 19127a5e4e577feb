"""The ``subject-fingerprint`` command line: the engine's commands plus ``split``, ``train`` and
``evaluate`` (:func:`main`; also ``python -m fingerprint_training``). The training package
builds on the engine; the engine never imports it. Heavy imports (torch) happen inside the
commands."""

from __future__ import annotations

import json
import sys

from subject_fingerprint.errors import EXIT_ERROR, EXIT_OK


def _error(message) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


# -- split --------------------------------------------------------------------------------------

def _add_split(sub) -> None:
    p = sub.add_parser("split", help="make subject-disjoint train/val/test splits",
                       description="Split the subjects found in SOURCE into subject-disjoint "
                                   "train/validation/test lists (seeded) and write them as JSON.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--manifest", help="CSV with subject_id,image_path[,modality,view]")
    p.add_argument("--out", required=True, help="split file to write (.json)")
    p.add_argument("--fractions", nargs=3, type=float, default=[0.7, 0.1, 0.2],
                   metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=run_split)


def run_split(args) -> int:
    from subject_fingerprint.errors import FingerprintError
    from subject_fingerprint.io import discover

    from .splits import make_split, save_split
    try:
        found = discover([args.source], manifest=args.manifest)
        split = make_split(found.records, fractions=args.fractions, seed=args.seed,
                           source=args.source, manifest=args.manifest or "")
        save_split(split, args.out)
    except (FingerprintError, ValueError, OSError) as exc:
        return _error(exc)
    for f in found.failures:
        print(f"warning: {f.path}: {f.reason}", file=sys.stderr)
    for name in ("train", "val", "test"):
        c = split["counts"][name]
        print(f"{name:5s}: {c['subjects']} subjects ({c['subjects_with_2plus_images']} with 2+ images), "
              f"{c['images']} images")
    print(f"wrote {args.out}")
    return EXIT_OK


# -- train --------------------------------------------------------------------------------------

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a fingerprint model",
                       description="Train a fingerprint network on the training subjects of SPLIT; "
                                   "RUN_DIR gets best.pt, last.pt, log.csv and training.png. Under "
                                   "torchrun it trains with DDP on every rank.")
    p.add_argument("source", metavar="SOURCE", nargs="+",
                   help="image folder or manifest; several as NAME=PATH (subject IDs kept apart "
                        "per source, batches balanced across sources)")
    p.add_argument("--manifest", nargs="+", help="manifest CSV (NAME=FILE per source when several)")
    p.add_argument("--split", nargs="+", help="split file from `split` (NAME=FILE per source when "
                                              "several; default: train on everything, no validation)")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--dims", type=int, choices=(2, 3), default=2)
    p.add_argument("--depth", type=int, default=50, help="ResNet depth (18, 34, 50, ...)")
    p.add_argument("--embedding-dim", type=int, default=128)
    p.add_argument("--size", type=int, nargs="+", default=None,
                   help="input size: 2 numbers for 2D (default 64 64), 3 for 3D (default 48 48 48)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, help="3D: resample to this spacing (mm) first")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-subjects", type=int, default=32, metavar="P")
    p.add_argument("--images-per-subject", type=int, default=4, metavar="K")
    p.add_argument("--loss", choices=("triplet", "contrastive", "multi-similarity"), default="triplet",
                   help="multi-similarity (Wang et al. 2019) needs --normalize")
    p.add_argument("--miner", choices=("algorithm1", "batch-hard", "all"), default="algorithm1")
    p.add_argument("--margin", type=float, default=None,
                   help="triplet margin / contrastive negative margin / multi-similarity base "
                        "(default 4 unnormalised triplet as in the paper, 0.2 normalised triplet, "
                        "1 contrastive, 0.5 multi-similarity)")
    p.add_argument("--xbm", type=int, default=0, metavar="SIZE", help="cross-batch memory size (0 = off)")
    p.add_argument("--xbm-start", type=int, default=0, help="use the memory from this step on")
    p.add_argument("--normalize", action="store_true", help="L2-normalise embeddings")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights with this "
                        "decay per step (e.g. 0.995; 0 = off)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--augment-preset", default="domain",
                   choices=("paper", "domain", "domain-2d", "domain-3d"),
                   help="paper: the paper's small affine + brightness/contrast; domain (default): "
                        "wider affine, gamma, blur/sharpen, noise, JPEG, down-up sampling, erasing "
                        "(2D) or misalignment, bias field, thick slices (3D)")
    p.add_argument("--augment-aspect", type=float, default=0.0, metavar="R",
                   help="also stretch one axis against the others by a ratio up to exp(R) "
                        "(copies squashed to a square lose their aspect ratio); 0 = off")
    p.add_argument("--augment-scale", type=float, default=0.0, metavar="S",
                   help="zoom each image by a factor drawn from 1 +- S instead of the preset's "
                        "range (hospitals frame the chest differently); 0 = the preset's")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="start from this model's weights")
    p.add_argument("--val-moved", action="store_true",
                   help="3D: validate on volumes each moved by a seeded random rigid transform "
                        "(15 degrees, 10 %% of the FOV), so selection rewards misalignment invariance")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="first train this many steps with every image (singletons too) as its own "
                        "subject, positives = augmented copies")
    p.add_argument("--canonical-pose", action="store_true",
                   help="resample each image into the frame of its intensity moments (centroid, "
                        "principal axes) before the network: invariance to rigid motion by "
                        "construction, for repeat scans that are not aligned (MRI)")
    p.add_argument("--verification-head", action="store_true",
                   help="also train a pair-verification head (Packhaeuser et al.: P(same subject) "
                        "of two embeddings, binary cross-entropy on every batch pair); it reads "
                        "detached embeddings, so the embeddings are those of the same run without it")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", action="store_true", help="no float16 mixed precision on CUDA")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast on a CPU with bf16 units (AMX, AVX-512 BF16): 2-3x faster "
                        "steps; --resume then matches an uninterrupted run only to bf16 rounding")
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--val-episodes", type=int, default=100)
    p.add_argument("--val-n-way", type=int, default=20)
    p.add_argument("--val-k-shot", type=int, default=1)
    p.add_argument("--patience", type=int, default=0, help="validations without improvement before stopping (0 = never)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time (resumable)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cross-modal", action="store_true",
                   help="positives must be of another modality than the anchor (MRI)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = default)")
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def config_from_args(args):
    from .trainer import TrainConfig
    size = args.size or ([64, 64] if args.dims == 2 else [48, 48, 48])
    if len(size) != args.dims:
        raise ValueError(f"--size needs {args.dims} numbers for --dims {args.dims}")
    return TrainConfig(
        source=args.source, manifest=args.manifest, split=args.split, out=args.out, dims=args.dims,
        depth=args.depth, embedding_dim=args.embedding_dim, size=tuple(size),
        spacing=tuple(args.spacing) if args.spacing else None, steps=args.steps,
        batch_subjects=args.batch_subjects, images_per_subject=args.images_per_subject,
        loss=args.loss, miner=args.miner, margin=args.margin, xbm=args.xbm, xbm_start=args.xbm_start,
        normalize=args.normalize, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        grad_clip=args.grad_clip, ema=args.ema, augment=not args.no_augment,
        augment_preset=getattr(args, "augment_preset", "paper"),
        augment_aspect=getattr(args, "augment_aspect", 0.0),
        augment_scale=getattr(args, "augment_scale", 0.0), init_from=getattr(args, "init_from", None),
        val_moved=getattr(args, "val_moved", False),
        pretrain_steps=args.pretrain_steps, verification_head=args.verification_head,
        canonical_pose=args.canonical_pose,
        device=args.device, amp=not args.no_amp, cpu_bf16=args.bf16, val_every=args.val_every,
        val_episodes=args.val_episodes, val_n_way=args.val_n_way, val_k_shot=args.val_k_shot,
        patience=args.patience, resume=args.resume, seed=args.seed, cross_modal=args.cross_modal,
        max_minutes=args.max_minutes, progress=not args.quiet, calibrate=not args.no_calibrate,
        threads=args.threads)


def run_train(args) -> int:
    from subject_fingerprint.errors import FingerprintError

    from .sources import parse_sources, run_multi_training
    from .trainer import run_training
    try:
        sources = [args.source] if isinstance(args.source, str) else list(args.source)
        splits = [args.split] if isinstance(args.split, str) else list(args.split or [])
        manifests = [args.manifest] if isinstance(args.manifest, str) else list(args.manifest or [])
        specs = parse_sources(sources, splits, manifests)
        if len(specs) == 1 and "=" not in sources[0] and not args.val_moved:  # one plain source: the single-source path
            args.source, args.split, args.manifest = specs[0].path, specs[0].split, specs[0].manifest
            result = run_training(config_from_args(args))
        else:
            args.source, args.split, args.manifest = " ".join(sources), None, None
            result = run_multi_training(config_from_args(args), specs)
    except (FingerprintError, ValueError, OSError) as exc:
        return _error(exc)
    if result.best_path is not None:
        print(json.dumps({"best": result.best_path, "best_step": result.best_step,
                          "best_val_mean_recall": result.best_metric, "steps_done": result.steps_done,
                          "stopped_early": result.stopped_early, "interrupted": result.interrupted,
                          "seconds": round(result.seconds, 1), "log": result.log_path,
                          "plot": result.plot_path}, indent=1))
    return EXIT_OK


def register(subparsers) -> None:
    """Add ``split``, ``train``, ``evaluate``, ``derive`` and ``ensemble`` to the main command
    line."""
    from .derive_command import register as register_derive
    from .ensemble_command import register as register_ensemble
    from .evaluate_command import register as register_evaluate

    _add_split(subparsers)
    _add_train(subparsers)
    register_evaluate(subparsers)
    register_derive(subparsers)
    register_ensemble(subparsers)


def build_parser():
    """The parser of the whole command line (the engine's commands and these)."""
    from subject_fingerprint.cli import build_parser as engine_parser

    return engine_parser(extra_commands=(register,))


def main(argv=None) -> int:
    """Entry point of ``subject-fingerprint`` (and ``python -m fingerprint_training``)."""
    from subject_fingerprint.cli import main as engine_main

    return engine_main(argv, extra_commands=(register,))
