"""Volume files (NIfTI, NRRD, MetaImage) via SimpleITK, and the fixed LPS orientation.

Every 3D image, whether from a file or a DICOM series, goes through :func:`to_array` so the
same head stored as LPS or RAS (or with flipped/permuted axes) gives the same array.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..errors import ImageReadError
from .limits import check_volume_header
from .pixels import rgb_to_grey

# Longest suffixes first so ".nii.gz" wins over ".gz".
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr")

# Orientation every 3D image is brought to: index axes x, y, z pointing to patient Left,
# Posterior, Superior (identity direction in DICOM/ITK world coordinates).
ORIENTATION = "LPS"


def is_volume_file(path) -> bool:
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def read_volume_file(path):
    """Read a NIfTI/NRRD/MetaImage file into a scalar SimpleITK image (2D or 3D)."""
    import SimpleITK as sitk

    path = str(path)
    # Declared size and truncated compressed data: checked before SimpleITK allocates (it
    # would zero-fill a truncated .nii.gz and allocate whatever a header declares).
    check_volume_header(path)
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        # ITK's messages are long; keep the line that says what went wrong.
        detail = " ".join(str(exc).split())
        detail = detail.split("ERROR:", 1)[-1].replace(f' for "{path}"', "").replace(f'"{path}"', "")
        raise ImageReadError(
            path, f"cannot read volume file, unknown format or damaged ({detail.strip()[:300]})") from exc
    components = image.GetNumberOfComponentsPerPixel()
    if components not in (1, 3, 4):
        raise ImageReadError(path, f"vector image with {components} components per voxel; "
                                   "expected one grey value")
    if image.GetDimension() == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise ImageReadError(path, f"4D image with {size[3]} time points; expected one volume")
        image = sitk.Extract(image, list(size[:3]) + [0], [0, 0, 0, 0])
    if image.GetDimension() not in (2, 3):
        raise ImageReadError(path, f"{image.GetDimension()}D image; expected 2D or 3D")
    return image


def to_array(image, path="") -> Tuple[np.ndarray, Tuple[float, ...]]:
    """SimpleITK image -> (float32 array, spacing) in the engine's conventions.

    3D images are reoriented to LPS and come back as (z, y, x); a 3D image with one slice
    becomes 2D (rows, cols), which is what it is.
    """
    import SimpleITK as sitk

    if image.GetDimension() == 3:
        try:
            image = sitk.DICOMOrient(image, ORIENTATION)
        except RuntimeError as exc:
            raise ImageReadError(path, f"cannot reorient volume to {ORIENTATION} ({exc})") from exc
    array = sitk.GetArrayFromImage(image)  # colour: channels last
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = rgb_to_grey(array.astype(np.float32, copy=False))
    array = array.astype(np.float32, copy=False)
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    if array.ndim == 3:
        # A single slice may lie along any axis after reorientation: squeeze whichever.
        singles = [axis for axis, n in enumerate(array.shape) if n == 1]
        if singles and array.size:
            axis = singles[0]
            array = np.squeeze(array, axis=axis)
            spacing = tuple(s for i, s in enumerate(spacing) if i != axis)
    # Non-finite values are judged by load_image (limits.check_content) and the few that an
    # accepted image may hold are handled by Preprocessing, in one place; not hidden here.
    return np.ascontiguousarray(array, dtype=np.float32), spacing
