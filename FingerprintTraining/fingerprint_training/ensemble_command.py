"""The ``ensemble`` command: one model made of several trained ones.

``subject-fingerprint ensemble A.pt B.pt [C.pt ...] --out E.pt`` writes a model that embeds an
image with every member and concatenates their unit-length embeddings
(``subject_fingerprint.ensemble``): one pass per member, so it costs what the members cost
together. The members must embed the same kind of image (2D or 3D, same modalities, same
intensity scaling and resize mode); their input sizes may differ. The ensemble has its own
model ID and no calibration yet: fit one on validation subjects with ``evaluate
--write-calibration`` before using its probabilities or dedup.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from subject_fingerprint.errors import EXIT_OK, FingerprintError


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ensemble", help="combine trained models into one that embeds with all",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("models", nargs="+", metavar="MODEL", help="two or more checkpoints (left unchanged)")
    p.add_argument("--out", required=True, help="the new checkpoint (.pt)")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (as the shipped models are)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    from subject_fingerprint.checkpoint import load_checkpoint, save_checkpoint
    from subject_fingerprint.ensemble import combine

    paths, out = [Path(m) for m in args.models], Path(args.out)
    if out.exists() and any(out.resolve() == p.resolve() for p in paths if p.exists()):
        raise FingerprintError(f"{out}: ensemble writes a new file; its members stay as they are")
    models = [load_checkpoint(p) for p in paths]
    try:
        model = combine(models)
    except ValueError as exc:
        raise FingerprintError(f"cannot combine {', '.join(map(str, paths))}: {exc}") from None
    save_checkpoint(model, out, half=args.half)
    print(f"{out}: model {model.model_id}, {len(models)} members "
          f"({', '.join(m.model_id for m in models)}), {model.embedding_dim}-d embeddings, no "
          f"calibration yet: run `subject-fingerprint evaluate ... --model {out} "
          f"--write-calibration` on validation subjects")
    return EXIT_OK
