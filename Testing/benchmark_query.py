"""Benchmark of the embedding library and ranked lookup (not a test).

Builds libraries of random 128-d embeddings (10k, 100k and 1M entries by default), then
measures for each: the time to open the library and load its embeddings, the latency of one
query and of a batch of 100 queries (``search.rank``: top-10 images and subjects, labels
read from the file), and what adding a batch of new entries costs (a whole write session:
lock, copy-on-write, add, fsync, atomic replace), a session whose entries are all
duplicates (no copy), and removing one subject (a compact rewrite). Prints a Markdown table.

    python Testing/benchmark_query.py [--sizes 10000 100000 1000000] [--dir TMPDIR] [--keep]

Figures are warm-cache: the library was just written, so it is in the page cache.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from subject_fingerprint.library import EmbeddingLibrary
from subject_fingerprint.records import ImageRecord
from subject_fingerprint.search import knn, rank

DIM = 128
IMAGES_PER_SUBJECT = 4


def rss_mib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:  # pragma: no cover
        return float("nan")


def records_for(start: int, n: int):
    return [ImageRecord(source=f"/data/cxr/{i // IMAGES_PER_SUBJECT:07d}/{i:08d}.png",
                        subject_id=f"{i // IMAGES_PER_SUBJECT:07d}", image_id=f"{i:08d}.png",
                        modality="DX", view="PA", dataset="bench")
            for i in range(start, start + n)]


def hashes_for(start: int, n: int):
    return [f"{i:064x}" for i in range(start, start + n)]


def build(path: Path, n: int, model, rng, chunk: int = 100_000) -> float:
    started = time.perf_counter()
    with EmbeddingLibrary.open(path, "a", model=model) as lib:
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            lib.add(records_for(lo, m), hashes_for(lo, m),
                    rng.standard_normal((m, DIM), dtype=np.float32))
    return time.perf_counter() - started


def timed(fn, repeat: int):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_size(folder: Path, n: int, add_batch: int, rng) -> dict:
    model = SimpleNamespace(model_id="benchmark0000000", metadata={"bench": True},
                            embedding_dim=DIM)
    path = folder / f"lib-{n}.h5"
    build_s = build(path, n, model, rng)
    size_mib = path.stat().st_size / 2 ** 20
    gc.collect()

    rss0 = rss_mib()
    t = time.perf_counter()
    lib = EmbeddingLibrary.open(path, "r", model=model)
    _ = lib.embeddings
    _ = lib.squared_norms
    open_s = time.perf_counter() - t
    rss_open = rss_mib() - rss0

    queries = rng.standard_normal((100, DIM), dtype=np.float32)
    rank(lib, queries[:1], k=10)  # warm-up
    one_s = timed(lambda: rank(lib, queries[rng.integers(100):][:1], k=10), 15)
    batch_s = timed(lambda: rank(lib, queries, k=10), 3)
    knn_one_s = timed(lambda: knn(lib.embeddings, queries[:1], 10,
                                  gallery_sq_norms=lib.squared_norms), 15)
    lib.close()

    # One write session adding `add_batch` new entries (lock + copy + add + fsync + replace).
    emb = rng.standard_normal((add_batch, DIM), dtype=np.float32)
    recs, hashes = records_for(n, add_batch), hashes_for(n, add_batch)
    t = time.perf_counter()
    with EmbeddingLibrary.open(path, "a", model=model) as lib:
        lib.add(recs, hashes, emb)
    add_s = time.perf_counter() - t
    # The same entries again: only the duplicate check (no copy, nothing written).
    t = time.perf_counter()
    with EmbeddingLibrary.open(path, "a", model=model) as lib:
        result = lib.add(recs, hashes, emb)
    dup_s = time.perf_counter() - t
    assert result.added == 0
    # Removing one subject rewrites the library compactly.
    t = time.perf_counter()
    with EmbeddingLibrary.open(path, "a", model=model) as lib:
        removed = lib.remove(subject_ids=[recs[0].subject_id])
    remove_s = time.perf_counter() - t
    assert removed >= 1
    return dict(remove_s=remove_s, n=n, build_s=build_s, size_mib=size_mib, open_s=open_s, rss_open=rss_open,
                one_ms=one_s * 1e3, knn_one_ms=knn_one_s * 1e3, batch_ms=batch_s * 1e3,
                add_batch=add_batch, add_s=add_s, dup_s=dup_s, path=path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--add-batch", type=int, default=1000,
                        help="entries added in the timed write session (default 1000)")
    parser.add_argument("--dir", help="folder for the libraries (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the libraries")
    args = parser.parse_args(argv)

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="sf-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    try:
        for n in args.sizes:
            print(f"building and measuring {n} entries ...", file=sys.stderr, flush=True)
            row = bench_size(folder, n, args.add_batch, rng)
            rows.append(row)
            if not args.keep:
                row["path"].unlink(missing_ok=True)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"\nEmbedding library and query benchmark ({DIM}-d float32, top-10, "
          f"{os.cpu_count()} CPU threads, warm page cache, load average at the end "
          f"{os.getloadavg()[0]:.1f}; medians)\n")
    print("| entries | file MiB | build s | open + load s | RSS after open MiB | 1 query ms "
          "(rank) | 1 query ms (knn only) | 100 queries ms (rank) | add "
          f"{args.add_batch} (1 session) s | duplicate-only session s | remove 1 subject s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['size_mib']:.0f} | {r['build_s']:.1f} | {r['open_s']:.2f} | "
              f"{r['rss_open']:.0f} | {r['one_ms']:.1f} | {r['knn_one_ms']:.1f} | "
              f"{r['batch_ms']:.0f} | {r['add_s']:.2f} | {r['dup_s']:.2f} | {r['remove_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
