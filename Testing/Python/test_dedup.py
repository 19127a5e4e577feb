"""``subject-fingerprint dedup`` on realistic planted exports, the report files, escaping, and
the HTML page in a real headless Chromium."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_factory import write_xray
from subject_fingerprint.checkpoint import FingerprintModel, save_checkpoint
from subject_fingerprint.dedup import engine
from subject_fingerprint.embed import Embedder
from subject_fingerprint.preprocess import Preprocessing
from subject_fingerprint.records import ImageRecord, LoadedImage
from runners import run_cli

EVIL = "<script>alert(1)</script>&\"'"


def sample_images(sample_data):
    """{subject: [8-bit arrays]} from the committed ChestX-ray14 sample."""
    folder = sample_data / "cxr"
    images = {}
    with open(folder / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            pixels = np.asarray(Image.open(folder / row["image_path"]).convert("L"))
            images.setdefault(row["subject_id"], []).append(pixels)
    return images


def noisy(pixels, seed):
    """A re-acquired copy: small noise, so the pixels (and hash) differ but the content not."""
    rng = np.random.default_rng(seed)
    return np.clip(pixels.astype(float) + rng.normal(0, 2, pixels.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, sample_data):
    """Two PACS-like exports with a known answer.

    site-a: 8 patients, MONOCHROME2, 12 bits stored, 0.2 mm pixels.
    site-b: 3 of those patients again under other pseudonyms (noisy re-exports, MONOCHROME1,
    8 bits, 0.15 mm), 3 patients of its own, an exact copy of one image filed under a second
    patient ID, a patient ID with markup in it, and a file that is not an image.
    """
    root = tmp_path_factory.mktemp("planted")
    images = sample_images(sample_data)
    subjects = sorted(images)
    assert len(subjects) >= 12
    a_subjects, shared, b_only = subjects[:8], subjects[:3], subjects[8:11]

    def export(site, folder, pid, pixels_list, **kw):
        for k, pixels in enumerate(pixels_list):
            path = root / site / folder / f"study{k % 2}" / f"series{k}" / f"IM{k:04d}"
            write_xray(path, pixels, patient_id=pid, **kw)

    for n, s in enumerate(a_subjects):
        export("site-a", f"A{n:03d}", f"A{n:03d}", [p.astype(np.uint16) * 16 for p in images[s]],
               bits=12)
    # The first shared patient's pseudonym in site-b carries markup: it must be escaped.
    b_ids = [EVIL] + [f"B{n:03d}" for n in range(1, len(shared))]
    for n, s in enumerate(shared):
        export("site-b", f"B{n:03d}", b_ids[n], [255 - noisy(p, n) for p in images[s]],
               photometric="MONOCHROME1", bits=8, pixel_spacing=(0.15, 0.15))
    for n, s in enumerate(b_only):
        export("site-b", f"X{n:03d}", f"B{100 + n:03d}", images[s][:2], bits=8)
    # An exact copy of a site-b image under another patient ID (same pixels, new UIDs).
    import pydicom
    from pydicom.uid import generate_uid

    source = sorted((root / "site-b" / "X001").rglob("IM*"))[0]  # patient B101
    ds = pydicom.dcmread(source)
    ds.PatientID = "B-COPY"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    (root / "site-b" / "copy" / "s").mkdir(parents=True)
    ds.save_as(root / "site-b" / "copy" / "s" / "IM0000")
    (root / "site-b" / "junk").write_bytes(b"\x00" * 300)  # unreadable: reported, skipped

    answer = {
        "shared": {(f"A{n:03d}", b_ids[n]) for n in range(len(shared))},
        "within_b": {frozenset(("B101", "B-COPY"))},
    }
    return root, answer, images


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory, planted):
    """A tiny model calibrated on re-exports of *other* images than the planted ones."""
    from fingerprint_training.calibration_fit import fit_calibration

    _, _, images = planted
    model = FingerprintModel.create(2, depth=18, embedding_dim=32,
                                    preprocessing=Preprocessing(spatial_dims=2, size=(48, 48)),
                                    modalities=["DX"])
    originals = [p for s in sorted(images)[-4:] for p in images[s]]
    copies = [noisy(p, 100 + k) for k, p in enumerate(originals)]

    def embed(arrays):
        loaded = [LoadedImage(a.astype(np.float32), (1.0, 1.0), ImageRecord(f"m{k}", "s", f"m{k}"))
                  for k, a in enumerate(arrays)]
        return Embedder(model, device="cpu", progress=False).embed_loaded(loaded)

    e1, e2 = embed(originals), embed(copies)
    pos = np.linalg.norm(e1 - e2, axis=1)
    d = np.linalg.norm(e1[:, None] - e1[None], axis=-1)
    neg = d[np.triu_indices(len(e1), 1)]
    model.calibration = fit_calibration(pos, neg, target_fpr=0.01)
    path = tmp_path_factory.mktemp("model") / "calibrated.pt"
    save_checkpoint(model, path)
    return path


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def report(tmp_path_factory, planted, calibrated_model):
    root, _, _ = planted
    out = tmp_path_factory.mktemp("report")
    libs = tmp_path_factory.mktemp("libs")
    code, stdout, stderr = run_cli("dedup", root / "site-a", f"b={root / 'site-b'}",
                                   "--model", calibrated_model, "--out", out,
                                   "--save-libraries", libs, "--quiet", "--fail-on-overlap",
                                   "--max-false-pairs", "1")
    return code, stdout, stderr, out, libs


def test_finds_planted_shared_subjects_and_duplicates(report, planted):
    code, stdout, stderr, out, _ = report
    _, answer, _ = planted
    assert code == 1, stderr  # --fail-on-overlap and overlaps exist
    rows = read_csv(out / "subjects.csv")
    assert list(rows[0])[:7] == ["dataset_a", "subject_a", "dataset_b", "subject_b",
                                 "probability", "min_distance", "n_close_pairs"]
    across = {(r["subject_a"], r["subject_b"]) if r["dataset_a"] == "site-a"
              else (r["subject_b"], r["subject_a"])
              for r in rows if r["dataset_a"] != r["dataset_b"]}
    within = {frozenset((r["subject_a"], r["subject_b"])) for r in rows
              if r["dataset_a"] == r["dataset_b"]}
    assert answer["shared"] <= across
    assert answer["within_b"] <= within
    # Most probable first; probabilities are posteriors, with their likelihood ratios.
    probabilities = [float(r["probability"]) for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0 <= p <= 1 for p in probabilities)
    assert all(float(r["likelihood_ratio"]) > 0 for r in rows)

    # The expected false pairs the run states respect the level asked for, and the false
    # pairs observed stay near them.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["expected_false_pairs"] <= 1 + 1e-9
    planted_keys = answer["shared"] | {tuple(sorted(k)) for k in answer["within_b"]}
    false = [r for r in rows if (r["subject_a"], r["subject_b"]) not in planted_keys
             and (r["subject_b"], r["subject_a"]) not in planted_keys]
    assert len(false) <= 2 * summary["expected_false_pairs"] + 2, false

    images = read_csv(out / "images.csv")
    assert list(images[0])[:6] == ["dataset_a", "image_a", "dataset_b", "image_b", "distance",
                                   "exact_duplicate"]
    exact = [r for r in images if r["exact_duplicate"] == "True"]
    assert len(exact) == 1 and float(exact[0]["distance"]) == 0


def test_summary_lists_unreadable_files_and_counts(report, planted):
    _, _, stderr, out, _ = report
    summary = json.loads((out / "summary.json").read_text())
    assert [d["name"] for d in summary["datasets"]] == ["site-a", "b"]
    assert summary["suspected_shared_subjects"] >= 3
    assert summary["exact_duplicate_pairs"] == 1
    assert summary["decision_rule"] == "max-false-pairs"
    assert summary["calibration"]["source"] in ("data", "data+model")
    assert summary["self_check"]["auc"] is not None
    assert [Path(f["path"]).name for f in summary["unreadable_files"]] == ["junk"]
    assert "junk" in stderr
    assert (out / "distances.png").stat().st_size > 1000


def test_saved_libraries_are_reused_without_re_embedding(report, planted, calibrated_model,
                                                          tmp_path):
    _, _, _, out, libs = report
    assert sorted(p.name for p in libs.glob("*.h5")) == ["b.h5", "site-a.h5"]
    code, stdout, stderr = run_cli("dedup", libs / "site-a.h5", libs / "b.h5",
                                   "--model", calibrated_model, "--out", tmp_path / "again",
                                   "--quiet", "--max-false-pairs", "1")
    assert code == 0, stderr
    first = read_csv(out / "subjects.csv")
    again = read_csv(tmp_path / "again" / "subjects.csv")
    key = lambda r: (r["subject_a"], r["subject_b"], round(float(r["min_distance"]), 4))
    assert sorted(map(key, first)) == sorted(map(key, again))

    # A library made by another model is refused, not compared.
    other = tmp_path / "other.pt"
    save_checkpoint(FingerprintModel.create(2, depth=18, embedding_dim=32,
                                            preprocessing=Preprocessing(spatial_dims=2, size=(48, 48))),
                    other)
    code, _, stderr = run_cli("dedup", libs / "b.h5", "--model", other, "--out", tmp_path / "x",
                              "--threshold", "1", "--quiet")
    assert code == 2 and "model" in stderr


def test_uncalibrated_model_calibrates_on_the_data_or_needs_a_threshold(planted, tmp_path):
    root, _, _ = planted
    model = tmp_path / "raw.pt"
    save_checkpoint(FingerprintModel.create(2, depth=18, embedding_dim=16,
                                            preprocessing=Preprocessing(spatial_dims=2, size=(32, 32))),
                    model)
    # One image: no same-ID subject to calibrate on, and no stored calibration.
    code, _, stderr = run_cli("dedup", root / "site-b" / "copy", "--model", model,
                              "--out", tmp_path / "r", "--quiet")
    assert code == 2 and "--threshold" in stderr
    # Eight subjects with several images each: the data calibrate the model.
    code, _, stderr = run_cli("dedup", root / "site-a", "--model", model, "--out", tmp_path / "s",
                              "--quiet")
    assert code == 0, stderr
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["calibration"]["source"] == "data"


def test_every_name_is_escaped(report):
    _, _, _, out, _ = report
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the pair's caption
    assert "\\u003cscript\\u003ealert(1)" in page  # the sortable table's JSON data
    assert "http://" not in page and "https://" not in page  # nothing to fetch


def test_close_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(250, 8)).astype(np.float32)
    d = np.linalg.norm(x[:, None] - y[None], axis=-1)
    threshold = np.quantile(d, 0.01)
    ii, jj, dd = engine.close_pairs(x, y, threshold, block=64)
    want = set(zip(*np.nonzero(d <= threshold)))
    assert set(zip(ii.tolist(), jj.tolist())) == want
    assert np.allclose(dd, d[ii, jj])
    ii, jj, _ = engine.close_pairs(x, x, threshold, same=True, block=64)
    dx = np.linalg.norm(x[:, None] - x[None], axis=-1)
    assert set(zip(ii.tolist(), jj.tolist())) == {(i, j) for i, j in zip(*np.nonzero(dx <= threshold))
                                                  if i < j}

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_report_in_headless_chromium(report, tmp_path):
    _, _, _, out, _ = report
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (out / "index.html").resolve().as_uri()
    dom = subprocess.run(flags + ["--virtual-time-budget=3000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    n_pairs = len(read_csv(out / "subjects.csv"))
    # The sortable table is built by the page's own script: rows exist only if it ran.
    assert dom.count('class="pair-row"') == n_pairs > 0
    assert "Shared subjects report" in dom
    assert "Shared subjects across datasets" in dom and "Exact duplicate images" in dom
    # The pair whose ID holds markup is shown as text, never run or parsed as markup.
    assert "<script>alert(1)" not in dom and "&lt;script&gt;alert(1)" in dom
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10000
