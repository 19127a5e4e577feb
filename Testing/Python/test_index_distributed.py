"""Indexing skips stored images before embedding; `library merge`; torchrun with two CPU
processes (gloo) gives the same library as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
from subject_fingerprint.library import COLUMNS, EmbeddingLibrary
from subject_fingerprint.preprocess import Preprocessing

from test_cli import run_cli


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    model = FingerprintModel.create(2, depth=10, embedding_dim=8,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)),
                                    modalities=["DX"])
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def folder(sample_data):
    path = sample_data / "exports" / "site-a"
    assert path.is_dir(), f"committed demo exports missing at {path}"
    return path


def _contents(path):
    with EmbeddingLibrary.open(path, "r") as lib:
        cols = {c: lib.column(c).tolist() for c in COLUMNS if c != "added"}
        return cols, np.array(lib.embeddings), lib.model_id


def _index(folder, lib, model, *extra):
    code, out, err = run_cli("index", folder, "--library", lib, "--model", model,
                             "--backend", "torch", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_reindex_embeds_nothing(tmp_path, tiny_model, folder):
    lib = tmp_path / "lib.h5"
    first = _index(folder, lib, tiny_model, "--workers", "2")
    assert first["added"] == first["embedded"] == first["discovered"] > 0
    again = _index(folder, lib, tiny_model, "--workers", "0")
    assert again["embedded"] == 0 and again["added"] == 0
    assert again["duplicates"] == first["added"]
    # With auto, nothing to embed means the backend check never runs.
    code, out, err = run_cli("index", folder, "--library", lib, "--model", tiny_model,
                             "--json")
    assert code == 0, err
    assert json.loads(out)["embedded"] == 0 and json.loads(out)["backend"] == "auto"


def test_library_merge(tmp_path, tiny_model, folder):
    a = tmp_path / "a.h5"
    _index(folder, a, tiny_model)
    code, out, err = run_cli("library", "merge", a, a, "--into", tmp_path / "m.h5")
    assert code == 0, err
    assert "0 exact" not in out  # the second copy of a is all duplicates
    merged, emb, mid = _contents(tmp_path / "m.h5")
    original, emb0, mid0 = _contents(a)
    assert merged == original and mid == mid0
    np.testing.assert_array_equal(emb, emb0)
    code, _, err = run_cli("library", "merge", tmp_path / "missing.h5", "--into", tmp_path / "x.h5")
    assert code == 2 and "missing.h5" in err


def test_torchrun_two_processes_match_one(tmp_path, tiny_model, folder, repo_root):
    single = tmp_path / "single.h5"
    _index(folder, single, tiny_model, "--workers", "0")
    target = tmp_path / "ranks.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(repo_root / "SubjectFingerprint"), str(repo_root / "FingerprintTraining"),
         os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "subject_fingerprint", "index", str(folder), "--library", str(target),
           "--model", str(tiny_model), "--backend", "torch", "--workers", "0", "--json",
           "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    cols, emb, mid = _contents(target)
    cols1, emb1, mid1 = _contents(single)
    assert report["added"] == len(emb1)
    assert cols == cols1 and mid == mid1
    np.testing.assert_allclose(emb, emb1, rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob("ranks.h5.shard-*"))  # shards merged and removed


def test_ranks_are_dealt_over_the_gpus_and_share_them():
    from subject_fingerprint.distributed_index import rank_device

    # One GPU, two ranks: both use it (rank 1 used to ask for a missing cuda:1 and fall back to the CPU).
    assert [rank_device("auto", r, 1) for r in range(2)] == ["cuda:0", "cuda:0"]
    assert [rank_device("cuda", r, 2) for r in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert rank_device("cuda:1", 0, 4) == "cuda:0"  # under torchrun the rank, not the flag, picks
    assert rank_device("cpu", 1, 2) == "cpu"         # the CPU when asked for
    assert rank_device("auto", 1, 0) == "auto"       # no GPU: resolved (to the CPU) as usual
    assert rank_device("cuda", 0, 0) == "cuda"       # ... with resolve_device's notice
    assert rank_device(None, 1, 2) == rank_device(" AUTO", 1, 2) == "cuda:1"
