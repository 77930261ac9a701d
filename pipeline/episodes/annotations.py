"""Reference annotations of episodes: :func:`refseg_models.annotations.reference_annotation` (the one
implementation, shared with ``refseg predict``) at the data layer's error boundary.

An episode carries ``annotation_type`` and ``annotation_seed``; the annotation is regenerated from
them exactly (mask, box, scribble as SEEM's strokes, points as single pixels, the last two in the
authors' 512 x 512 frame; see :mod:`refseg_models.annotations`). An empty or all-ignore reference
mask raises ``DataError`` with reason "empty reference mask", so evaluation counts it as a reported
skip.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import DataError
from refseg_models.annotations import ANNOTATION_TYPES, POINT_STYLES
from refseg_models.annotations import reference_annotation as _draw
from refseg_models.errors import ModelError

__all__ = ["ANNOTATION_TYPES", "POINT_STYLES", "reference_annotation"]


def reference_annotation(
    mask: np.ndarray, annotation_type: str, seed: int, *, training: bool = False, point_style: str = "pixel"
) -> np.ndarray:
    """The reference annotation (uint8 {0, 1}) of ``mask`` ({0, 1, 255}); see the module docstring."""
    if annotation_type not in ANNOTATION_TYPES:
        raise DataError(f"unknown annotation type {annotation_type!r}; expected one of {ANNOTATION_TYPES}")
    if mask.ndim != 2:
        raise DataError(f"reference mask must be H x W, got shape {mask.shape}")
    if not (mask == 1).any():
        raise DataError(
            "reference mask has no foreground pixel (empty or all-ignore): no annotation possible",
            reason="empty reference mask",
        )
    try:
        return _draw(mask, annotation_type, seed, training=training, point_style=point_style)
    except ModelError as error:
        raise DataError(str(error)) from error
