"""Fault injection on the embedding library: kills mid-write and mid-remove, a deleted lock
file, a full disk (a small tmpfs when running as root), plain h5py readers in the same
process. The long loops of the same trials are in Testing/benchmark_faults.py."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import fault_trials as ft
from subject_fingerprint.errors import LibraryError, LibraryLockedError
from subject_fingerprint.library import EmbeddingLibrary
from subject_fingerprint.records import ImageRecord

MODEL = SimpleNamespace(model_id="m", metadata={}, embedding_dim=ft.DIM)


def _rows(tag, n=5):
    recs = [ImageRecord(source=f"/x/{tag}{j}", subject_id=tag, image_id=f"{tag}{j}")
            for j in range(n)]
    emb = np.random.default_rng(len(tag)).standard_normal((n, ft.DIM)).astype(np.float32)
    return recs, [f"{tag}{j}" for j in range(n)], emb


def test_lock_file_is_removed_after_a_normal_run(tmp_path):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=MODEL) as lib:
        assert Path(str(path) + ".lock").exists()
        lib.add(*_rows("s"))
    assert not Path(str(path) + ".lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.h5"]


def test_deleted_lock_and_a_second_writer_lose_no_committed_row(tmp_path):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=MODEL) as lib:
        lib.add(*_rows("base"))
    first = EmbeddingLibrary.open(path, "a", model=MODEL)
    first.add(*_rows("first"))
    work = first._work
    os.unlink(str(path) + ".lock")
    # The second writer gets a lock, but must leave the live first writer's working copy.
    with EmbeddingLibrary.open(path, "a", model=MODEL, lock_timeout=1) as second:
        assert work.exists()
        second.add(*_rows("second"))
    with pytest.raises(LibraryLockedError, match="while this process was writing"):
        first.commit()
    first.close()
    with EmbeddingLibrary.open(path) as lib:
        subjects = set(lib.column("subject_id"))
    assert subjects == {"base", "second"}   # the refused writer's rows were never acknowledged
    assert not work.exists()


def test_deleted_lock_with_no_rival_is_taken_again(tmp_path):
    path = tmp_path / "lib.h5"
    lock = Path(str(path) + ".lock")
    with EmbeddingLibrary.open(path, "a", model=MODEL) as lib:
        lib.add(*_rows("a"))
        lock.unlink()
        lib.commit()                      # re-takes the lock, publishes
        assert lock.exists()
        with pytest.raises(LibraryLockedError):
            EmbeddingLibrary.open(path, "a", lock_timeout=0.2)
        lib.add(*_rows("bb"))
    with EmbeddingLibrary.open(path) as lib:
        assert len(lib) == 10
    assert not lock.exists()


def test_plain_h5py_readers_and_the_api_coexist(tmp_path):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=MODEL) as lib:
        lib.add(*_rows("s"))
    with h5py.File(path, "r") as plain:
        with EmbeddingLibrary.open(path) as lib:
            assert len(lib) == plain["embeddings"].shape[0] == 5
    with EmbeddingLibrary.open(path) as lib:
        with h5py.File(path, "r") as plain:
            assert plain.attrs["model_id"] == lib.model_id


def test_disk_full_at_flush_is_one_clear_error_and_the_library_is_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=MODEL) as lib:
        lib.add(*_rows("s"))
    before = path.read_bytes()

    def flush(self):
        raise RuntimeError("Unable to synchronously flush file (file write failed: errno = 28, "
                           "error message = 'No space left on device')")

    monkeypatch.setattr(h5py.File, "flush", flush)
    lib = EmbeddingLibrary.open(path, "a", model=MODEL)
    lib.add(*_rows("more"))
    with pytest.raises(LibraryError, match="no space left on device, nothing stored, library "
                                           "unchanged"):
        lib.close()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.h5"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs; only root can mount one, and some containers forbid it."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_real_disk_full_on_a_tmpfs(small_tmpfs, capfd):
    path = small_tmpfs / "lib.h5"
    with EmbeddingLibrary.open(path, "a", model=MODEL) as lib:
        lib.add(*_rows("s"))
    before = path.read_bytes()
    rows = 4000   # ~0.5 MB of embeddings and strings: the working copy cannot hold them
    recs = [ImageRecord(source=f"/x/{j}" * 8, subject_id=f"big{j}", image_id=f"big{j}")
            for j in range(rows)]
    emb = np.random.default_rng(0).standard_normal((rows, ft.DIM)).astype(np.float32)
    with pytest.raises(LibraryError, match="no space left on device"):
        with EmbeddingLibrary.open(path, "a", model=MODEL) as lib:
            lib.add(recs, [f"h{j}" for j in range(rows)], emb)
    assert path.read_bytes() == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["lib.h5"]
    assert "Traceback" not in capfd.readouterr().err   # h5py's dealloc complaints held back


@pytest.mark.parametrize("trial", ["kill", "remove"])
def test_killed_writers_never_damage_the_library(tmp_path, trial):
    rng = random.Random(7)
    for k in range(2):
        folder = tmp_path / f"{trial}{k}"
        folder.mkdir()
        result = (ft.kill_trial if trial == "kill" else ft.remove_kill_trial)(folder, rng)
        assert not result["damaged"] and result["lost"] == 0, result


def test_lock_deletion_trial_loses_nothing_and_crashes_nothing(tmp_path):
    result = ft.lock_deletion_trial(tmp_path, random.Random(3), limit=8)
    assert not result["damaged"] and result["lost"] == 0, result
    assert result["crashed"] == 0 and result["tracebacks"] == 0, result
    assert not result["lock_left"]
