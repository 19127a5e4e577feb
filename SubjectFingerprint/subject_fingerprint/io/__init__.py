"""Reading images and finding them: DICOM (X-ray and MR/CT series), NIfTI/NRRD/MetaImage,
PNG/JPEG/TIFF/BMP, manifests and folder layouts.

- :func:`discover` finds images and their identity (subject, image ID, modality, view);
- :func:`load_image` decodes one :class:`~subject_fingerprint.records.ImageRecord`;
- :func:`read_image` reads one file or DICOM series folder directly.

Conventions of the decoded arrays (``LoadedImage.array``, float32): 2D is (rows, cols);
3D is (z, y, x) after reorientation to LPS; X-rays have the Modality LUT/rescale and VOI
LUT/window applied and MONOCHROME1 inverted, so bone is bright.
"""

from .discovery import Discovery, discover, guess_modality
from .manifest import MANIFEST_NAME, ManifestError, read_manifest
from .reading import load_image, read_image

__all__ = ["Discovery", "discover", "guess_modality", "load_image", "read_image",
           "read_manifest", "ManifestError", "MANIFEST_NAME"]
