"""Reference annotations as binary masks: the ONE implementation used by training, evaluation and
``refseg predict``.

Every method encodes any annotation as a binary mask on the reference (VRP-SAM's visual reference
prompt). Two sources of annotations:

* drawn from what a user gives (:func:`draw_box`, :func:`draw_points`; a scribble or mask arrives
  as pixels already), at the reference's own size;
* generated from a ground-truth mask for training / benchmark episodes (:func:`reference_annotation`),
  seeded per episode, as the authors' code draws them (VRP-SAM ``model/VRP_encoder.py`` lines 16-84,
  strokes from SEEM via ``common/utils.py`` lines 94-314; FCP's copy is identical):

  - ``mask``: the object mask (ignore pixels -> 0), at the reference's own size;
  - ``box``: the filled tight box of the object's pixels, at the reference's own size;
  - ``points``: single object pixels, 1..min(20, area) in training, min(20, area) at test;
  - ``scribble``: SEEM's random-curve strokes, each starting at a random object pixel, intersected
    with the object mask (a scribble that misses the object stays empty, as theirs does). Training:
    preset ``rand_curve`` / ``rand_curve_small`` with equal probability and 1..min(20, area) strokes;
    test: the authors' fixed draw (:func:`scribble_plan`: ``rand_curve`` and, for area >= 16, 9 strokes).

Points and scribbles are drawn where the authors draw them: on the reference's mask nearest-resized
to 512 x 512 (VRP-SAM's input frame, ``data/coco.py`` line 44), and returned IN that frame
(512 x 512). Every returned array covers the whole reference image, whatever its resolution: map it
into a model's input frame with ``Frame.of(preprocessing, size, reference_hw).mask_to_frame(annotation)``
(:mod:`refseg_models.frames`), which for VRP-SAM's 512 squash frame is the identity, so a model sees
exactly the authors' annotation. An object too thin to survive the 512 resize (the authors' code fails
on it: ``randint(1, 0)``) is drawn at the reference's own size instead. Single-pixel points mostly
vanish when a model nearest-resizes the mask to its 64 x 64 grid (as in the authors' code; measured in
docs/methods.md). ``point_style="disc"`` (refseg's variant: discs of radius 1% of the shorter side,
which survive the grid) is offered for users and ablations; it is not paper-comparable.

Randomness: one ``numpy`` PCG64 stream per annotation, seeded by the episode's ``annotation_seed``
(+ the shot index), so an episode's annotation never depends on the episodes drawn before it. The
authors draw from global streams consumed episode after episode (training: unseeded
``random.Random()`` for the counts and presets, the global torch / numpy states for the pixels);
refseg draws the same distributions per episode (docs/methods.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from refseg_models.errors import ModelError
from refseg_models.frames import Frame

ANNOTATION_TYPES = ("mask", "box", "scribble", "points")
POINT_STYLES = ("pixel", "disc")
MAX_POINTS = 20
MAX_STROKES = 20
# The frame the authors draw annotations in (VRP-SAM's 512 x 512 reference input).
AUTHORS_FRAME = 512
# VRP_encoder.py get_scribble_mask: stroke_preset=['rand_curve', 'rand_curve_small'], stroke_prob=[0.5, 0.5]
SCRIBBLE_PRESETS = ("rand_curve", "rand_curve_small")
# VRP_encoder.py line 72-73: the seed of the fresh random.Random the test draw is made with
AUTHORS_TEST_SEED = 321


# ------------------------------------------------------------------------------ drawing what users give
def box_masks(boxes: torch.Tensor, frame: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
    """THE box rasteriser (reference boxes, the proxy SAM's box targets and box prompts).

    ``boxes``: N x 4 ``(x0, y0, x1, y1)``, half-open, in continuous coordinates of a frame of
    ``frame = (width, height)``; -> N x H x W bool on an ``size = (H, W)`` grid over that frame, a cell
    inside when its centre is. Pixel-corner boxes convert explicitly: integer pixels ``x0..x1``
    inclusive are ``(x0, y0, x1 + 1, y1 + 1)`` on the image's own frame and grid (:func:`draw_box`)."""
    (fw, fh), (h, w) = frame, size
    xs = (torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5) * (fw / w)
    ys = (torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5) * (fh / h)
    inside_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])
    inside_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])
    return inside_y[:, :, None] & inside_x[:, None, :]


