"""The sample data committed under Resources/SampleData reads everywhere (no shared data)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from subject_fingerprint.io import discover, load_image
from subject_fingerprint.records import modality_family


def test_sample_cxr(sample_data):
    found = discover([sample_data / "cxr"], dataset="sample")
    assert not found.failures and len(found.records) == 40
    counts = {}
    for r in found.records:
        counts[r.subject_id] = counts.get(r.subject_id, 0) + 1
    assert len(counts) == 12 and min(counts.values()) >= 2
    assert {modality_family(r.modality) for r in found.records} == {"xray"}
    img = load_image(found.records[0])
    assert img.array.shape == (64, 64) and img.array.max() > img.array.min()


def test_sample_cxr_patients_are_train_split_and_apart_from_the_exports(sample_data, repo_root):
    import json

    split = json.loads((repo_root / "Resources" / "Splits" / "cxr14-subset-64px-seed42.json").read_text())
    with open(sample_data / "cxr" / "manifest.csv", newline="") as handle:
        subjects = {row["subject_id"] for row in csv.DictReader(handle)}
    assert subjects and subjects <= set(split["train"])
    planted = sample_data / "exports" / "planted.json"
    if planted.is_file():
        shared = {s["nih_subject"] for s in json.loads(planted.read_text())["shared_subjects"]}
        assert not subjects & shared


def test_sample_mri(sample_data):
    found = discover([sample_data / "mri"])
    assert not found.failures and len(found.records) == 6
    assert len({r.subject_id for r in found.records}) == 3
    for r in found.records:
        img = load_image(r)
        assert img.spatial_dims == 3 and all(16 <= n <= 64 for n in img.array.shape)
        assert np.isfinite(img.array).all() and img.array.std() > 0


def test_sample_total_size_and_notice(sample_data):
    total = sum(p.stat().st_size for p in sample_data.rglob("*") if p.is_file())
    assert total <= 5 * 1024 * 1024, f"sample data is {total / 2**20:.1f} MB, over 5 MB"
    notice = (sample_data / "NOTICE.md").read_text()
    for needed in ("Wang", "NIH Clinical Center", "Menze", "CC BY-NC-SA 3.0 CH", "TCIA"):
        assert needed in notice
    with open(sample_data / "cxr" / "manifest.csv", newline="") as handle:
        assert csv.DictReader(handle).fieldnames[:2] == ["subject_id", "image_path"]


def test_demo_exports_are_dicom_trees(sample_data):
    exports = sample_data / "exports"
    if not exports.is_dir():
        pytest.skip("no demo exports in Resources/SampleData")
    found = discover([exports / "site-a", exports / "site-b"])
    assert found.records and not found.failures
    assert all(r.modality == "DX" for r in found.records)
    # The planted exact copy: two files, one content hash.
    import json

    pairs = json.loads((exports / "planted.json").read_text())["exact_copies"]
    for pair in pairs:
        for paths in pair.values():
            hashes = {load_image(next(r for r in found.records
                                      if r.source == str(exports / p))).content_hash for p in paths}
            assert len(hashes) == 1
