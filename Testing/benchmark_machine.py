#!/usr/bin/env python
"""Issue 12's table in one run: each piece of work as the project does it, beside its
alternative and the hardware limit measured in the same run (not a test).

Rows: ResNet-50 inference (2D 512x512 at batch 1 and 8, 3D 78x120x120) for the old path
(eager NCHW float32), every backend and ``auto``; ``index`` of the 1000 NIH PNGs against
decode-and-preprocess alone, and a re-index; exact top-10 over 1M x 128 for one query and
1000 queries against numpy matmul, torch and faiss; the all-pairs range search of dedup
(100k x 100k plus both within-halves) against faiss and the GEMM limit. Limits: memory read
bandwidth (numpy sum) and float32 GEMM GFLOP/s (numpy 4096^3), measured here.

    python Testing/benchmark_machine.py [--only inference,index,query,dedup]
        [--gallery 1000000] [--dedup 100000] [--repeat 2]

Everything is timed best-of-``repeat`` (a shared machine: the best pass is nearest to the
hardware); the load average is printed with each section.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# As the command line does (cli.py), before torch is imported; a value set by the caller wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA = SHARED / "cxr14-subset-64px"
VOLUMES = SHARED / "lgg-mri-80"


def best(fn, repeat):
    fn()  # warm-up
    out = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def load():
    return f"load {os.getloadavg()[0]:.1f}"


def gemm_gflops(repeat):
    a = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
    return 2 * 4096 ** 3 / best(lambda: a @ a, repeat) / 1e9


def gemm_gflops_bf16(repeat):
    """bfloat16 GEMM through torch (oneDNN/AMX where the CPU has it), 4096^3."""
    import torch

    a = torch.from_numpy(np.random.default_rng(0).random((4096, 4096), dtype=np.float32)).bfloat16()
    return 2 * 4096 ** 3 / best(lambda: a @ a, repeat) / 1e9


def bandwidth_gbs(x, repeat):
    return x.nbytes / best(lambda: x.sum(), repeat) / 1e9


def real_inputs(model, n):
    """The first ``n`` images of a shared folder (NIH X-rays for 2D, LGG MRI for 3D) at the
    model's input size, as ``index`` would feed them; None without the shared data."""
    import torch

    from subject_fingerprint.embed import _RecordDataset
    from subject_fingerprint.io import discover

    folder = DATA if model.spatial_dims == 2 else VOLUMES
    if not (folder / "manifest.csv").is_file():
        return None
    found = discover([str(folder / "images")], manifest=str(folder / "manifest.csv"))
    ds = _RecordDataset(found.records[:n], model.preprocessing, model.spatial_dims, model.modalities, None)
    return torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))


