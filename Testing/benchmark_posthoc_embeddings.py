"""What can be done with a trained model's embeddings after training, on both X-ray sources.

For each checkpoint it embeds the validation and test subjects of NIH ChestX-ray14 and of the
Kermany paediatric set (and NIH's training subjects, to fit a whitening on), then scores, with
the 20-way 1-shot episodes and the leave-one-out P@1 of ``evaluate``:

* each model as it is;
* concatenations of the models' L2-normalised embeddings (an ensemble, one image through
  every network), for every combination of two or more models;
* PCA whitening of each model's embeddings, fitted either on NIH training images (a fixed
  transform shipped with a model) or on the evaluated images themselves (label-free, but it
  sees the images it scores: a test-time adaptation, not a model trained without them).

It is a study, not a model: nothing here is written into a checkpoint. Every variant is
shown, validation next to test, so that a choice can be read off the validation columns.

    python Testing/benchmark_posthoc_embeddings.py --models a=A.pt b=B.pt [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT / "Resources" / "Splits"
NIH, KER = "cxr14-subset-64px", "kermany-peds-128px"
VAL_WAYS = {NIH: 14, KER: 20}  # NIH's validation split has 14 subjects with 2+ images


def embed_subsets(checkpoint: Path, data: Path) -> dict:
    """{(source, subset): (embeddings, labels)} for one model (float32 eager, batches of 64)."""
    from fingerprint_training.evaluate import _embed, _load_subset
    from fingerprint_training.splits import load_split
    from subject_fingerprint.checkpoint import load_checkpoint
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.io import discover

    model = load_checkpoint(checkpoint)
    embedder = Embedder(model, device="cpu", batch_size=64, progress=False)
    out = {}
    for source in (NIH, KER):
        found = discover([str(data / source)])
        split = load_split(str(SPLITS / f"{source}-seed42.json"))
        for subset in ("train", "val", "test"):
            if source == KER and subset == "train":
                continue  # not needed: whitening is fitted on NIH training images only
            ds = _load_subset(found.records, split, subset, model, False)
            out[source, subset] = (_embed(embedder, ds.images, 64), np.array(ds.subject_ids()))
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def whitening(fit_on: np.ndarray, shrink: float):
    """PCA whitening fitted on ``fit_on``; eigenvalues shrunk towards their mean by ``shrink``
    (0 = full whitening, large = centring alone), output L2-normalised."""
    mean = fit_on.mean(0)
    values, vectors = np.linalg.eigh(np.cov((fit_on - mean).T))
    values = np.maximum(values, 0) + shrink * values.mean()
    project = vectors @ np.diag(values ** -0.5) @ vectors.T
    return lambda x: unit((x - mean) @ project)


def score(embeddings, labels, ways: int) -> tuple:
    """(20-way 1-shot Mean-Recall@K, P@1) in points, as ``evaluate`` computes them."""
    from fingerprint_training.evaluate import evaluate_embeddings

    r = evaluate_embeddings(embeddings, labels, ways=(ways,), shots=(1,), episodes=100, seed=0,
                            verification=False, clusters=False)
    return 100 * r["nway_kshot"][0]["mean_recall_at_k"], 100 * r["retrieval"]["precision_at_1"]


def row(name: str, get) -> str:
    """One table line; ``get(source, subset)`` gives the variant's embeddings."""
    cells = []
    for source, subset in ((NIH, "val"), (KER, "val"), (NIH, "test"), (KER, "test")):
        e, y = get(source, subset)
        ways = VAL_WAYS[source] if subset == "val" else 20
        recall, p1 = score(e, y, ways)
        cells.append(f"{recall:.1f} / {p1:.1f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=CHECKPOINT")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--shrink", type=float, nargs="+", default=[0.1, 1.0])
    args = p.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.models)
    t0 = time.time()
    emb = {name: embed_subsets(Path(path), args.data) for name, path in models.items()}
    first = next(iter(emb.values()))
    for name, e in emb.items():  # every variant below pairs rows across models
        for key, (_, labels) in e.items():
            if not np.array_equal(labels, first[key][1]):
                sys.exit(f"{name}: the images of {key} are not in the same order as the others'")
    print(f"embedded in {time.time() - t0:.0f} s")
    print("\n| variant | NIH val (14-way) / P@1 | KER val / P@1 | NIH test / P@1 | KER test / P@1 |")
    print("|---|---|---|---|---|")
    for name, e in emb.items():
        print(row(name, lambda s, u, e=e: e[s, u]))
    for n in range(2, len(emb) + 1):
        for combo in itertools.combinations(emb, n):
            print(row(" + ".join(combo),
                      lambda s, u, c=combo: (unit(np.hstack([unit(emb[m][s, u][0]) for m in c])),
                                             emb[c[0]][s, u][1])))
    for name, e in emb.items():
        for shrink in args.shrink:
            fixed = whitening(e[NIH, "train"][0], shrink)
            print(row(f"{name}, whitened on NIH training images (shrink {shrink:g})",
                      lambda s, u, e=e, f=fixed: (f(e[s, u][0]), e[s, u][1])))
            print(row(f"{name}, whitened on the evaluated images themselves (shrink {shrink:g})",
                      lambda s, u, e=e, k=shrink: (whitening(e[s, u][0], k)(e[s, u][0]), e[s, u][1])))
    print(f"\n{time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
