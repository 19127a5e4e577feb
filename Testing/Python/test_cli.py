"""The subject-fingerprint command line end to end: index, query, library, exit codes."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
from subject_fingerprint.library import EmbeddingLibrary
from subject_fingerprint.preprocess import Preprocessing
from runners import run_cli


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    model = FingerprintModel.create(2, depth=18, embedding_dim=32,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)),
                                    modalities=["DX"])
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def exports(sample_data) -> Path:
    path = sample_data / "exports"
    if not path.is_dir():
        pytest.fail(f"committed demo exports missing at {path}")
    return path


def test_index_query_and_library_round_trip(tmp_path, tiny_model, exports):
    lib = tmp_path / "lib.h5"
    code, out, err = run_cli("index", exports / "site-a", "--library", lib, "--model", tiny_model,
                             "--dataset", "site-a", "--json")
    assert code == 0, err
    report = json.loads(out)
    n_files = sum(1 for p in (exports / "site-a").rglob("*") if p.is_file())
    assert report["added"] == n_files and report["failures"] == []

    # A query that is itself in the library finds its own subject first, at distance ~0 (on a
    # bf16 CPU, auto indexes in bf16, whose kernels round a batch of 1 and of N differently).
    query_file = sorted(p for p in (exports / "site-a").rglob("*") if p.is_file())[0]
    patient = query_file.relative_to(exports / "site-a").parts[0]
    code, out, err = run_cli("query", query_file, "--library", lib, "--model", tiny_model,
                             "-k", 3, "--json")
    assert code == 0, err
    answers = json.loads(out)
    assert len(answers) == 1 and answers[0]["query"] == str(query_file)
    top = answers[0]["subjects"][0]
    assert top["subject_id"] == patient and top["distance"] == pytest.approx(0, abs=1e-2)
    assert [s["rank"] for s in answers[0]["subjects"]] == [1, 2, 3]
    assert set(answers[0]["images"][0]) >= {"rank", "subject_id", "image_id", "dataset", "distance"}
    distances = [s["distance"] for s in answers[0]["subjects"]]
    assert distances == sorted(distances)

    code, out, _ = run_cli("query", query_file, "--library", lib, "--model", tiny_model, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and rows[0]["subject_id"] == patient and len(rows) == 10

    code, out, _ = run_cli("library", "info", lib, "--json")
    info = json.loads(out)
    assert code == 0 and info["entries"] == n_files

    code, out, _ = run_cli("library", "remove", lib, "--subject", patient)
    assert code == 0
    with EmbeddingLibrary.open(lib) as opened:
        assert patient not in set(opened.column("subject_id"))
        assert len(opened) < n_files


def test_index_reports_bad_files_and_goes_on(tmp_path, tiny_model):
    folder = tmp_path / "pngs"
    for subject in ("s1", "s2"):
        (folder / subject).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(hash((subject, i)) % 2**32).integers(0, 255, (40, 40))
            Image.fromarray(pixels.astype(np.uint8)).save(folder / subject / f"{i}.png")
    (folder / "s2" / "broken.png").write_bytes(b"not an image")
    lib = tmp_path / "lib.h5"
    code, out, err = run_cli("index", folder, "--library", lib, "--model", tiny_model)
    assert code == 1  # some file failed
    assert "broken.png" in err and "4 image(s) added" in out
    with EmbeddingLibrary.open(lib) as opened:
        assert len(opened) == 4 and set(opened.column("subject_id")) == {"s1", "s2"}

    # Indexing the same folder again adds nothing: every image is an exact duplicate.
    code, out, _ = run_cli("index", folder, "--library", lib, "--model", tiny_model, "--json")
    assert json.loads(out)["added"] == 0 and json.loads(out)["duplicates"] == 4


def test_clear_errors_and_exit_codes(tmp_path, tiny_model, exports):
    lib = tmp_path / "lib.h5"
    run_cli("index", exports / "site-b", "--library", lib, "--model", tiny_model)
    image = next(p for p in (exports / "site-b").rglob("*") if p.is_file())

    other = tmp_path / "other.pt"
    save_checkpoint(FingerprintModel.create(2, depth=18, embedding_dim=32,
                                            preprocessing=Preprocessing(spatial_dims=2, size=(32, 32))),
                    other)
    code, _, err = run_cli("query", image, "--library", lib, "--model", other)
    assert code == 2 and "error:" in err and "model" in err and "Traceback" not in err

    code, _, err = run_cli("query", image, "--library", tmp_path / "missing.h5", "--model", tiny_model)
    assert code == 2 and "missing.h5" in err

    # A 3D volume given to a 2D model: reported for that file, others still answered.
    import SimpleITK as sitk

    volume = tmp_path / "head.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 16, 16).astype(np.float32)), str(volume))
    code, out, err = run_cli("query", volume, image, "--library", lib, "--model", tiny_model, "--json")
    assert code == 1
    assert "3D volume" in err and "head.nii.gz" in err
    assert len(json.loads(out)) == 1


def test_transactional_cancel_leaves_library_unchanged(tmp_path, tiny_model, exports):
    from subject_fingerprint.lookup import index

    lib = tmp_path / "lib.h5"
    index([exports / "site-a"], lib, model=tiny_model, progress=False)
    before = (lib.read_bytes(), len(EmbeddingLibrary.open(lib)))
    calls = {"n": 0}

    def cancel_after_first_batch():
        calls["n"] += 1
        return calls["n"] > 1

    report = index([exports / "site-b"], lib, model=tiny_model, progress=False, batch_size=4,
                   cancel=cancel_after_first_batch, transactional=True)
    assert report.cancelled and report.added == 0
    assert lib.read_bytes() == before[0]


def test_cli_on_shared_chest_xrays(tmp_path, tiny_model, shared_data):
    source = shared_data / "cxr14-subset-64px"
    subset = tmp_path / "cxr"
    rows = list(csv.DictReader(open(source / "manifest.csv", newline="")))[:30]
    for row in rows:
        (subset / row["image_path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / row["image_path"], subset / row["image_path"])
    with open(subset / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lib = tmp_path / "lib.h5"
    code, out, err = run_cli("index", subset, "--library", lib, "--model", tiny_model, "--json")
    assert code == 0, err
    assert json.loads(out)["added"] == 30
    with EmbeddingLibrary.open(lib) as opened:
        assert set(opened.column("subject_id")) == {r["subject_id"] for r in rows}