def section_inference(repeat, shapes):
    import torch

    from subject_fingerprint import backends
    from subject_fingerprint.checkpoint import FingerprintModel
    from subject_fingerprint.embed import Embedder
    from subject_fingerprint.preprocess import Preprocessing

    cpu = torch.device("cpu")
    print(f"\n### ResNet-50 inference, ms per image of 8 embedded in calls of `batch` "
          f"({torch.get_num_threads()} threads, {load()})\n")
    print("| input | batch | old path (eager NCHW fp32) | torch channels-last | bf16 | bf16-mixed | onnx | "
          "onnx-int8 | auto picks | auto / old | Embedder (auto, passes of <= 2^18 voxels) | "
          "min cosine to fp32 (bf16, bf16-mixed, onnx, int8) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dims, size in shapes:
        torch.manual_seed(0)
        model = FingerprintModel.create(dims, depth=50, embedding_dim=128,
                                        preprocessing=Preprocessing(spatial_dims=dims, size=size))
        old = backends.TorchRunner(model.network, cpu, dims, channels_last=False)
        runners = {"torch": backends.make_runner(model, "torch", cpu)}
        for name in ("bf16", "bf16-mixed", "onnx", "onnx-int8"):
            try:
                runners[name] = backends.make_runner(model, name, cpu)
            except ValueError as exc:
                print(f"({name}: {exc})", file=sys.stderr)
        # auto decides as in a real run: on the first images it is given (real ones when the
        # shared data is there), timed on one pass and checked on CHECK_BATCH of them.
        real = real_inputs(model, 8)
        embedder = Embedder(model, device="cpu", backend="auto", progress=False)
        choice = embedder._decide(first=real)
        print(f"inputs: {'real images' if real is not None else 'seeded noise'}", file=sys.stderr)
        # Every row embeds the same 8 images, in calls of ``batch``: per image, batch 1 is the
        # mean of 8 calls, not the best single call (which would flatter it by ~4 %).
        x = real if real is not None else backends.check_batch(model, 8)
        ref = old(x).numpy()
        cos = {name: backends.min_cosine(ref, runner(x).numpy()) for name, runner in runners.items()}
        for batch in ((1, 8) if dims == 2 else (1,)):
            def per_image(fn):
                return best(lambda: [fn(x[i:i + batch]) for i in range(0, len(x), batch)], repeat) / len(x)

            t_old = per_image(old)
            times = {name: per_image(runner) for name, runner in runners.items()}
            t_auto = times.get(choice.name, t_old)
            t_emb = per_image(embedder.embed_tensor)
            cell = lambda n: f"{times[n] * 1e3:.0f}" if n in times else "-"  # noqa: E731
            others = ("bf16", "bf16-mixed", "onnx", "onnx-int8")
            cosines = ", ".join(f"{cos[n]:.5f}" for n in others if n in cos)
            print(f"| {dims}D {'x'.join(map(str, size))} | {batch} | {t_old * 1e3:.0f} | "
                  f"{' | '.join(cell(n) for n in ('torch', *others))} | "
                  f"{choice.name} | {t_old / t_auto:.2f}x faster | {t_emb * 1e3:.0f} | {cosines} |")
        print(f"auto's check batch: {choice.summary()}", file=sys.stderr)


def decode_seconds(ds, workers: int, batch: int) -> float:
    """Decode and preprocess every item of ``ds`` as ``index`` feeds them, in ``workers``
    processes (0: this one), without the network."""
    from torch.utils.data import DataLoader

    from subject_fingerprint.embed import _collate

    if not workers:
        t = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        return time.perf_counter() - t
    t = time.perf_counter()
    for _ in DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=_collate, prefetch_factor=2):
        pass
    return time.perf_counter() - t


