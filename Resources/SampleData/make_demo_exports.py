"""Build the two demo "PACS exports" under Resources/SampleData/exports/ from ChestX-ray14.

site-a and site-b are DICOM trees as a PACS would export them (nested folders, files without
extensions, pseudonymous PatientIDs). Some patients are in both under different pseudonyms,
which is what ``subject-fingerprint dedup`` should find. All patients come from the *test*
split of Resources/Splits/cxr14-subset-64px-seed42.json, so the starter model never saw them.

    python Resources/SampleData/make_demo_exports.py [--data ../shared/data/cxr14-subset-64px]

The answer key is written to exports/planted.json (it is not read by the tool).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
UID_ROOT = "1.2.826.0.1.3680043.10.1453."  # a private root; UIDs are derived, so reruns match


def uid(*parts) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts])


def write_xray(path: Path, pixels: np.ndarray, patient_id: str, study: str, index: int,
               monochrome1: bool) -> None:
    """One DX image as a PACS exports it; MONOCHROME1 stores inverted grey values."""
    stored = pixels.astype(np.uint16) * 16  # 12-bit range, as detectors deliver
    if monochrome1:
        stored = 4095 - stored
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid(patient_id, study, index)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(patient_id, study)
    ds.SeriesInstanceUID = uid(patient_id, study, "series")
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [2.8, 2.8]  # 64 px over a ~18 cm field
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def pseudonym(site: str, subject: str) -> str:
    return f"{site.upper()}-{hashlib.sha256((site + subject).encode()).hexdigest()[:8]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/cxr14-subset-64px"))
    parser.add_argument("--split", default=str(REPO / "Resources/Splits/cxr14-subset-64px-seed42.json"))
    parser.add_argument("--out", default=str(HERE / "exports"))
    args = parser.parse_args()

    data = Path(args.data)
    test = set(json.loads(Path(args.split).read_text())["test"])
    images = defaultdict(list)
    with open(data / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["subject_id"] in test:
                images[row["subject_id"]].append(row["image_path"])
    rng = random.Random(7)
    multi = sorted(s for s, v in images.items() if len(v) >= 2)
    single = sorted(s for s, v in images.items() if len(v) == 1)
    rng.shuffle(multi)
    rng.shuffle(single)
    shared, only_a, only_b = multi[:5], multi[5:11] + single[:3], multi[11:14] + single[3:7]

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    key = {"shared_subjects": [], "exact_copies": []}

    def export(site, subject, paths, monochrome1):
        pid = pseudonym(site, subject)
        study = f"{site}-{subject}"
        for i, rel in enumerate(paths[:3]):
            pixels = np.asarray(Image.open(data / rel).convert("L"))
            folder = out / f"site-{site}" / pid / uid(pid, study)[-8:] / f"S{i:04d}"
            write_xray(folder / f"IM{i:05d}", pixels, pid, study, i, monochrome1)
        return pid

    for subject in shared:
        half = len(images[subject]) // 2
        a = export("a", subject, images[subject][:half], monochrome1=False)
        b = export("b", subject, images[subject][half:], monochrome1=True)
        key["shared_subjects"].append({"nih_subject": subject, "site-a": a, "site-b": b})
    for subject in only_a:
        export("a", subject, images[subject], monochrome1=False)
    for subject in only_b:
        export("b", subject, images[subject], monochrome1=True)

    # An exact copy filed under a second patient in site-b (a re-registered patient).
    src = next((out / "site-b").rglob("IM00000"))
    copy = out / "site-b" / "B-copy0001" / "study" / "S0000" / "IM00000"
    copy.parent.mkdir(parents=True)
    import pydicom

    ds = pydicom.dcmread(src)
    ds.PatientID = ds.PatientName = "B-copy0001"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("copy", src)
    ds.save_as(copy, enforce_file_format=True)
    key["exact_copies"].append({"site-b": [src.relative_to(out).as_posix(),
                                           copy.relative_to(out).as_posix()]})
    (out / "planted.json").write_text(json.dumps(key, indent=2) + "\n")
    n = sum(1 for p in out.rglob("IM*"))
    print(f"wrote {n} DICOM files under {out}")


if __name__ == "__main__":
    main()
