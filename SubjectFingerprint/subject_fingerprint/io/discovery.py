"""Finding images and their identity: manifests, folder-per-subject layouts, DICOM trees.

``discover`` never stops on a bad file: what cannot be read becomes a :class:`Failure`, and
DICOM objects that are not images (SR, KO, presentation states, DICOMDIR) are listed in
``Discovery.skipped`` without counting as failures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Optional, Tuple, Union

from ..errors import Failure, ImageReadError
from ..records import ImageRecord
from .dicom import VOLUME_MODALITIES, DicomHeader, header_info, split_series
from .manifest import MANIFEST_NAME, read_manifest
from .raster import is_raster_file
from .volumes import is_volume_file

# Files that sit beside images in exports and datasets and are never images themselves.
_IGNORED_SUFFIXES = (
    ".txt", ".csv", ".tsv", ".json", ".md", ".html", ".htm", ".xml", ".pdf", ".py", ".log",
    ".ini", ".cfg", ".yaml", ".yml", ".zip", ".gz.md5", ".md5", ".sha256", ".db", ".exe",
    ".inf", ".img", ".raw", ".zraw", ".bat", ".sh", ".h5", ".pt", ".pth", ".pkl", ".npy", ".npz",
)
_IGNORED_NAMES = {"thumbs.db", "desktop.ini", "license", "readme", "autorun.inf", "version"}

Source = Union[str, os.PathLike]


@dataclass
class Discovery:
    """What :func:`discover` found: images to read, files that failed, objects skipped."""

    records: List[ImageRecord] = field(default_factory=list)
    failures: List[Failure] = field(default_factory=list)
    skipped: List[Failure] = field(default_factory=list)
    # Things a data manager should know that are not failures (a manifest reaching outside).
    notices: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    @property
    def subjects(self) -> List[str]:
        """Distinct subject IDs, in order of first appearance."""
        return list(dict.fromkeys(r.subject_id for r in self.records))


def guess_modality(path) -> str:
    """Modality for a non-DICOM file without a manifest: "XR" for 2D raster images, else ""."""
    return "XR" if is_raster_file(path) else ""


def _ignored(name: str) -> bool:
    low = name.lower()
    return (name.startswith(".") or low in _IGNORED_NAMES or low.endswith(_IGNORED_SUFFIXES)
            or low.endswith("~"))


class _Walker:
    """Collects records from many sources; DICOM series are grouped across all of them."""

    def __init__(self, dataset: str, require_subject: bool = True):
        self.given_dataset = dataset
        self.dataset = dataset
        # read_image reads query images, which need no subject; discover insists on one.
        self.require_subject = require_subject
        self.found = Discovery()
        self.seen = set()
        # Ordered entries: ("record", ImageRecord) or ("series", key); series filled in later.
        self.entries: List[Tuple[str, object]] = []
        self.series: Dict[str, List[DicomHeader]] = {}

    # -- single files ------------------------------------------------------------------
    def add_file(self, path: Path, root: Optional[Path]):
        """One file; ``root`` is the walked folder (None when the file was given alone)."""
        key = os.path.realpath(path)
        if key in self.seen:
            return
        self.seen.add(key)
        if root is not None:
            rel = PurePosixPath(path.relative_to(root).as_posix())
            image_id = str(rel)
            # Folder-per-subject: the first-level folder; a file at the top is its own subject.
            subject = rel.parts[0] if len(rel.parts) > 1 else _stem(rel.name)
        else:
            # A lone file: its name is its image ID; its stem, as at the top of a folder,
            # its subject (a manifest gives a real one).
            image_id, subject = path.name, _stem(path.name)
        if is_raster_file(path) or is_volume_file(path):
            self.entries.append(("record", ImageRecord(
                source=str(path), subject_id=subject, image_id=image_id,
                modality=guess_modality(path), dataset=self.dataset)))
            return
        try:
            info = header_info(path)
        except ImageReadError as exc:
            self.found.failures.append(Failure(str(path), exc.reason))
            return
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop the walk
            self.found.failures.append(Failure.from_exception(path, exc))
            return
        if not info.patient_id and not info.skip_reason and self.require_subject:
            # Guessing a subject from folder names could merge patients (a PACS export puts
            # everyone under one "DICOM" folder): refuse, and say how to give one.
            self.found.failures.append(Failure(
                str(path), "no PatientID in the DICOM header; list the file in a manifest "
                           "(subject_id,image_path) to give its subject"))
            return
        self.add_dicom(info, image_id)

    def add_dicom(self, info: DicomHeader, fallback_id: str):
        if info.skip_reason:
            self.found.skipped.append(Failure(info.path, info.skip_reason))
            return
        if info.is_slice:
            key = (self.dataset, info.series_uid or f"folder:{os.path.dirname(info.path)}")
            if key not in self.series:
                self.series[key] = []
                self.entries.append(("series", key))
            self.series[key].append(info)
            return
        if info.frames > 1 and not (info.enhanced and info.modality in VOLUME_MODALITIES):
            self.found.failures.append(Failure(
                info.path, f"multi-frame {info.modality or 'DICOM'} image with {info.frames} frames "
                           "is not one image (only enhanced MR/CT multi-frames are read, as volumes)"))
            return
        volume = info.frames > 1
        image_id = (info.series_uid if volume else info.sop_uid) or fallback_id
        self.entries.append(("record", ImageRecord(
            source=info.path, subject_id=info.patient_id, image_id=image_id,
            modality=info.modality, view=info.view, dataset=self.dataset)))

    # -- folders -----------------------------------------------------------------------
    def add_folder(self, folder: Path):
        self.dataset_for(folder)

        def cannot_enter(exc: OSError):
            # Unreadable or over-long folders would otherwise vanish from the walk silently.
            where = exc.filename if exc.filename is not None else folder
            self.found.failures.append(Failure(
                os.fsdecode(where), f"cannot read folder ({exc.strerror or exc}); its files were "
                                    "not looked at"))

        for root, dirs, files in os.walk(folder, onerror=cannot_enter):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if _ignored(name) or name.upper() == "DICOMDIR":
                    if name.upper() == "DICOMDIR":
                        self.found.skipped.append(Failure(
                            os.path.join(root, name), "DICOMDIR (the files it lists are walked directly)"))
                    continue
                self.add_file(Path(root) / name, folder)

    def dataset_for(self, folder: Path):
        """Dataset name of the next source: the one given, else the source folder's name."""
        self.dataset = self.given_dataset or Path(os.path.abspath(folder)).name

    def add_manifest(self, manifest: Path):
        self.dataset_for(manifest.parent)
        records, failures = read_manifest(manifest, dataset=self.dataset)
        self.found.failures.extend(failures)
        root = os.path.realpath(manifest.parent)
        resolved = [os.path.realpath(r.source) for r in records]
        outside = [p for p in resolved if os.path.commonpath([root, p]) != root]
        if outside:
            self.found.notices.append(
                f"{manifest}: {len(outside)} listed image(s) lie outside the manifest's folder "
                f"{root} (first: {outside[0]})")
        for record in records:
            self.seen.add(os.path.realpath(record.source))
            if not record.modality and not record.view and len(record.files) == 1:
                record = _fill_from_header(record)
            self.entries.append(("record", record))

    # -- result ------------------------------------------------------------------------
    def finish(self) -> Discovery:
        for kind, item in self.entries:
            if kind == "record":
                self.found.records.append(item)
                continue
            stacks, localizers = split_series(self.series[item])
            for path in localizers:
                self.found.skipped.append(Failure(path, "localizer (scout) image"))
            for k, stack in enumerate(stacks):
                first = stack[0]
                files = tuple(h.path for h in stack)
                series_id = first.series_uid or item[1]
                self.found.records.append(ImageRecord(
                    source=os.path.commonpath(files) if len(files) > 1 else files[0],
                    subject_id=first.patient_id,
                    image_id=series_id if k == 0 else f"{series_id}#{k + 1}",
                    modality=first.modality, view=first.view, dataset=item[0], files=files))
        return self.found