def draw_box(shape: tuple[int, int], box: Sequence[float]) -> np.ndarray:
    """Filled box (x0, y0, x1, y1), inclusive pixel corners (rounded), clipped to the image -> H x W bool."""
    h, w = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 <= x1 and y0 <= y1):
        raise ModelError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {tuple(box)}")
    corners = torch.tensor([[round(x0), round(y0), round(x1) + 1, round(y1) + 1]], dtype=torch.float32)
    return box_masks(corners, (w, h), (h, w))[0].numpy()


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


def authors_frame(foreground: np.ndarray) -> np.ndarray:
    """H x W bool object mask -> 512 x 512 bool: nearest-resized as VRP-SAM's dataset resizes the
    reference mask (``F.interpolate(..., mode='nearest')``, data/coco.py line 44)."""
    frame = Frame((int(foreground.shape[0]), int(foreground.shape[1])), AUTHORS_FRAME, padded=False)
    return frame.mask_to_frame(foreground).numpy() > 0.5


# SEEM's stroke presets (common/utils.py ``get_stroke_preset``, lines 94-120), in pixels of the 512 frame.
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


def scribble_plan(area: int, training: bool, rng: np.random.Generator) -> tuple[str, int]:
    """(stroke preset, number of strokes) of one scribble on an object of ``area`` pixels.

    Training (VRP_encoder.py lines 68-70): preset with probability 1/2 each, 1..min(20, area)
    strokes. Test (lines 71-73): the authors build a FRESH ``random.Random(321)`` for each draw, so
    every test episode gets the same preset (``rand_curve``) and a stroke count that depends on
    min(20, area) only (9 for area >= 16); it is computed here exactly as they do.
    """
    most = min(MAX_STROKES, int(area))
    if training:
        preset = SCRIBBLE_PRESETS[0] if rng.random() < 0.5 else SCRIBBLE_PRESETS[1]
        return preset, int(rng.integers(1, most + 1))
    preset = random.Random(AUTHORS_TEST_SEED).choices(SCRIBBLE_PRESETS, weights=(0.5, 0.5), k=1)[0]
    return preset, random.Random(AUTHORS_TEST_SEED).randint(1, most)


def _int_bound(value: float) -> int:
    # numpy's legacy randint truncates float bounds (the authors pass 2.5 and +-1.5): 2.5 -> 2, -1.5 -> -1
    return int(value)


def point_move_offsets(size: int, max_point_move: float, rng: np.random.Generator) -> np.ndarray:
    """``size`` integer moves of SEEM's control points: ``np.random.randint(-maxPiontMove,
    maxPiontMove)`` (common/utils.py lines 247-248), i.e. {-3, ..., 2} for ``rand_curve`` and
    {-1, 0} for ``rand_curve_small`` (its 1.5 truncated)."""
    return rng.integers(_int_bound(-max_point_move), _int_bound(max_point_move), size=size)


def _stroke(start: tuple[float, float], preset: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """One SEEM random-curve stroke: its control points after SEEM's random move, and its brush width.

    As ``get_mask_by_input_strokes`` (common/utils.py lines 134-213): brush width
    ``randint(*brushWidthBound)``; ``get_random_stroke_control_points`` (lines 252-290): a head that
    starts at ``start`` with a uniform angle and speed, accelerated uniformly at each of
    ``randint(*nVertexBound)`` vertices (speed clipped to [0, max]), no border gap; a half-normal
    line velocity (``get_random_velocity``, lines 293-302); ``random_move_control_points`` (lines
    232-249): the whole line shifted by int(speed * cos / sin), then a random half of the control
    points moved by ``randint(-maxPiontMove, maxPiontMove)`` in x and in y (the only strokes drawn).
    """
    lo_v, hi_v = preset["vertices"]
    max_speed = float(preset["max_head_speed"])
    d_speed, d_angle = preset["max_head_acceleration"]
    width_lo, width_hi = preset["brush_width"]
    width = int(rng.integers(_int_bound(width_lo), _int_bound(width_hi)))
    n = int(rng.integers(lo_v, hi_v))
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0, max_speed)
    xs, ys = [float(start[0])], [float(start[1])]
    for _ in range(n):
        speed = float(np.clip(speed + rng.uniform(-d_speed, d_speed), 0, max_speed))
        angle += rng.uniform(-d_angle, d_angle)
        xs.append(xs[-1] + speed * np.sin(angle))
        ys.append(ys[-1] + speed * np.cos(angle))
    x, y = np.array(xs), np.array(ys)
    line_speed = abs(rng.normal(0, float(preset["max_init_speed"]) / 2))
    line_angle = rng.uniform(0, 2 * np.pi)
    x += int(line_speed * np.cos(line_angle))
    y += int(line_speed * np.sin(line_angle))
    move = float(preset["max_point_move"])
    chosen = rng.permutation(len(x))[: int(len(x) * float(preset["move_point_ratio"]))]
    x[chosen] += point_move_offsets(len(chosen), move, rng)
    y[chosen] += point_move_offsets(len(chosen), move, rng)
    return x, y, width


