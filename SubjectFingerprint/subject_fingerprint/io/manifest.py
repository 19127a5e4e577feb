"""Manifest CSV files: ``subject_id,image_path[,modality,view,...]``.

Paths in a manifest are relative to the manifest's own folder (absolute paths are kept as
they are). Extra columns are ignored, so the manifests of ``../shared/data`` (which add
``study_date_or_offset`` and ``source_file``) are read as they are.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath
from typing import List, Tuple

from ..errors import Failure, FingerprintError
from ..records import ImageRecord

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("subject_id", "image_path")


class ManifestError(FingerprintError, ValueError):
    """A manifest file is missing, unreadable or lacks the required columns."""


def read_manifest(path, dataset: str = "") -> Tuple[List[ImageRecord], List[Failure]]:
    """Return the records a manifest lists and the rows that could not be used.

    A row whose image file does not exist becomes a :class:`Failure`; a manifest without the
    ``subject_id`` and ``image_path`` columns raises :class:`ManifestError`.
    """
    path = Path(path)
    root = path.parent
    try:
        # utf-8-sig: spreadsheets often write a byte-order mark before the header.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from exc
    missing = [col for col in REQUIRED_COLUMNS if col not in header]
    if missing:
        raise ManifestError(
            f"{path}: manifest lacks column(s) {', '.join(missing)} "
            f"(expected subject_id,image_path[,modality,view]; found {', '.join(header) or 'nothing'})")

    records: List[ImageRecord] = []
    failures: List[Failure] = []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        subject, image_path = row.get("subject_id", ""), row.get("image_path", "")
        if not subject or not image_path:
            failures.append(Failure(f"{path}:{line}", "row without subject_id or image_path"))
            continue
        # Manifests written on Windows may use backslashes.
        rel = image_path.replace("\\", "/")
        full = Path(rel) if Path(rel).is_absolute() else root / rel
        if not full.exists():
            failures.append(Failure(str(full), f"listed in {path.name} line {line} but not found"))
            continue
        files = (str(full),)
        if full.is_dir():
            # A DICOM series folder listed as one image: its slices are sorted on load.
            from .dicom import series_files_in_folder

            try:
                files = tuple(series_files_in_folder(full))
            except Exception as exc:  # noqa: BLE001 - becomes a per-row failure
                failures.append(Failure.from_exception(full, exc))
                continue
        records.append(ImageRecord(
            source=str(full),
            subject_id=subject,
            image_id=str(PurePosixPath(rel)),
            modality=row.get("modality", ""),
            view=row.get("view", ""),
            dataset=dataset,
            files=files,
        ))
    return records, failures
