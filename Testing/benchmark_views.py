#!/usr/bin/env python
"""Choose a model's test-time views on validation subjects (never on a test split): the same
model embedding with ``test_shift`` 0 (the input alone) and the given shifts, on the validation
subjects of NIH ChestX-ray14 and Kermany, next to each other (not a test).

    python Testing/benchmark_views.py [--model Resources/Models/starter-2d-cxr.pt]
        [--shifts 0 0.03 0.06 0.1]

Prints one markdown row per shift and source: NIH 14-way 1-shot (its validation split has 14
patients with two or more images), Kermany 20-way 1-shot, P@1 and mAP@R, 100 episodes, seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SOURCES = {"NIH": ("cxr14-subset-64px", 14), "KER": ("kermany-peds-128px", 20)}


def main(argv=None) -> int:
    import torch

    from fingerprint_training.derive_command import derive
    from fingerprint_training.evaluate import _embed, _load_subset, evaluate_embeddings
    from subject_fingerprint.checkpoint import default_model_path, load_checkpoint
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.io import discover

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled 2D starter model")
    p.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.03, 0.06, 0.1])
    args = p.parse_args(argv)
    path = args.model or str(default_model_path())
    base = load_checkpoint(path)
    if base.preprocessing.test_shift:
        print(f"{path} already embeds with views (test_shift {base.preprocessing.test_shift})", file=sys.stderr)
        return 2
    loaded = {}
    for name, (folder, _) in SOURCES.items():
        found = discover([str(SHARED / folder / "images")], manifest=str(SHARED / folder / "manifest.csv"))
        split = json.loads((ROOT / "Resources" / "Splits" / f"{folder}-seed42.json").read_text())
        loaded[name] = _load_subset(found.records, split, "val", base, progress=False)
    print(f"validation subjects, {path}, {torch.get_num_threads()} threads\n")
    print("| test_shift | views | source | N-way 1-shot | P@1 | mAP@R |\n|---|---|---|---|---|---|")
    for shift in args.shifts:
        model = derive(load_checkpoint(path), shift) if shift else base
        embedder = Embedder(model, device="cpu", backend="torch", progress=False)
        for name, ds in loaded.items():
            ways = SOURCES[name][1]
            r = evaluate_embeddings(_embed(embedder, ds.images, 64), ds.subject_ids(), ways=[ways], shots=[1],
                                    episodes=100, seed=0, verification=False, clusters=False)
            fs, rt = r["nway_kshot"][0], r["retrieval"]
            print(f"| {shift:g} | {len(model.preprocessing.view_shifts())} | {name} | {ways}-way "
                  f"{100 * fs['mean_recall_at_k']:.1f} | {100 * rt['precision_at_1']:.1f} | "
                  f"{100 * rt['map_at_r']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
