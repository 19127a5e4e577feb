"""What the engine knows about one image: its identity (``ImageRecord``) and its pixels
(``LoadedImage``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

# Modality codes grouped into the families a model is trained for. DICOM codes plus the
# spellings found in manifests ("CXR", "MR-FLAIR", ...).
_FAMILIES = {
    "xray": ("CR", "DX", "DR", "RG", "XR", "CXR", "PX", "MG"),
    "mr": ("MR", "MRI"),
    "ct": ("CT",),
}


def modality_family(modality: str) -> str:
    """Return ``"xray"``, ``"mr"``, ``"ct"`` or ``"other"`` for a modality code.

    ``"MR-FLAIR"`` and ``"MR_T1"`` count as ``"mr"``: the part before the first ``-`` or ``_``
    decides.
    """
    head = (modality or "").upper().replace("_", "-").split("-")[0].strip()
    for family, codes in _FAMILIES.items():
        if head in codes:
            return family
    return "other"


@dataclass(frozen=True)
class ImageRecord:
    """Identity and location of one image; no pixels.

    ``files`` lists every file that makes the image (all slices of a DICOM series, in
    order); for a single-file image it is ``(source,)``.
    """

    source: str
    subject_id: str
    image_id: str
    modality: str = ""
    view: str = ""
    dataset: str = ""
    files: tuple = field(default=())

    def __post_init__(self):
        if not self.files:
            object.__setattr__(self, "files", (self.source,))


@dataclass
class LoadedImage:
    """Decoded pixels of one image, in the engine's fixed orientation.

    ``array`` is float32, ``(rows, columns)`` for 2D and ``(slices, rows, columns)`` for 3D
    (SimpleITK's z, y, x order after reorientation to LPS); ``spacing`` is in the same
    axis order, in millimetres.
    """

    array: np.ndarray
    spacing: tuple
    record: ImageRecord
    content_hash: str = ""

    def __post_init__(self):
        if not self.content_hash:
            self.content_hash = pixel_hash(self.array)

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim


def pixel_hash(array: np.ndarray) -> str:
    """SHA-256 of decoded pixels and their shape: equal for exact copies, whatever the file."""
    data = np.ascontiguousarray(array, dtype=np.float32)
    digest = hashlib.sha256(repr(data.shape).encode())
    digest.update(data.tobytes())
    return digest.hexdigest()