def stroke_starts(foreground: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct random object pixels as stroke starts, N x 2 (x, y) float.

    As ``get_random_points_from_mask`` (common/utils.py lines 122-131) computes them under the
    authors' PyTorch 1.12: ``y = torch.div(index, w)`` is a TRUE division there, so a start's y is
    row + column / w (less than a pixel below the row); x is the column."""
    points = random_points(foreground, count, rng).astype(np.float64)
    points[:, 1] += points[:, 0] / foreground.shape[1]
    return points


def random_scribble(foreground: np.ndarray, num_strokes: int, rng: np.random.Generator, preset: str) -> np.ndarray:
    """SEEM's strokes from ``num_strokes`` random object pixels, intersected with the mask (H x W bool).

    Drawn as the authors draw them (``draw_mask_by_control_points``, common/utils.py lines 305-314):
    each segment a line of the brush width, a disc of radius width // 2 - 1 at every control point.
    A scribble whose strokes all leave the object (its random move can shift a stroke off a small
    object) stays empty, as the authors' ``(~strokes) * mask`` does (VRP_encoder.py line 82).
    """
    if preset not in STROKE_PRESETS:
        raise ModelError(f"unknown stroke preset {preset!r}; known: {sorted(STROKE_PRESETS)}")
    h, w = foreground.shape
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for start in stroke_starts(foreground, num_strokes, rng):
        x, y, width = _stroke((start[0], start[1]), STROKE_PRESETS[preset], rng)
        for i in range(1, len(x)):
            draw.line((x[i - 1], y[i - 1], x[i], y[i]), fill=1, width=width)
        radius = width // 2 - 1
        if radius >= 1:  # Pillow draws nothing for a zero-size ellipse either
            for cx, cy in zip(x, y):
                draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    return np.asarray(canvas, dtype=bool) & foreground


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
    ``training``: the authors' training draws (1..min(20, area) points; a random preset and
    1..min(20, area) strokes) instead of the test ones (min(20, area) points; :func:`scribble_plan`).
    Deterministic given ``seed``. Returns H x W for ``mask`` / ``box`` and the authors' 512 x 512
    frame for ``points`` / ``scribble`` (H x W for an object that vanishes in it); any of them covers
    the whole reference image (see the module docstring). Raises ModelError for an unknown type or an
    empty object.
    """
    if annotation_type not in ANNOTATION_TYPES:
        raise ModelError(f"unknown annotation type {annotation_type!r}; expected one of {ANNOTATION_TYPES}")
    if mask.ndim != 2:
        raise ModelError(f"reference mask must be H x W, got shape {mask.shape}")
    foreground = mask == 1
    if not foreground.any():
        raise ModelError("reference mask has no foreground pixel (empty or all-ignore): no annotation possible")
    rng = np.random.Generator(np.random.PCG64(seed))
    if annotation_type == "mask":
        out = foreground
    elif annotation_type == "box":
        out = draw_box(foreground.shape, box_of(foreground))
    else:
        canvas = authors_frame(foreground)
        if not canvas.any():  # thinner than the 512 sampling: drawn at the reference's own size
            canvas = foreground
        area = int(canvas.sum())
        if annotation_type == "points":
            most = min(MAX_POINTS, area)
            count = int(rng.integers(1, most + 1)) if training else most
            out = draw_points(canvas.shape, random_points(canvas, count, rng), point_style)
        else:
            preset, strokes = scribble_plan(area, training, rng)
            out = random_scribble(canvas, strokes, rng, preset)
    return out.astype(np.uint8)
