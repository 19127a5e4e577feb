"""Discovery: manifests, folder-per-subject layouts, PACS-like DICOM trees, duplicates."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_factory import write_dicomdir, write_mr_series, write_non_image, write_xray
from subject_fingerprint.errors import ImageReadError
from subject_fingerprint.io import ManifestError, discover, load_image, read_image
from subject_fingerprint.records import modality_family

RNG = np.random.default_rng(5)


def _png(path, seed, shape=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)).save(path)
    return path


def _pacs_tree(root):
    """Nested export: two X-rays of P1, an MR series of P2 split over two folders, non-images."""
    xa = write_xray(root / "P1" / "ST1" / "SE1" / "IM0001", RNG.integers(0, 4096, (16, 16)),
                    patient_id="P1", bits=12, view="PA")
    xb = write_xray(root / "P1" / "ST2" / "SE1" / "IM0001", RNG.integers(0, 4096, (16, 16)),
                    patient_id="P1", bits=12, modality="CR", view="AP")
    vol = RNG.integers(0, 1000, size=(6, 8, 8)).astype(np.int16)
    files = write_mr_series(root / "P2" / "ST1" / "SE2", vol, patient_id="P2", spacing=(3, 1, 1))
    # A PACS may spread one series over folders: move half the slices elsewhere.
    (root / "P2" / "ST1" / "SE2b").mkdir()
    moved = []
    for f in files:
        if int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) % 2:
            target = root / "P2" / "ST1" / "SE2b" / f.name
            shutil.move(f, target)
            moved.append(target)
        else:
            moved.append(f)
    write_non_image(root / "P1" / "ST1" / "SR1" / "IM0001", "SR", patient_id="P1")
    write_non_image(root / "P1" / "ST1" / "PR1" / "IM0001", "PR", patient_id="P1")
    write_non_image(root / "P2" / "KO", "KO", patient_id="P2")
    write_dicomdir(root / "DICOMDIR")
    (root / "README.TXT").write_text("exported by PACS\n")
    (root / "P2" / "garbage").write_bytes(b"\x00\x01 not dicom" * 20)
    return xa, xb, vol, moved


def test_pacs_tree_is_sorted_out(tmp_path):
    xa, xb, vol, slices = _pacs_tree(tmp_path)
    found = discover([tmp_path], dataset="site")
    by_subject = {}
    for r in found.records:
        by_subject.setdefault(r.subject_id, []).append(r)
    assert sorted(by_subject) == ["P1", "P2"]
    xrays = by_subject["P1"]
    assert sorted(r.image_id for r in xrays) == sorted(
        str(pydicom.dcmread(p).SOPInstanceUID) for p in (xa, xb))
    assert {r.modality for r in xrays} == {"DX", "CR"} and {r.view for r in xrays} == {"PA", "AP"}
    (mr,) = by_subject["P2"]
    assert mr.image_id == str(pydicom.dcmread(slices[0]).SeriesInstanceUID)
    assert mr.modality == "MR" and len(mr.files) == 6 and all(r.dataset == "site" for r in found)
    np.testing.assert_array_equal(load_image(mr).array, vol)
    # Non-images are listed as skipped, not failures; only the garbage file failed.
    skipped = " ".join(s.reason for s in found.skipped)
    for word in ("DICOMDIR", "SR", "Presentation State", "Key Object"):
        assert word in skipped
    assert [f.path for f in found.failures] == [str(tmp_path / "P2" / "garbage")]
    assert "not a DICOM file" in found.failures[0].reason


def test_folder_per_subject(tmp_path):
    _png(tmp_path / "subjA" / "a1.png", 1)
    _png(tmp_path / "subjA" / "follow" / "a2.png", 2)
    _png(tmp_path / "subjB" / "b1.jpg", 3)
    _png(tmp_path / "loose.png", 4)
    (tmp_path / "subjB" / "notes.txt").write_text("ignored")
    found = discover(str(tmp_path))
    ids = {(r.subject_id, r.image_id) for r in found.records}
    assert ids == {("subjA", "subjA/a1.png"), ("subjA", "subjA/follow/a2.png"),
                   ("subjB", "subjB/b1.jpg"), ("loose", "loose.png")}
    assert all(r.modality == "XR" and modality_family(r.modality) == "xray" for r in found.records)
    assert not found.failures


def test_manifest_relative_paths_extra_columns_and_missing_rows(tmp_path):
    _png(tmp_path / "imgs" / "x1.png", 1)
    _png(tmp_path / "imgs" / "x2.png", 2)
    (tmp_path / "manifest.csv").write_text(
        "subject_id,image_path,modality,view,notes\n"
        "s1,imgs/x1.png,CXR,PA,first\n"
        "s2,imgs/x2.png,,,\n"
        "s3,imgs/missing.png,CXR,AP,gone\n")
    for found in (discover([tmp_path]), discover([], manifest=tmp_path / "manifest.csv")):
        assert [(r.subject_id, r.image_id, r.modality, r.view) for r in found.records] == [
            ("s1", "imgs/x1.png", "CXR", "PA"), ("s2", "imgs/x2.png", "XR", "")]
        assert len(found.failures) == 1 and "missing.png" in found.failures[0].path
    img = load_image(discover([tmp_path]).records[0])
    assert img.array.shape == (16, 16)


def test_manifest_without_required_columns_is_refused(tmp_path):
    (tmp_path / "list.csv").write_text("patient,file\nA,a.png\n")
    with pytest.raises(ManifestError, match="subject_id"):
        discover([], manifest=tmp_path / "list.csv")


def test_exact_duplicates_share_a_hash(tmp_path):
    pixels = np.random.default_rng(9).integers(0, 256, (24, 24)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "copy.png")
    write_xray(tmp_path / "a.dcm", pixels, bits=8, window=None)
    other = pixels.copy()
    other[0, 0] ^= 1
    Image.fromarray(other).save(tmp_path / "b.png")
    hashes = {name: read_image(tmp_path / name).content_hash for name in
              ("a.png", "copy.png", "a.dcm", "b.png")}
    assert hashes["a.png"] == hashes["copy.png"] == hashes["a.dcm"]
    assert hashes["b.png"] != hashes["a.png"]


def test_walk_survives_bad_files(tmp_path):
    _png(tmp_path / "s1" / "ok.png", 1)
    (tmp_path / "s1" / "IM0001").write_bytes(b"")          # empty, no extension
    (tmp_path / "s1" / "IM0002").write_bytes(b"\xff" * 300)
    found = discover([tmp_path, tmp_path / "nowhere"])
    assert [r.image_id for r in found.records] == ["s1/ok.png"]
    reasons = sorted(f.reason for f in found.failures)
    assert reasons == sorted(["empty file", "not a DICOM file (no DICM preamble) and not a known "
                              "image format", "not found"])


def test_read_image_on_a_folder_of_many_images_is_refused(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.png", 2)
    with pytest.raises(ImageReadError, match="2 images"):
        read_image(tmp_path)


def test_shared_cxr14_manifest(shared_data):
    found = discover([shared_data / "cxr14-subset-64px"], dataset="cxr14")
    assert len(found.records) == 1000 and not found.failures
    assert len({r.subject_id for r in found.records}) == 264
    assert {r.view for r in found.records} == {"PA", "AP"}
    img = load_image(found.records[0])
    assert img.array.shape == (64, 64) and img.record.dataset == "cxr14"


def test_shared_brain_mri_volume_in_lps(shared_data):
    nib = pytest.importorskip("nibabel")

    found = discover([shared_data / "brain-mri-mini"])
    assert len(found.records) == 28 and len({r.subject_id for r in found.records}) == 10
    # The native-geometry TCGA case is stored L-A-S (y flipped against LPS), thick slices.
    record = next(r for r in found.records if "6692" in r.subject_id)
    img = load_image(record)
    assert img.spatial_dims == 3 and img.array.dtype == np.float32
    # Independent reference: nibabel's closest RAS orientation, flipped to LPS, as (z, y, x).
    ras = nib.as_closest_canonical(nib.load(record.source))
    expected = np.asarray(ras.dataobj, dtype=np.float32).transpose(2, 1, 0)[:, ::-1, ::-1]
    np.testing.assert_allclose(img.array, expected)
    assert img.spacing == pytest.approx(tuple(float(z) for z in ras.header.get_zooms()[::-1]), rel=1e-4)
    assert max(img.spacing) > 3.0 > min(img.spacing)   # about 0.9 x 0.9 x 5.5 mm


def test_dataset_defaults_to_the_source_folder_name(tmp_path):
    _png(tmp_path / "site-a" / "s1" / "a.png", 1)
    lone = _png(tmp_path / "loose" / "x.png", 2)
    found = discover([tmp_path / "site-a", lone])
    assert [(r.dataset, r.subject_id, r.image_id) for r in found.records] == [
        ("site-a", "s1", "s1/a.png"), ("loose", "x", "x.png")]
    assert {r.dataset for r in discover([tmp_path / "site-a"], dataset="given").records} == {"given"}


def test_read_image_on_a_folder_of_two_series_lists_them(tmp_path):
    vol = RNG.integers(0, 1000, size=(3, 8, 8)).astype(np.int16)
    write_mr_series(tmp_path / "a", vol, series_uid="1.2.3.1")
    write_mr_series(tmp_path / "b", vol, series_uid="1.2.3.2", names="B{:04d}")
    with pytest.raises(ImageReadError, match=r"2 DICOM series: 1\.2\.3\.1 .*1\.2\.3\.2"):
        read_image(tmp_path)
    assert read_image(tmp_path / "a").array.shape == (3, 8, 8)
