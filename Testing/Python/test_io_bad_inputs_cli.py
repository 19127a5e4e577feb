"""Bad inputs through the command line: every failure is one line, the batch goes on, and
no input gives a Python traceback on stderr (dependency loggers included)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from PIL import Image

from dicom_factory import write_dicomdir, write_non_image, write_xray
from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
from subject_fingerprint.library import EmbeddingLibrary
from subject_fingerprint.preprocess import Preprocessing
from subject_fingerprint.records import ImageRecord
from runners import run_cli

REPO = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(13)


def _env(**extra):
    env = dict(os.environ)
    # The packages the tests import (an editable install, or PYTHONPATH) are the ones run.
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH") or os.pathsep.join(
        [str(REPO / "SubjectFingerprint"), str(REPO / "FingerprintTraining")])
    env.update(extra)
    return env


def run_sub(*argv, **env):
    return subprocess.run([sys.executable, "-m", "subject_fingerprint", *map(str, argv)],
                          capture_output=True, env=_env(**env), timeout=300)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    model = FingerprintModel.create(2, depth=18, embedding_dim=16,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(32, 32)))
    save_checkpoint(model, path)
    return path


def _png(path, pixels=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixels is None:
        pixels = RNG.integers(0, 255, (32, 32)).astype(np.uint8)
    Image.fromarray(pixels).save(os.fsencode(path) if isinstance(path, bytes) else path)
    return path


def test_blank_images_are_listed_failures_not_entries(tmp_path, tiny_model):
    for k in range(5):
        _png(tmp_path / "data" / f"blank{k}" / "a.png", np.zeros((32, 32), np.uint8))
    _png(tmp_path / "data" / "real" / "a.png")
    code, out, err = run_cli("index", tmp_path / "data", "--library", tmp_path / "lib.h5",
                             "--model", tiny_model)
    assert code == 1
    assert "1 image(s) added" in out and "5 failure(s)" in out
    assert err.count("blank image") == 5


def test_dedup_never_matches_blank_images(tmp_path, tiny_model):
    for k in range(5):
        _png(tmp_path / "data" / f"id{k}" / "a.png", np.full((32, 32), 255, np.uint8))
    _png(tmp_path / "data" / "real1" / "a.png")
    _png(tmp_path / "data" / "real2" / "a.png")
    code, out, err = run_cli("dedup", tmp_path / "data", "--model", tiny_model, "--out",
                             tmp_path / "report", "--threshold", "1e9", "--quiet")
    assert code == 0, err
    rows = list(csv.DictReader(open(tmp_path / "report" / "subjects.csv", encoding="utf-8")))
    assert {(r["subject_a"], r["subject_b"]) for r in rows} <= {("real1", "real2"),
                                                               ("real2", "real1")}
    assert err.count("blank image") == 5


def test_non_images_are_counted_in_the_summary(tmp_path, tiny_model):
    data = tmp_path / "export"
    data.mkdir()
    write_xray(data / "x.dcm", RNG.integers(0, 4000, (32, 32)).astype(np.uint16), patient_id="P1")
    for kind in ("SR", "KO", "PR"):
        write_non_image(data / f"{kind}.dcm", kind)
    write_dicomdir(data / "DICOMDIR")
    code, out, err = run_cli("index", data, "--library", tmp_path / "lib.h5", "--model", tiny_model)
    assert code == 0, err
    assert "1 image(s) added" in out and "4 not an image" in out and "0 failure(s)" in out


def test_nothing_found_is_said(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli("index", tmp_path / "empty", "--library", tmp_path / "lib.h5",
                             "--model", tiny_model)
    assert code == 1 and "nothing found" in err
    manifest = tmp_path / "m" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("subject_id,image_path\n")
    code, out, err = run_cli("index", manifest.parent, "--library", tmp_path / "lib.h5",
                             "--model", tiny_model)
    assert code == 1 and "nothing found" in err


def test_manifest_reaching_outside_is_noted_once(tmp_path, tiny_model):
    _png(tmp_path / "other" / "a.png")
    _png(tmp_path / "other" / "b.png")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.csv").write_text(
        "subject_id,image_path\ns1,../other/a.png\ns2,../other/b.png\n")
    code, out, err = run_cli("index", tmp_path / "m", "--library", tmp_path / "lib.h5",
                             "--model", tiny_model)
    assert code == 0 and err.count("lie outside the manifest's folder") == 1


def test_disk_full_at_the_final_flush_is_one_line_and_exit_2(tmp_path, tiny_model, monkeypatch):
    _png(tmp_path / "data" / "s1" / "a.png")

    def flush(self):
        raise RuntimeError("Unable to synchronously flush file (errno = 28)")

    monkeypatch.setattr(h5py.File, "flush", flush)
    code, out, err = run_cli("index", tmp_path / "data", "--library", tmp_path / "lib.h5",
                             "--model", tiny_model, "--json")   # --json: no progress bar
    assert code == 2
    assert err.strip().endswith("no space left on device, nothing stored, library unchanged")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _library(path, ids):
    model = SimpleNamespace(model_id="m", metadata={}, embedding_dim=4)
    recs = [ImageRecord(source=f"/x/{i}", subject_id=i, image_id=i) for i in ids]
    with EmbeddingLibrary.open(path, "a", model=model) as lib:
        lib.add(recs, [f"h{k}" for k in range(len(ids))],
                RNG.standard_normal((len(ids), 4)).astype(np.float32))


def test_library_list_csv_neutralises_formulas(tmp_path):
    _library(tmp_path / "lib.h5", ["=HYPERLINK(\"http://x\")", "+1", "@SUM(A1)", "-2", "ok"])
    code, out, err = run_cli("library", "list", tmp_path / "lib.h5", "--csv")
    assert code == 0
    subjects = [r["subject_id"] for r in csv.DictReader(io.StringIO(out))]
    assert sorted(subjects) == sorted(["'=HYPERLINK(\"http://x\")", "'+1", "'@SUM(A1)", "'-2", "ok"])


def test_broken_pipe_is_quiet(tmp_path):
    _library(tmp_path / "lib.h5", [f"subject-{k:05d}" for k in range(3000)])
    proc = subprocess.Popen([sys.executable, "-m", "subject_fingerprint", "library", "list",
                             str(tmp_path / "lib.h5")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    proc.stdout.readline()
    proc.stdout.close()          # like `| head -1`
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert err == "" and proc.returncode in (0, 141)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses non-UTF-8 file names")
def test_dedup_with_non_utf8_names_and_formula_ids(tmp_path, tiny_model):
    data = tmp_path / "data"
    pixels = RNG.integers(0, 255, (32, 32)).astype(np.uint8)
    odd = os.fsencode(data) + b"/caf\xe9/a.png"
    os.makedirs(os.path.dirname(odd))
    Image.fromarray(pixels).save(odd)
    _png(data / "=cmd|calc" / "a.png", pixels)           # the same pixels: an exact duplicate
    code, out, err = run_cli("dedup", data, "--model", tiny_model, "--out", tmp_path / "r",
                             "--threshold", "1e9", "--quiet")
    assert code == 0, err
    page = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert "caf\\xe9" in page
    text = (tmp_path / "r" / "subjects.csv").read_text(encoding="utf-8")
    assert "'=cmd|calc" in text and "caf\\xe9" in text
    assert "\n=cmd" not in text and ",=cmd" not in text


def _bad_inputs(folder: Path):
    """One folder-per-subject tree of every kind of bad input, plus one good image."""
    import gzip
    import SimpleITK as sitk

    _png(folder / "good" / "a.png")
    _png(folder / "black" / "a.png", np.zeros((32, 32), np.uint8))
    _png(folder / "one" / "a.png", np.array([[9]], np.uint8))
    nan = sitk.GetImageFromArray(np.full((4, 8, 8), np.nan, np.float32))
    (folder / "nan").mkdir()
    sitk.WriteImage(nan, str(folder / "nan" / "v.nii.gz"))
    (folder / "cut").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(RNG.normal(size=(10, 32, 32)).astype(np.float32)),
                    str(folder / "cut" / "v.nii.gz"))
    data = (folder / "cut" / "v.nii.gz").read_bytes()
    (folder / "cut" / "v.nii.gz").write_bytes(data[: len(data) // 2])
    from test_io_bad_inputs import _nifti_header

    (folder / "huge").mkdir()
    (folder / "huge" / "v.nii.gz").write_bytes(gzip.compress(_nifti_header((30000, 30000, 1))))
    (folder / "junk").mkdir()
    (folder / "junk" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = write_xray(folder / "jpeg.dcm", RNG.integers(0, 255, (32, 32)).astype(np.uint8),
                      bits=8, transfer_syntax=JPEGBaseline8Bit, patient_id="PJ")
    raw = bytearray(jpeg.read_bytes())
    start = raw.find(b"\xff\xd8")
    raw[start + 20:start + 200] = b"\x00" * 180        # a damaged JPEG fragment
    jpeg.write_bytes(bytes(raw))
    write_non_image(folder / "sr.dcm", "SR")
    return 7  # failures expected: black, one, nan, cut, huge, junk, jpeg


def test_no_bad_input_gives_a_traceback_on_stderr(tmp_path, tiny_model):
    expected = _bad_inputs(tmp_path / "data")
    done = run_sub("index", tmp_path / "data", "--library", tmp_path / "lib.h5", "--model",
                   tiny_model, "--json")
    err = done.stderr.decode()
    assert "Traceback" not in err, err
    import json

    report = json.loads(done.stdout)
    assert report["added"] == 1 and len(report["failures"]) == expected, report
    assert len(report["not_images"]) == 1
    query = run_sub("query", *sorted((tmp_path / "data").rglob("*.*")), "--library",
                    tmp_path / "lib.h5", "--model", tiny_model)
    assert "Traceback" not in query.stderr.decode(), query.stderr.decode()
    assert query.returncode == 1
    dedup = run_sub("dedup", tmp_path / "data", "--model", tiny_model, "--out", tmp_path / "r",
                    "--quiet", "--threshold", "0.5")
    assert dedup.returncode == 0 and "Traceback" not in dedup.stderr.decode(), dedup.stderr
    assert dedup.stderr.decode().count("unreadable:") == expected


def test_dependency_caches_stay_out_of_home_and_tmp(tmp_path, tiny_model):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    _png(tmp_path / "data" / "s1" / "a.png")
    _png(tmp_path / "data" / "s2" / "a.png")
    done = run_sub("dedup", tmp_path / "data", "--model", tiny_model, "--out", tmp_path / "r",
                   "--quiet", "--threshold", "0.5", HOME=str(home), TMPDIR=str(tmp),
                   MPLCONFIGDIR="", XDG_CACHE_HOME="", XDG_CONFIG_HOME="")
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "r" / "distances.png").exists()
    assert list(home.rglob("*")) == [] and list(tmp.rglob("*")) == []


def test_cache_folder_of_a_killed_run_is_removed_by_the_next(tmp_path, monkeypatch):
    from subject_fingerprint import caches

    monkeypatch.setattr(caches.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    orphan = tmp_path / f"subject-fingerprint-cache-{dead}-abc"
    (orphan / "matplotlib").mkdir(parents=True)
    foreign = tmp_path / "subject-fingerprint-cache-notapid"
    foreign.mkdir()
    env = {}
    root = caches.redirect_caches(env)
    assert not orphan.exists() and foreign.exists()
    assert Path(root).parent == tmp_path and env["MPLCONFIGDIR"].startswith(root)
