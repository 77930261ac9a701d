"""Reference annotations as binary masks: the ONE implementation used by training, evaluation and
``refseg predict``.

Every method encodes any annotation as a binary mask on the reference (VRP-SAM's visual reference
prompt). Two sources of annotations:

* drawn from what a user gives (:func:`draw_box`, :func:`draw_points`; a scribble or mask arrives
  as pixels already);
* generated from a ground-truth mask for training / benchmark episodes (:func:`reference_annotation`),
  seeded per episode, with the distributions of the authors' code (VRP-SAM ``model/VRP_encoder.py``,
  which takes its strokes from SEEM):

  - ``mask``: the object mask (ignore pixels -> 0);
  - ``box``: the filled tight box of the object's pixels;
  - ``points``: single object pixels, 1..min(20, area) in training, min(20, area) at test;
  - ``scribble``: SEEM's random-curve strokes (presets ``rand_curve`` / ``rand_curve_small`` with
    equal probability), 1..min(20, area) strokes each starting at a random object pixel, drawn as
    polylines with round joints, intersected with the object mask.

The authors draw on the reference resized to 512 x 512; here annotations are drawn at the mask's own
resolution with the SEEM lengths (speeds, brush widths, point moves) scaled by
``sqrt(H * W) / 512`` so that strokes keep their size relative to the object. Single-pixel points
mostly vanish when a model nearest-resizes the mask to its 64 x 64 grid (as the authors' code does;
measured in docs/methods.md). ``point_style="disc"`` (refseg's variant: discs of radius 1% of the
shorter side, which survive the grid) is offered for users and ablations; it is not paper-comparable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from refseg_models.errors import ModelError

ANNOTATION_TYPES = ("mask", "box", "scribble", "points")
POINT_STYLES = ("pixel", "disc")
MAX_POINTS = 20
MAX_STROKES = 20
# The frame the authors draw annotations in (VRP-SAM's 512 x 512 reference input).
AUTHORS_FRAME = 512


# ------------------------------------------------------------------------------ drawing what users give
def draw_box(shape: tuple[int, int], box: Sequence[float]) -> np.ndarray:
    """Filled box (x0, y0, x1, y1), inclusive pixel corners, clipped to the image -> H x W bool."""
    h, w = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 <= x1 and y0 <= y1):
        raise ModelError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {tuple(box)}")
    mask = np.zeros((h, w), dtype=bool)
    c0, r0 = max(int(round(x0)), 0), max(int(round(y0)), 0)
    c1, r1 = min(int(round(x1)), w - 1), min(int(round(y1)), h - 1)
    mask[r0 : r1 + 1, c0 : c1 + 1] = True
    return mask


def disc_radius(shape: tuple[int, int]) -> int:
    """Radius of refseg's ``disc`` points: 1% of the shorter side, at least 1 pixel."""
    return max(1, int(round(0.01 * min(int(shape[0]), int(shape[1])))))


def draw_points(shape: tuple[int, int], points_xy: Sequence[Sequence[float]], style: str = "pixel") -> np.ndarray:
    """(x, y) points -> H x W bool: single pixels (``"pixel"``, the authors') or discs (``"disc"``)."""
    if style not in POINT_STYLES:
        raise ModelError(f"point style must be one of {POINT_STYLES}, got {style!r}")
    h, w = int(shape[0]), int(shape[1])
    try:
        pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    except ValueError as exc:
        raise ModelError(f"points must be (x, y) pairs, got {points_xy!r}") from exc
    if len(pts) == 0:
        raise ModelError("no reference points given")
    outside = [(x, y) for x, y in pts if not (0 <= x < w and 0 <= y < h)]
    if outside:
        raise ModelError(f"points {outside[:3]} lie outside the {w} x {h} reference image")
    if style == "pixel":
        mask = np.zeros((h, w), dtype=bool)
        mask[pts[:, 1].astype(int), pts[:, 0].astype(int)] = True
        return mask
    radius = disc_radius((h, w))
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for x, y in pts:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=1)
    return np.asarray(canvas, dtype=bool).copy()