def _stem(name: str) -> str:
    low = name.lower()
    for suffix in (".nii.gz",):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _fill_from_header(record: ImageRecord) -> ImageRecord:
    """Modality/view of a manifest row that gave none: DICOM header, or a guess from the file."""
    path = record.files[0]
    if is_raster_file(path) or is_volume_file(path) or os.path.isdir(path):
        return replace(record, modality=guess_modality(path))
    try:
        info = header_info(path)
    except Exception:  # noqa: BLE001 - reading the pixels later reports the problem
        return record
    return replace(record, modality=info.modality, view=info.view)


def discover(sources: Union[Source, Iterable[Source]], manifest: Optional[Source] = None,
             dataset: str = "", require_subject: bool = True) -> Discovery:
    """Find every image under ``sources`` with its subject, image ID, modality and view.

    ``sources``: files and folders (one path or a list). A folder with a ``manifest.csv`` at
    its top is read through the manifest; any other folder is walked (folder-per-subject
    layout for raster/volume files, PatientID/series UIDs for DICOM). With ``manifest``
    given, the images it lists are the result and ``sources`` are not walked.

    ``dataset``: name stored with every record; by default the name of each source folder
    (a file's own folder, a manifest's folder). Records come in a fixed order: sources as
    given, files sorted within each. A DICOM image without PatientID is a failure unless
    ``require_subject`` is false (as for query images).
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    walker = _Walker(dataset, require_subject=require_subject)
    if manifest:
        walker.add_manifest(Path(manifest))
        return walker.finish()
    for source in sources:
        path = Path(source)
        try:
            _add_source(walker, path)
        except OSError as exc:
            # A source in a folder that may not be entered is one failed item, not the end.
            walker.found.failures.append(Failure(str(path), f"cannot access ({exc.strerror or exc})"))
    return walker.finish()


def _add_source(walker: _Walker, path: Path) -> None:
    if not path.exists():
        walker.found.failures.append(Failure(str(path), "not found"))
    elif path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            walker.add_manifest(path / MANIFEST_NAME)
        else:
            walker.add_folder(path)
    elif path.name.lower().endswith(".csv"):
        walker.add_manifest(path)
    else:
        walker.dataset_for(path.parent)
        walker.add_file(path, None)
