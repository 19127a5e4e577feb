"""Fault-injection trials on the embedding library, shared by ``test_faults_*.py`` (a few
trials each) and ``Testing/benchmark_faults.py`` (long loops whose counts go into BENCHMARKS.md).

Each trial returns a dict with ``damaged`` (the library no longer opens or its rows are
inconsistent) and ``lost`` (acknowledged rows, i.e. rows whose commit a writer reported, that
are missing afterwards).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

DIM = 8
BATCH = 50

# A writer that adds batch after batch; after each successful commit it prints the tag and
# batch number ("acknowledged"). A refused commit (lost lock) prints "refused" and exits 3.
WRITER = textwrap.dedent(f"""
    import sys
    from types import SimpleNamespace
    import numpy as np
    from subject_fingerprint.errors import LibraryError
    from subject_fingerprint.library import EmbeddingLibrary
    from subject_fingerprint.records import ImageRecord

    path, tag, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = SimpleNamespace(model_id="m", metadata={{}}, embedding_dim={DIM})
    try:
        with EmbeddingLibrary.open(path, "a", model=model, lock_timeout=60) as lib:
            for b in range(limit):
                recs = [ImageRecord(source=f"/x/{{tag}}{{b}}-{{j}}", subject_id=f"{{tag}}{{b}}",
                                    image_id=f"{{tag}}{{b}}-{{j}}") for j in range({BATCH})]
                emb = np.random.default_rng(hash((tag, b)) % 2**32).standard_normal(
                    ({BATCH}, {DIM})).astype(np.float32)
                lib.add(recs, [f"{{tag}}{{b}}-{{j}}" for j in range({BATCH})], emb)
                lib.commit()
                print(tag, b, flush=True)
    except LibraryError as exc:
        print("refused", exc, flush=True)
        sys.exit(3)
""")

REMOVER = textwrap.dedent("""
    import sys
    from subject_fingerprint.library import EmbeddingLibrary
    path = sys.argv[1]
    with EmbeddingLibrary.open(path, "a") as lib:
        subjects = sorted(set(lib.column("subject_id")))
        lib.remove(subject_ids=subjects[: max(1, len(subjects) // 2)])
    print("removed", flush=True)
""")


def _env():
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = env.get("PYTHONPATH") or str(root / "SubjectFingerprint")
    return env


def start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def acknowledged(output: str):
    """(tag, batch) pairs a writer reported committed."""
    out = set()
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out.add((parts[0], int(parts[1])))
    return out


def check_library(path: Path, must_hold=()):
    """Open the library as a reader; rows consistent; every batch in ``must_hold`` complete."""
    from subject_fingerprint.library import EmbeddingLibrary

    try:
        with EmbeddingLibrary.open(path) as lib:
            ids = set(lib.column("image_id").tolist())
            n = len(lib)
            emb = lib.embeddings
            consistent = emb.shape == (n, DIM) and np.isfinite(emb).all() and len(ids) == n
    except Exception as exc:  # noqa: BLE001 - any failure to read is damage
        return {"damaged": True, "lost": 0, "error": f"{type(exc).__name__}: {exc}"}
    lost = sum(1 for tag, b in must_hold for j in range(BATCH) if f"{tag}{b}-{j}" not in ids)
    return {"damaged": not consistent, "lost": lost, "rows": n}


def kill_trial(folder: Path, rng: random.Random, seed_batches: int = 2) -> dict:
    """SIGKILL a writer at a random moment; what it acknowledged must all be there."""
    path = folder / "lib.h5"
    writer = start(WRITER, path, "k", 10_000)
    time.sleep(rng.uniform(0.3, 1.5))
    writer.send_signal(signal.SIGKILL)
    out, _ = writer.communicate()
    result = check_library(path, acknowledged(out)) if path.exists() else \
        {"damaged": False, "lost": 0, "rows": 0}
    result["acknowledged"] = len(acknowledged(out))
    return result


def remove_kill_trial(folder: Path, rng: random.Random) -> dict:
    """Fill a library, then SIGKILL ``library remove`` at a random moment: old or new, whole."""
    path = folder / "lib.h5"
    filler = start(WRITER, path, "r", 6)
    out, err = filler.communicate(timeout=120)
    if filler.returncode != 0:
        raise RuntimeError(err)
    before = check_library(path)
    remover = start(REMOVER, path)
    time.sleep(rng.uniform(0.3, 2.5))   # the child needs ~1 s to start: spread over its work
    remover.send_signal(signal.SIGKILL)
    rout, _ = remover.communicate()
    result = check_library(path)
    # Either nothing was removed, or exactly the removal happened; never a partial file.
    result["removed_done"] = "removed" in rout
    if not result["damaged"] and result["rows"] not in (before["rows"], before["rows"] - 3 * BATCH):
        result["damaged"] = True
    return result


def lock_deletion_trial(folder: Path, rng: random.Random, limit: int = 12) -> dict:
    """Delete ``<library>.lock`` while a writer runs, start a second writer; every batch either
    writer acknowledged must be in the library, and neither may crash."""
    path = folder / "lib.h5"
    first = start(WRITER, path, "a", limit)
    lock = Path(str(path) + ".lock")
    deadline = time.monotonic() + 30
    while not lock.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.05, 0.6))
    try:
        lock.unlink()
    except FileNotFoundError:
        pass
    second = start(WRITER, path, "b", limit)
    out_a, err_a = first.communicate(timeout=300)
    out_b, err_b = second.communicate(timeout=300)
    crashed = [e for code, e in ((first.returncode, err_a), (second.returncode, err_b))
               if code not in (0, 3)]
    result = check_library(path, acknowledged(out_a) | acknowledged(out_b))
    result["acknowledged"] = len(acknowledged(out_a) | acknowledged(out_b))
    result["crashed"] = len(crashed)
    result["tracebacks"] = sum("Traceback" in e for e in (err_a, err_b))
    result["refused"] = int(first.returncode == 3) + int(second.returncode == 3)
    result["lock_left"] = lock.exists()
    return result
