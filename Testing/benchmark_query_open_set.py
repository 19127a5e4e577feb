"""Open-set query on the ChestX-ray14 test split (not a test): for each test patient, one image
is queried against a library of every *other* test patient (leave one patient out), and for
patients with two or more images, one image against a library holding the patient's other
images too. Prints how often the answer is "no subject of the library matches".

    python Testing/benchmark_query_open_set.py
"""

import json
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main():
    from subject_fingerprint import lookup
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.io import discover
    from subject_fingerprint.library import EmbeddingLibrary
    from subject_fingerprint.search import rank

    model = lookup.resolve_model(REPO / "Resources/Models/starter-2d-cxr.pt")
    test = set(json.loads((REPO / "Resources/Splits/cxr14-subset-64px-seed42.json").read_text())["test"])
    found = discover([str(REPO.parent / "shared/data/cxr14-subset-64px")])
    records = [r for r in found.records if r.subject_id in test]
    emb = Embedder(model, device="cpu", progress=False).embed_records(records)
    subjects = sorted({r.subject_id for r in emb.records})
    first = {s: next(n for n, r in enumerate(emb.records) if r.subject_id == s) for s in subjects}
    absent, present = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for s in subjects:
            for inside in (False, True):
                keep = [n for n, r in enumerate(emb.records)
                        if (r.subject_id != s or inside) and n != first[s]]
                if inside and not any(emb.records[n].subject_id == s for n in keep):
                    continue
                path = Path(tmp) / f"{s}-{inside}.h5"
                with EmbeddingLibrary.open(path, mode="a", model=model) as lib:
                    lib.add([emb.records[n] for n in keep], [emb.content_hashes[n] for n in keep],
                            emb.embeddings[keep])
                with EmbeddingLibrary.open(path, mode="r", model=model) as lib:
                    result = rank(lib, emb.embeddings[first[s]][None], k=10,
                                  calibration=model.calibration)
                    codes, keys = lib.subject_codes()
                    counts = np.bincount(codes, minlength=len(keys))
                    lookup.open_set(result, {k: int(c) for k, c in zip(keys, counts)},
                                    model.calibration)
                o = result[0].open_set
                (present if inside else absent).append((o["match"], o["best_posterior"], s))
    no_match = sum(1 for m, _, _ in absent if m is None)
    right = sum(1 for m, _, s in present if m == s)
    wrong = sum(1 for m, _, s in present if m is not None and m != s)
    print("| queries | library | answer 'no match' | right match | wrong match |")
    print("|---|---|---|---|---|")
    print(f"| {len(absent)} patients not in the library | the {len(subjects) - 1} other test patients | "
          f"{no_match} ({no_match / len(absent):.1%}) | - | {len(absent) - no_match} |")
    print(f"| {len(present)} patients with other images in the library | all test patients | "
          f"{len(present) - right - wrong} | {right} ({right / len(present):.1%}) | {wrong} |")


if __name__ == "__main__":
    main()
