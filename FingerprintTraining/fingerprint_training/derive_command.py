"""The ``derive`` command: a copy of a model that embeds with test-time views.

``subject-fingerprint derive MODEL --test-shift 0.06 --out NEW.pt`` writes a model whose
embedding of an image is the mean over the image and its copies shifted by 6 % of the field
along each axis (``Preprocessing.test_shift``; 5 network passes per 2D image, 7 per 3D one).
The weights are the same, the embeddings are not, so the copy has its own model ID, and
what was fitted on the old embeddings (the calibration, the figures, a pair-verification
head) is left out: refit the calibration on validation subjects with ``evaluate
--write-calibration`` before using the copy for probabilities or dedup.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from subject_fingerprint.errors import EXIT_OK, FingerprintError


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("derive", help="copy a model to embed with test-time shifted views",
                              description=__doc__.split("\n\n")[1])
    p.add_argument("model", help="model checkpoint (.pt) to start from (left unchanged)")
    p.add_argument("--test-shift", type=float, required=True, metavar="FRACTION",
                   help="shift of the views, a fraction of the field (0 = the input alone)")
    p.add_argument("--out", required=True, help="the new checkpoint (.pt)")
    p.set_defaults(func=main)
    return p


def derive(model, test_shift: float):
    """``model`` with embeddings averaged over views shifted by ``test_shift``; what was
    fitted on its old embeddings is dropped, where it came from recorded."""
    source_id = model.model_id
    model.preprocessing = replace(model.preprocessing, test_shift=test_shift)
    model.calibration = None
    model.metadata["metrics"] = {}
    model.pair_head = None
    model.metadata["derived_from"] = {"model_id": source_id, "test_shift": test_shift}
    return model


def main(args) -> int:
    from subject_fingerprint.checkpoint import load_checkpoint, save_checkpoint

    from .evaluate import _stored_half

    source, out = Path(args.model), Path(args.out)
    if out.exists() and out.resolve() == source.resolve():
        raise FingerprintError(f"{out}: derive writes a new file; the model it starts from stays as it is")
    try:
        model = derive(load_checkpoint(source), args.test_shift)
    except ValueError as exc:
        raise FingerprintError(f"{source}: {exc}") from None
    save_checkpoint(model, out, half=_stored_half(source))
    print(f"{out}: model {model.model_id} (from {model.metadata['derived_from']['model_id']}), "
          f"{len(model.preprocessing.view_shifts())} views per image, no calibration yet: run "
          f"`subject-fingerprint evaluate ... --model {out} --write-calibration` on validation subjects")
    return EXIT_OK