def section_index(repeat, device="cpu", data=DATA):
    """``index`` of the images under ``data`` with the starter model on ``device``, against
    decoding alone (one process, and the index's own workers) and the network alone."""
    import torch

    from subject_fingerprint import backends
    from subject_fingerprint.checkpoint import default_model_path, load_checkpoint
    from subject_fingerprint.embed import _RecordDataset, default_batch_size, mean_over_views
    from subject_fingerprint.io import discover
    from subject_fingerprint.lookup import index

    device = torch.device(device)
    model = load_checkpoint(default_model_path())
    images_dir, manifest = str(data / "images"), str(data / "manifest.csv")
    found = discover([images_dir], manifest=manifest)
    records = found.records
    ds = _RecordDataset(records, model.preprocessing, model.spatial_dims, model.modalities, None)
    batch = default_batch_size(model)
    cores = backends.cpu_cores()
    decode = best(lambda: decode_seconds(ds, 0, batch), repeat)
    decode_workers = best(lambda: decode_seconds(ds, cores, batch), repeat) if cores > 1 else decode
    # The network alone on the same images, as index batches them, for each backend.
    images = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    model_alone = {}
    views = model.preprocessing.view_shifts()  # every view is a pass of the network
    for name in ("torch", "bf16", "bf16-mixed", "onnx"):
        if backends.unavailable(name, device):
            continue
        runner = backends.make_runner(model, name, device)
        model_alone[name] = best(lambda: [mean_over_views(runner, images[i:i + batch], views)
                                          for i in range(0, len(images), batch)], repeat)
    folder = Path(tempfile.mkdtemp(prefix="sf-bench-index-"))
    rows = []
    # "auto, measured": the candidates are timed in the index (as on a first run); "auto,
    # remembered": a later run with the same cache reuses that measurement (backends module doc).
    cases = (("torch", 0, ""), ("bf16", None, ""), ("bf16-mixed", None, ""), ("auto", None, "measured"),
             ("auto", None, "remembered"))
    if device.type == "cuda":  # one candidate there (AMP); the workers are what varies
        cases = (("torch", 0, ""), ("torch", None, ""), ("auto", None, "measured"))
    try:
        for backend, workers, mode in cases:
            if backend != "auto" and backends.unavailable(backend, device):
                print(f"({backends.unavailable(backend, device)})", file=sys.stderr)
                continue
            times, report = [], None
            for r in range(repeat):
                if mode == "measured":
                    backends._REMEMBERED.clear()
                    (backends.cache_dir() / backends._CHOICES_FILE).unlink(missing_ok=True)
                lib = folder / f"{backend}-{workers}-{mode}-{r}.h5"
                t = time.perf_counter()
                report = index([images_dir], lib, model=model, manifest=manifest, device=str(device),
                               num_workers=workers, backend=backend, progress=False)
                times.append(time.perf_counter() - t)
            t = time.perf_counter()
            again = index([images_dir], lib, model=model, manifest=manifest, device=str(device),
                          num_workers=workers, backend=backend, progress=False)
            label = f"{backend}, {mode}" if mode else backend
            rows.append((label, workers, min(times), report, time.perf_counter() - t, again))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n### `index` of {len(records)} NIH PNGs on {device}, starter model ({len(views)} network "
          f"pass(es) per image), model already loaded ({load()})\n")
    print(f"decode + preprocess alone: {decode:.2f} s in 1 process, {decode_workers:.2f} s in {cores} "
          f"worker processes\n")
    print("| backend | decoding workers | index s | decode + preprocess alone s (1 process) | "
          "network alone s (that backend, batches of the index) | index / decode | "
          "index / max(decode, network) | backend used | re-index s | re-index embedded |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for backend, workers, t, report, t_again, again in rows:
        net = model_alone.get(report.backend, float("nan"))
        print(f"| {backend} | {cores if workers is None else workers} | {t:.2f} | {decode:.2f} | "
              f"{net:.2f} | {t / decode:.2f} | {t / max(decode, net):.2f} | {report.backend} | "
              f"{t_again:.2f} | {again.embedded} |")


def section_query(n, repeat):
    import torch

    from subject_fingerprint import search

    rng = np.random.default_rng(0)
    g = rng.standard_normal((n, 128), dtype=np.float32)
    norms = np.einsum("ij,ij->i", g, g)
    q = rng.standard_normal((1000, 128), dtype=np.float32)
    gt, qt, nt = torch.from_numpy(g), torch.from_numpy(q), torch.from_numpy(norms)
    bw, gf = bandwidth_gbs(g, repeat), gemm_gflops(repeat)
    one = best(lambda: search.knn(g, q[:1], 10, gallery_sq_norms=norms), repeat)
    one_np = best(lambda: g @ q[0], repeat)
    many = best(lambda: search.knn(g, q, 10, gallery_sq_norms=norms), 1)
    search._USE_FAISS = False
    many_numpy = best(lambda: search.knn(g, q, 10, gallery_sq_norms=norms), 1)
    search._USE_FAISS = True

    def torch_many():
        for s in range(0, n, 65536):
            torch.topk(torch.addmm(nt[s:s + 65536], qt, gt[s:s + 65536].T, alpha=-2), 10,
                       largest=False)

    many_torch = best(torch_many, 1)
    try:
        import faiss

        many_faiss = best(lambda: faiss.knn(q, g, 10), 1)
    except ImportError:
        many_faiss = float("nan")
    print(f"\n### Exact top-10 in {n:,} x 128 float32 ({load()}; measured limits: read "
          f"{bw:.1f} GB/s, numpy fp32 GEMM {gf:.0f} GFLOP/s)\n")
    print("| work | project (search.knn) | alternative | limit | project / alternative | "
          "project / limit |")
    print("|---|---|---|---|---|---|")
    lim_one = g.nbytes / (bw * 1e9)
    print(f"| 1 query | {one * 1e3:.1f} ms | numpy matmul alone {one_np * 1e3:.1f} ms | "
          f"{lim_one * 1e3:.1f} ms (read {g.nbytes / 2**20:.0f} MiB) | {one / one_np:.2f} | "
          f"{one / lim_one:.2f} |")
    lim_many = 2 * 1000 * n * 128 / (gf * 1e9)
    print(f"| 1000 queries, per query | {many:.2f} ms | pruned numpy kernel {many_numpy:.2f} ms; "
          f"torch addmm+topk {many_torch:.2f} ms; faiss.knn alone {many_faiss:.2f} ms | "
          f"{lim_many:.2f} ms (GEMM) | {many / many_torch:.2f} (vs torch) | "
          f"{many / lim_many:.2f} |")


def section_dedup(n, repeat):
    from subject_fingerprint.dedup import engine
    from subject_fingerprint.dedup.engine import close_pairs

    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, 128), dtype=np.float32)
    b = rng.standard_normal((n, 128), dtype=np.float32)
    b[:100] = a[:100] + 0.02 * rng.standard_normal((100, 128), dtype=np.float32)
    threshold = 11.0  # random 128-d normals sit near 16; this keeps few chance pairs

    def project(precision):
        return [close_pairs(a, b, threshold, precision=precision),
                close_pairs(a, a, threshold, same=True, precision=precision),
                close_pairs(b, b, threshold, same=True, precision=precision)]

    auto = engine.first_pass_precision()
    runs = {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        runs[precision] = (project(precision), time.perf_counter() - t0)
    pairs = lambda r: set(zip(r[0].tolist(), r[1].tolist()))  # noqa: E731
    gf, gf16 = gemm_gflops(repeat), gemm_gflops_bf16(repeat)
    flop = 2 * 128 * (n * n + 2 * n * n / 2)
    try:
        import faiss

        def faiss_range(x, y, same):
            index = faiss.IndexFlatL2(128)
            index.add(y)
            lims, dist, ids = index.range_search(x, threshold ** 2)
            ii = np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
            keep = ii < ids if same else np.ones(len(ii), bool)
            return ii[keep], ids[keep]

        t0 = time.perf_counter()
        theirs = [faiss_range(a, b, False), faiss_range(a, a, True), faiss_range(b, b, True)]
        t_faiss = time.perf_counter() - t0
        same = {p: all(pairs(o) == pairs(f) for o, f in zip(runs[p][0], theirs)) for p in runs}
    except ImportError:
        t_faiss, same = float("nan"), {p: "faiss absent" for p in runs}
    exact = all(pairs(x) == pairs(y) for x, y in zip(runs["fp32"][0], runs["bf16"][0]))
    n_pairs = sum(len(o[0]) for o in runs["fp32"][0])
    print(f"\n### Dedup all pairs, {n:,} x {n:,} plus both within-halves ({flop / 1e12:.2f} TFLOP, "
          f"{load()}; fp32 GEMM {gf:.0f} GFLOP/s (numpy), bf16 GEMM {gf16:.0f} GFLOP/s (torch) here; "
          f"auto first pass: {auto})\n")
    print("| first pass | close_pairs s | faiss range search s | GEMM limit s (its precision) | "
          "project / faiss | project / limit | pairs | same pairs as faiss | same pairs as fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for precision, (result, t) in runs.items():
        limit = flop / ((gf if precision == "fp32" else gf16) * 1e9)
        print(f"| {precision}{' (auto)' if precision == auto else ''} | {t:.1f} | {t_faiss:.1f} | "
              f"{limit:.1f} | {t / t_faiss:.2f} | {t / limit:.2f} | "
              f"{sum(len(o[0]) for o in result)} | {same[precision]} | "
              f"{True if precision == 'fp32' else exact} |")
    print(f"\n(pairs found by the exact float32 pass: {n_pairs})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="inference,index,query,dedup")
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--dedup", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-3d", action="store_true", help="inference: only the 2D rows")
    args = parser.parse_args(argv)
    flags = sorted(f for f in __import__("subject_fingerprint.backends", fromlist=["x"]).cpu_flags()
                   if f.startswith(("avx512", "avx_vnni", "amx", "avx2", "fma")))
    print(f"CPU threads {os.cpu_count()}, flags: {' '.join(flags)}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}; {load()} at start; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    wanted = set(args.only.split(","))
    # Exports and remembered backend choices go to a folder of this run, not the user's cache.
    if not os.environ.get("SUBJECT_FINGERPRINT_CACHE"):
        cache = tempfile.mkdtemp(prefix="sf-bench-cache-")
        os.environ["SUBJECT_FINGERPRINT_CACHE"] = cache
        import atexit
        atexit.register(shutil.rmtree, cache, True)
    if "inference" in wanted:
        shapes = [(2, (512, 512))] + ([] if args.no_3d else [(3, (78, 120, 120))])
        section_inference(args.repeat, shapes)
    if "index" in wanted:
        section_index(args.repeat)
    if "query" in wanted:
        section_query(args.gallery, args.repeat)
    if "dedup" in wanted:
        section_dedup(args.dedup, args.repeat)
    print(f"\n{load()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
