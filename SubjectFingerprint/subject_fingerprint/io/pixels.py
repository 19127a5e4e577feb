"""Pixel conversions shared by every reader."""

from __future__ import annotations

import numpy as np

# ITU-R BT.601 luma weights: what PIL's "L" mode and most viewers use for colour -> grey.
_LUMA = (0.299, 0.587, 0.114)


def rgb_to_grey(array: np.ndarray) -> np.ndarray:
    """Grey values of a channels-last RGB(A) array (alpha ignored), in the array's float type
    (float32 for integer input)."""
    rgb = np.asarray(array)[..., :3]
    if not np.issubdtype(rgb.dtype, np.floating):
        rgb = rgb.astype(np.float32)
    return _LUMA[0] * rgb[..., 0] + _LUMA[1] * rgb[..., 1] + _LUMA[2] * rgb[..., 2]
