"""What a newcomer meets first: inputs checked before the model loads, readable `library info`,
a labelled plain-text `query`, `evaluate` with the starter model by default and no empty
output folder after a failure."""

from __future__ import annotations


import pytest

from subject_fingerprint import checkpoint
from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
from subject_fingerprint.preprocess import Preprocessing
from runners import run_cli


@pytest.fixture(scope="module")
def library(tmp_path_factory, sample_data):
    folder = tmp_path_factory.mktemp("first-hour")
    model = folder / "tiny.pt"
    save_checkpoint(FingerprintModel.create(2, depth=18, embedding_dim=16,
                                            preprocessing=Preprocessing(spatial_dims=2, size=(32, 32))), model)
    lib = folder / "site-a.h5"
    code, _, err = run_cli("index", sample_data / "exports" / "site-a", "--library", lib,
                           "--model", model, "--dataset", "site-a", "--json")
    assert code == 0, err
    return lib, model


def _no_model_load(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")
    monkeypatch.setattr(checkpoint, "load_checkpoint", refuse)


def test_query_of_a_missing_file_fails_before_the_model_loads(library, monkeypatch):
    lib, model = library
    _no_model_load(monkeypatch)
    code, _, err = run_cli("query", "new.dcm", "--library", lib, "--model", model)
    assert code == 2 and "new.dcm: no such file or folder" in err
    code, _, err = run_cli("query", "new.dcm", "--library", "missing.h5", "--model", model)
    assert code == 2 and "missing.h5: no such library file" in err


def test_library_info_is_readable_text(library):
    code, out, _ = run_cli("library", "info", library[0])
    assert code == 0
    assert "datasets: site-a (28 entries)" in out and "{" not in out and "file size:" in out


def test_plain_text_query_labels_subjects_and_images(library, sample_data):
    lib, model = library
    image = sorted(p for p in (sample_data / "exports" / "site-b").rglob("IM00000"))[0]
    code, out, err = run_cli("query", image, "--library", lib, "--model", model, "-k", 2)
    assert code == 0, err
    assert "closest subjects" in out and "closest images" in out
    assert out.index("closest subjects") < out.index("closest images")


def test_evaluate_defaults_to_the_starter_model_and_leaves_no_empty_folder(tmp_path, monkeypatch):
    asked = []

    def starter():
        asked.append(True)
        raise checkpoint.CheckpointError("starter.pt", "not here in this test")
    monkeypatch.setattr(checkpoint, "default_model_path", starter)
    out = tmp_path / "eval"
    code, _, err = run_cli("evaluate", tmp_path, "--split", tmp_path / "split.json", "--out", out)
    assert code == 2 and asked and "not here in this test" in err
    assert not out.exists()
