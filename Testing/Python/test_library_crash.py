"""A writer killed at random moments never damages what was stored; two writers never interleave."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from subject_fingerprint.errors import LibraryLockedError
from subject_fingerprint.library import EmbeddingLibrary

DIM = 32
BATCH = 1500

# The child adds deterministic batches forever, printing the number of each batch once it is
# committed. Batch b holds image IDs "b<b>-<j>" and embeddings from seed b.
WRITER = textwrap.dedent(f"""
    import sys, time
    from types import SimpleNamespace
    import numpy as np
    from subject_fingerprint.library import EmbeddingLibrary
    from subject_fingerprint.records import ImageRecord

    path, style, tag = sys.argv[1], sys.argv[2], sys.argv[3]
    model = SimpleNamespace(model_id="m", metadata={{}}, embedding_dim={DIM})

    def batch(b):
        rng = np.random.default_rng(b)
        recs = [ImageRecord(source=f"/x/{{tag}}{{b}}-{{j}}", subject_id=f"{{tag}}s{{b}}",
                            image_id=f"{{tag}}{{b}}-{{j}}") for j in range({BATCH})]
        hashes = [f"{{tag}}{{b}}-{{j}}" for j in range({BATCH})]
        return recs, hashes, rng.standard_normal(({BATCH}, {DIM})).astype(np.float32)

    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 10**9
    with EmbeddingLibrary.open(path, "a", model=model) as lib:
        b = len(lib) // {BATCH} if tag == "" else 0
    start = b
    if style == "session":            # one session, commit() after each batch
        with EmbeddingLibrary.open(path, "a", model=model) as lib:
            while b < start + limit:
                lib.add(*batch(b)); lib.commit()
                print(b, flush=True); b += 1
    else:                             # open / add / close per batch, like lookup.index
        while b < start + limit:
            with EmbeddingLibrary.open(path, "a", model=model, lock_timeout=60) as lib:
                b = len(lib) // {BATCH} if tag == "" else b
                lib.add(*batch(b))
            print(b, flush=True); b += 1
""")


def expected_batch(b):
    return np.random.default_rng(b).standard_normal((BATCH, DIM)).astype(np.float32)


def start_writer(tmp_path, path, style, tag="", limit=None):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    args = [sys.executable, str(script), str(path), style, tag]
    if limit is not None:
        args.append(str(limit))
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_write_keeps_committed_entries(tmp_path):
    path = tmp_path / "lib.h5"
    rng = np.random.default_rng(12345)
    committed = -1
    for round_ in range(6):
        proc = start_writer(tmp_path, path, "session" if round_ % 2 else "reopen")
        # Let it commit at least one batch now and then, then kill it at a random moment.
        time.sleep(0.4 + rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err
        done = [int(x) for x in out.split()]
        if done:
            committed = max(committed, done[-1])
        with EmbeddingLibrary.open(path) as lib:
            n = len(lib)
            # Everything reported as committed is there; only whole batches are there.
            assert n % BATCH == 0
            assert n >= (committed + 1) * BATCH
            assert n <= (committed + 2) * BATCH  # at most the batch being committed when killed
            emb = lib.embeddings
            ids = lib.column("image_id")
            for b in range(n // BATCH):
                np.testing.assert_array_equal(emb[b * BATCH:(b + 1) * BATCH], expected_batch(b))
                assert ids[b * BATCH] == f"{b}-0" and ids[(b + 1) * BATCH - 1] == f"{b}-{BATCH - 1}"
            committed = n // BATCH - 1
        with h5py.File(path, "r") as f:  # and plain h5py agrees
            assert f["embeddings"].shape == (n, DIM) and len(f["image_id"]) == n
    assert committed >= 2, "the writer never got to commit; the test proved nothing"
    # The next writer removes the abandoned working copy.
    with EmbeddingLibrary.open(path, "a"):
        pass
    assert not list(tmp_path.glob("lib.h5.tmp-*"))


def test_second_writer_refused_or_waits(tmp_path):
    path = tmp_path / "lib.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from types import SimpleNamespace
            from subject_fingerprint.library import EmbeddingLibrary
            m = SimpleNamespace(model_id="m", metadata={}, embedding_dim=4)
            with EmbeddingLibrary.open(sys.argv[1], "a", model=m):
                print("locked", flush=True)
                sys.stdin.readline()
            """), str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(LibraryLockedError) as err:
            EmbeddingLibrary.open(path, "a", lock_timeout=0.3)
        assert time.monotonic() - started >= 0.25
        message = str(err.value)
        assert "another process is writing to" in message and str(path) in message
        assert f"pid {holder.pid}" in message
        # Readers are not blocked by the writer.
        with EmbeddingLibrary.open(path) as lib:
            assert len(lib) == 0
        # A waiting writer gets the lock as soon as the holder lets go.
        holder.stdin.write("\n")
        holder.stdin.flush()
        with EmbeddingLibrary.open(path, "a", lock_timeout=20) as lib:
            assert lib.model_id == "m"
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_writers_are_serialised(tmp_path):
    path = tmp_path / "lib.h5"
    procs = [start_writer(tmp_path, path, "reopen", tag=tag, limit=4) for tag in ("p", "q")]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with EmbeddingLibrary.open(path) as lib:
        ids = lib.column("image_id")
    assert len(ids) == 8 * BATCH
    # Every batch is stored whole and contiguous: never interleaved with the other writer's.
    for start in range(0, len(ids), BATCH):
        block = ids[start:start + BATCH]
        head = block[0].rsplit("-", 1)[0]
        assert list(block) == [f"{head}-{j}" for j in range(BATCH)]
    heads = {ids[s].rsplit("-", 1)[0] for s in range(0, len(ids), BATCH)}
    assert heads == {f"{t}{b}" for t in "pq" for b in range(4)}
