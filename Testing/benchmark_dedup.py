"""Time dedup's all-pairs comparison at scale (not a test).

Two datasets of N already-embedded images each (128-d, clustered like subjects: 4 images per
subject around a centre), a share of subjects planted in both; prints the time of the block-wise
comparison and aggregation, and the peak resident memory.

    python Testing/benchmark_dedup.py --n 100000
"""

import argparse
import resource
import time

import numpy as np

from subject_fingerprint.dedup import engine


def dataset(name, centres, subjects, rng, spread):
    rows = np.repeat(subjects, 4)
    emb = centres[rows] + rng.normal(0, spread, (len(rows), centres.shape[1]))
    ids = np.array([f"{name}-{s}" for s in rows], dtype=object)
    return engine.EmbeddedDataset(name, emb.astype(np.float32), ids, ids, ids,
                                  np.array([""] * len(rows), dtype=object))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="images per dataset")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shared", type=int, default=500, help="subjects planted in both")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    per = args.n // 4
    centres = rng.normal(0, 1, (2 * per, args.dim))
    a = dataset("a", centres, np.arange(per), rng, 0.05)
    b = dataset("b", centres, np.arange(per - args.shared, 2 * per - args.shared), rng, 0.05)
    threshold = 0.05 * np.sqrt(2 * args.dim) * 1.5  # above same-subject distances, far below others
    start = time.perf_counter()
    pairs = engine.find_pairs([a, b], threshold)
    suspects = engine.subject_pairs([a, b], pairs)
    seconds = time.perf_counter() - start
    across = [s for s in suspects if s.a != s.b]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("| images per dataset | comparisons | seconds | shared subjects found / planted | peak RSS MiB |")
    print("|---|---|---|---|---|")
    print(f"| {args.n:,} | {args.n * args.n + args.n * (args.n - 1) // 2 * 2:,} | {seconds:.1f} | "
          f"{len(across)} / {args.shared} | {peak:.0f} |")


if __name__ == "__main__":
    main()