# ------------------------------------------------------------------------------ generated from GT masks
def box_of(foreground: np.ndarray) -> tuple[int, int, int, int]:
    """Tight inclusive box (x0, y0, x1, y1) of a non-empty bool mask."""
    rows = np.flatnonzero(foreground.any(axis=1))
    cols = np.flatnonzero(foreground.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def random_points(foreground: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct random object pixels as an N x 2 (x, y) int array (N = min(count, area))."""
    ys, xs = np.nonzero(foreground)
    chosen = rng.choice(len(ys), size=min(int(count), len(ys)), replace=False)
    return np.stack([xs[chosen], ys[chosen]], axis=1)


# SEEM's stroke presets (SEEM / VRP-SAM ``get_stroke_preset``), lengths in pixels of a 512 frame.
STROKE_PRESETS: dict[str, dict[str, object]] = {
    "rand_curve": {
        "vertices": (10, 30), "max_head_speed": 20.0, "max_head_acceleration": (15.0, 0.5),
        "brush_width": (3, 10), "move_point_ratio": 0.5, "max_point_move": 3.0,
        "max_line_acceleration": (5.0, 0.5), "max_init_speed": 6.0,
    },
    "rand_curve_small": {
        "vertices": (6, 22), "max_head_speed": 12.0, "max_head_acceleration": (8.0, 0.5),
        "brush_width": (2.5, 5), "move_point_ratio": 0.5, "max_point_move": 1.5,
        "max_line_acceleration": (3.0, 0.5), "max_init_speed": 3.0,
    },
}


def _stroke(start: np.ndarray, preset: dict, scale: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """One SEEM random-curve stroke: control points (after SEEM's random move) and brush width.

    The head starts at ``start`` with a random angle and speed, is accelerated uniformly at every
    vertex (speed clipped to [0, max]), then the whole line is shifted by a random half-normal
    velocity and a random half of its control points are jittered (SEEM draws the moved stroke).
    """
    lo_v, hi_v = preset["vertices"]
    max_speed = float(preset["max_head_speed"]) * scale
    d_speed, d_angle = preset["max_head_acceleration"]
    d_speed *= scale
    width_lo, width_hi = preset["brush_width"]
    width = max(1, int(round(rng.integers(int(width_lo), int(width_hi)) * scale)))
    n = int(rng.integers(lo_v, hi_v))
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0, max_speed)
    xs, ys = [float(start[0])], [float(start[1])]
    for _ in range(n):
        speed = float(np.clip(speed + rng.uniform(-d_speed, d_speed), 0, max_speed))
        angle += rng.uniform(-d_angle, d_angle)
        xs.append(xs[-1] + speed * math.sin(angle))
        ys.append(ys[-1] + speed * math.cos(angle))
    x, y = np.array(xs), np.array(ys)
    # SEEM's "random move" of the stroke before it is drawn.
    line_speed = abs(rng.normal(0, float(preset["max_init_speed"]) * scale / 2))
    line_angle = rng.uniform(0, 2 * np.pi)
    x += int(line_speed * math.cos(line_angle))
    y += int(line_speed * math.sin(line_angle))
    move = max(1, int(round(float(preset["max_point_move"]) * scale)))
    chosen = rng.permutation(len(x))[: int(len(x) * float(preset["move_point_ratio"]))]
    x[chosen] += rng.integers(-move, move, size=len(chosen))
    y[chosen] += rng.integers(-move, move, size=len(chosen))
    return x, y, width


def random_scribble(foreground: np.ndarray, num_strokes: int, rng: np.random.Generator, preset: str) -> np.ndarray:
    """SEEM-style strokes from ``num_strokes`` random object pixels, intersected with the mask."""
    if preset not in STROKE_PRESETS:
        raise ModelError(f"unknown stroke preset {preset!r}; known: {sorted(STROKE_PRESETS)}")
    h, w = foreground.shape
    scale = math.sqrt(h * w) / AUTHORS_FRAME
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for start in random_points(foreground, num_strokes, rng):
        x, y, width = _stroke(start, STROKE_PRESETS[preset], scale, rng)
        draw.line(list(zip(x.tolist(), y.tolist())), fill=1, width=width)
        radius = width // 2 - 1
        if radius >= 1:  # round joints, as SEEM draws them (thin strokes need none)
            for cx, cy in zip(x, y):
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    strokes = np.asarray(canvas, dtype=bool) & foreground
    if not strokes.any():  # every stroke starts on an object pixel: keep that one at least
        ys, xs = np.nonzero(foreground)
        strokes[ys[0], xs[0]] = True
    return strokes


def reference_annotation(
    mask: np.ndarray,
    annotation_type: str,
    seed: int,
    *,
    training: bool = False,
    point_style: str = "pixel",
) -> np.ndarray:
    """The reference annotation of ``annotation_type`` generated from a GT mask (uint8 {0, 1}).

    ``mask``: H x W with 1 = object (anything else, e.g. 255 = ignore, is not object).
    ``training``: the authors' training draws (1..min(20, area) points / strokes) instead of the
    test ones (min(20, area) points; 1..min(20, area) strokes). Deterministic given ``seed``.
    Raises ModelError for an unknown type or an empty object.
    """
    if annotation_type not in ANNOTATION_TYPES:
        raise ModelError(f"unknown annotation type {annotation_type!r}; expected one of {ANNOTATION_TYPES}")
    if mask.ndim != 2:
        raise ModelError(f"reference mask must be H x W, got shape {mask.shape}")
    foreground = mask == 1
    area = int(foreground.sum())
    if area == 0:
        raise ModelError("reference mask has no foreground pixel (empty or all-ignore): no annotation possible")
    rng = np.random.Generator(np.random.PCG64(seed))
    if annotation_type == "mask":
        out = foreground
    elif annotation_type == "box":
        out = draw_box(foreground.shape, box_of(foreground))
    elif annotation_type == "points":
        most = min(MAX_POINTS, area)
        count = int(rng.integers(1, most + 1)) if training else most
        out = draw_points(foreground.shape, random_points(foreground, count, rng), point_style)
    else:
        preset = "rand_curve" if rng.random() < 0.5 else "rand_curve_small"
        strokes = int(rng.integers(1, min(MAX_STROKES, area) + 1))
        out = random_scribble(foreground, strokes, rng, preset)
    return out.astype(np.uint8)
