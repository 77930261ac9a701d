"""Reference annotations derived from a ground-truth mask, deterministic given a seed.

Every type is returned as an ``H x W`` uint8 {0, 1} mask, which is what the methods consume
(VRP-SAM encodes any annotation as a mask on the reference features):

* ``mask``: the object mask itself (ignore pixels -> 0).
* ``box``: the filled bounding box of the object's pixels.
* ``scribble``: SEEM-style random strokes inside the mask: 1-3 polylines through random object
  pixels, each later point chosen near the previous one, drawn with a width of ~2% of the shorter
  image side and clipped to the mask.
* ``points``: ``num_points`` random object pixels (VRP-SAM: 1..20 in training, 20 at test), drawn
  as discs of radius ~1% of the shorter side so they survive resizing to the 64x64 feature grid.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import DataError

ANNOTATION_TYPES = ("mask", "box", "scribble", "points")
MAX_TRAIN_POINTS = 20


def reference_annotation(
    mask: np.ndarray, annotation_type: str, seed: int, *, num_points: int | None = None
) -> np.ndarray:
    """The reference annotation of type ``annotation_type`` for ``mask`` (uint8, 1 = object).

    ``num_points=None`` draws the number of points uniformly from 1..20 (training); pass 20 for
    VRP-SAM's test setting.
    """
    if annotation_type not in ANNOTATION_TYPES:
        raise DataError(f"unknown annotation type {annotation_type!r}; expected one of {ANNOTATION_TYPES}")
    if mask.ndim != 2:
        raise DataError(f"reference mask must be H x W, got shape {mask.shape}")
    foreground = mask == 1
    if not foreground.any():
        raise DataError(
            "reference mask has no foreground pixel (empty or all-ignore): no annotation possible",
            reason="empty reference mask",
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    if annotation_type == "mask":
        return foreground.astype(np.uint8)
    if annotation_type == "box":
        return box_mask(foreground)
    if annotation_type == "scribble":
        return scribble_mask(foreground, rng)
    count = int(rng.integers(1, MAX_TRAIN_POINTS + 1)) if num_points is None else num_points
    return points_mask(foreground, rng, count)


def box_mask(foreground: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(foreground.any(axis=1))
    cols = np.flatnonzero(foreground.any(axis=0))
    box = np.zeros(foreground.shape, dtype=np.uint8)
    box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = 1
    return box


def _stroke_width(shape: tuple[int, int], fraction: float) -> int:
    return max(1, int(round(fraction * min(shape))))


def scribble_mask(foreground: np.ndarray, rng: np.random.Generator, max_strokes: int = 3) -> np.ndarray:
    ys, xs = np.nonzero(foreground)
    height, width = foreground.shape
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    line_width = _stroke_width(foreground.shape, 0.02)
    reach = max(4.0, 0.25 * float(np.hypot(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        index = int(rng.integers(len(ys)))
        points = [(int(xs[index]), int(ys[index]))]
        for _ in range(int(rng.integers(3, 7))):
            x0, y0 = points[-1]
            near = np.flatnonzero(np.hypot(xs - x0, ys - y0) <= reach)
            index = int(near[rng.integers(len(near))])
            points.append((int(xs[index]), int(ys[index])))
        draw.line(points, fill=1, width=line_width, joint="curve")
    strokes = np.asarray(canvas, dtype=bool) & foreground
    if not strokes.any():  # a stroke always covers its own start pixel; keep the guarantee explicit
        strokes[ys[0], xs[0]] = True
    return strokes.astype(np.uint8)


def points_mask(foreground: np.ndarray, rng: np.random.Generator, num_points: int) -> np.ndarray:
    if num_points < 1:
        raise DataError(f"num_points must be >= 1, got {num_points}")
    ys, xs = np.nonzero(foreground)
    chosen = rng.choice(len(ys), size=min(num_points, len(ys)), replace=False)
    height, width = foreground.shape
    radius = _stroke_width(foreground.shape, 0.01)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for index in chosen:
        x, y = int(xs[index]), int(ys[index])
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=1)
    return np.asarray(canvas, dtype=np.uint8).copy()
