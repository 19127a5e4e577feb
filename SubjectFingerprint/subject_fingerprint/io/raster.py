"""2D raster images (PNG, JPEG, TIFF, BMP, ...) via Pillow, as float32 grey."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..errors import ImageReadError
from .limits import check_declared_size
from .pixels import rgb_to_grey

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".pgm", ".ppm", ".webp")


def is_raster_file(path) -> bool:
    return str(path).lower().endswith(RASTER_SUFFIXES)


def _open_checked(Image, path):
    """``Image.open`` with the engine's voxel limit applied from the header, before decoding."""
    img = Image.open(path)
    try:
        check_declared_size(path, (img.size[1], img.size[0]))
    except BaseException:
        img.close()
        raise
    return img


def read_raster(path) -> Tuple[np.ndarray, Tuple[float, float]]:
    """Read a raster file as a (rows, cols) float32 grey array and unit spacing.

    Colour becomes ITU-R 601 luminance computed in float (not Pillow's rounded "L"), 16-bit
    grey keeps its full range, an alpha channel is dropped. Multi-page files are refused.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = str(path)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it: make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = _open_checked(Image, path)
        with img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise ImageReadError(path, f"multi-page image with {frames} pages; expected one image")
            img.load()
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                mode = img.mode
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("L" if mode == "1" else "RGB")
                mode = img.mode
            array = np.asarray(img)
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(path, f"image too large: {exc}; refused before decoding") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(path, "not a readable image (unknown or damaged format)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"cannot decode image, damaged or truncated ({exc})") from exc
    if array.ndim == 3:
        if mode in ("LA", "La"):
            array = array[..., 0]
        else:
            array = rgb_to_grey(array.astype(np.float32))
    if array.ndim != 2 or array.size == 0:
        raise ImageReadError(path, f"unexpected image layout {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32), (1.0, 1.0)
