"""Build the small sample data committed under Resources/SampleData/ from ../shared/data.

- ``cxr/``: 40 chest X-rays (64x64 PNG, copied byte for byte) of 12 ChestX-ray14 patients
  with 2 or more images each, all from the *train* split of
  Resources/Splits/cxr14-subset-64px-seed42.json, with a ``manifest.csv`` in the shared
  data's format. Train-split patients keep this folder apart from the demo exports
  (``make_demo_exports.py``), which are built from the test split: the two never share a
  patient, and the sample can stand in for training data in quick tests.
- ``mri/``: 3 brain MRI subjects, FLAIR and T1CE each, resampled to about 5 mm voxels
  (around 48^3) with anti-aliasing, float32 ``.nii.gz``, with a ``manifest.csv``. Each
  volume keeps its orientation (direction), its physical extent and centre, so the two
  modalities of a subject stay aligned and the native-geometry TCGA case stays oblique-free
  L-A-S with thick slices, as in the original.

    python Resources/SampleData/make_sample_data.py [--shared ../shared/data]

Deterministic: the same shared data gives the same selection and the same voxels.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SPLIT = REPO / "Resources" / "Splits" / "cxr14-subset-64px-seed42.json"

CXR_SUBJECTS = 12
CXR_IMAGES = 40
MRI_SUBJECTS = ("BraTS2015_brats_2013_pat0001_1", "BraTS2023-GLI-00001-000", "TCGA-FG-6692")
MRI_MODALITIES = ("MR-FLAIR", "MR-T1CE")
MRI_SPACING_MM = 5.0
COLUMNS = ["subject_id", "image_path", "modality", "view", "study_date_or_offset", "source_file"]


def _read_manifest(path: Path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_manifest(path: Path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


def make_cxr(shared: Path, out: Path):
    """Copy 40 images of 12 train-split subjects (2 to 6 images each)."""
    src = shared / "cxr14-subset-64px"
    rows = _read_manifest(src / "manifest.csv")
    train_subjects = set(json.loads(SPLIT.read_text())["train"])
    by_subject = defaultdict(list)
    for row in rows:
        if row["subject_id"] in train_subjects:
            by_subject[row["subject_id"]].append(row)
    candidates = sorted(s for s, r in by_subject.items() if len(r) >= 2)
    rng = np.random.default_rng(2026)
    chosen = sorted(rng.choice(candidates, size=CXR_SUBJECTS, replace=False).tolist())
    # Two images each first, then add more round-robin (up to 6 each) until 40.
    picked = {s: sorted(by_subject[s], key=lambda r: r["image_path"])[:2] for s in chosen}
    while sum(len(v) for v in picked.values()) < CXR_IMAGES:
        grew = False
        for s in chosen:
            rest = sorted(by_subject[s], key=lambda r: r["image_path"])
            if len(picked[s]) < min(6, len(rest)) and sum(len(v) for v in picked.values()) < CXR_IMAGES:
                picked[s].append(rest[len(picked[s])])
                grew = True
        if not grew:
            break
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    manifest = []
    for s in chosen:
        for row in picked[s]:
            name = Path(row["image_path"]).name
            shutil.copyfile(src / row["image_path"], out / "images" / name)
            manifest.append({**row, "image_path": f"images/{name}"})
    _write_manifest(out / "manifest.csv", manifest)
    return len(manifest), len(chosen)


def _downsample(image, spacing_mm: float):
    """Resample to ~spacing_mm voxels over the same physical extent, same direction/centre."""
    import SimpleITK as sitk

    image = sitk.Cast(image, sitk.sitkFloat32)
    old_size = np.array(image.GetSize(), float)
    old_spacing = np.array(image.GetSpacing(), float)
    extent = old_size * old_spacing
    new_size = np.maximum(1, np.round(extent / spacing_mm)).astype(int)
    new_spacing = extent / new_size
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # Voxel centres move: keep the corner of the field of view where it was.
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2)
    # Gaussian anti-aliasing before subsampling (sigma in mm, only along shrunk axes).
    sigma = [float(0.5 * n) if n > o * 1.01 else 0.0 for n, o in zip(new_spacing, old_spacing)]
    smooth = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigma]) \
        if any(sigma) else image
    return sitk.Resample(smooth, [int(v) for v in new_size], sitk.Transform(), sitk.sitkLinear,
                         [float(v) for v in origin], [float(v) for v in new_spacing],
                         [float(v) for v in direction.ravel()], 0.0, sitk.sitkFloat32)


def make_mri(shared: Path, out: Path):
    import SimpleITK as sitk

    src = shared / "brain-mri-mini"
    rows = _read_manifest(src / "manifest.csv")
    if out.exists():
        shutil.rmtree(out)
    manifest = []
    for row in rows:
        if row["subject_id"] not in MRI_SUBJECTS or row["modality"] not in MRI_MODALITIES:
            continue
        small = _downsample(sitk.ReadImage(str(src / row["image_path"])), MRI_SPACING_MM)
        rel = f"{row['subject_id']}/{row['subject_id']}_{row['modality']}.nii.gz"
        (out / row["subject_id"]).mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(small, str(out / rel), useCompression=True)
        manifest.append({**row, "image_path": rel,
                         "source_file": f"downsampled to ~{MRI_SPACING_MM:g} mm from "
                                        f"brain-mri-mini/{row['image_path']} ({row['source_file']})"})
    _write_manifest(out / "manifest.csv", manifest)
    return len(manifest), len({r["subject_id"] for r in manifest})


def main(argv=None) -> int:
    default = os.environ.get("SUBJECT_FINGERPRINT_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=default, help="the shared data folder (default: %(default)s)")
    args = parser.parse_args(argv)
    shared = Path(args.shared)
    images, subjects = make_cxr(shared, HERE / "cxr")
    print(f"cxr: {images} images of {subjects} subjects")
    volumes, subjects = make_mri(shared, HERE / "mri")
    print(f"mri: {volumes} volumes of {subjects} subjects")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
