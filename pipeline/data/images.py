"""Image loading with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DataError


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to an ``H x W x 3`` uint8 RGB array.

    Raises :class:`DataError` naming ``path`` when the file is missing, truncated or not an image,
    so a bad file never surfaces as a PIL/zlib traceback deep inside a worker.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}", reason="image file not found")
    try:
        with Image.open(path) as image:
            image.load()  # force full decode: truncated JPEGs only fail here
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"corrupt or unreadable image {path}: {error}", reason="corrupt image") from error


def load_label_png(path: str | Path) -> np.ndarray:
    """Decode a single-channel label PNG (palette or L mode) to an ``H x W`` uint8 array of indices."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"label file {path} has mode {image.mode!r}, expected a single-channel PNG")
            labels = np.asarray(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"corrupt or unreadable label file {path}: {error}") from error
    if labels.max(initial=0) > 255:
        raise DataError(f"label file {path} has values above 255")
    return labels.astype(np.uint8)
