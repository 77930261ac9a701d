"""Drawing views: per-image seeded generators, torchvision's random resized crop, one view, a plan of
``V`` views per image, and plans as files.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, DataError
from pipeline.training.views.params import AugmentationConfig, ViewParams, view_id


def image_generator(seed: int, image_id: str, stream: str = "plan") -> np.random.Generator:
    """A PCG64 generator for one image, from ``seed``, ``sha256(image_id)`` and a stream name:
    identical on every machine, and independent of which other images are planned."""
    digest = hashlib.sha256(f"{stream}\0{image_id}".encode()).digest()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")])))


def random_resized_crop(
    rng: np.random.Generator, height: int, width: int, area: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int] | None:
    """torchvision's ``RandomResizedCrop.get_params`` drawn from ``rng``: ``(x0, y0, w, h)`` of the
    first of 10 tries that fits the image, or None when none does (the caller's fallback). The one
    random-resized-crop draw: SegIC's cached views and the proxy SAM's training views."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = height * width * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    return None


def _rrc_box(rng: np.random.Generator, height: int, width: int, config: AugmentationConfig) -> tuple[int, int, int, int]:
    # torchvision's draw, and its fallback: the largest central crop of an allowed aspect
    box = random_resized_crop(rng, height, width, config.crop_area, config.crop_ratio)
    if box is not None:
        return box
    ratio = width / height
    if ratio < config.crop_ratio[0]:
        w, h = width, int(round(width / config.crop_ratio[0]))
    elif ratio > config.crop_ratio[1]:
        h, w = height, int(round(height * config.crop_ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def draw_view(
    rng: np.random.Generator, image_id: str, view: int, height: int, width: int, config: AugmentationConfig
) -> ViewParams:
    """Draw one view from ``config``'s distribution (consumes ``rng``; same draws -> same view)."""
    if height <= 0 or width <= 0:
        raise DataError(f"image {image_id!r}: invalid size {width}x{height}")
    canvas = config.canvas
    scale = 1.0
    if config.mode == "lsj":
        scale = float(rng.uniform(*config.scale_range))
        factor = scale * canvas / max(height, width)
        resize_w, resize_h = max(1, int(round(width * factor))), max(1, int(round(height * factor)))
        # FixedSizeCrop: a random window when larger than the canvas, padding bottom/right otherwise.
        offset_x = -int(rng.integers(0, resize_w - canvas + 1)) if resize_w > canvas else 0
        offset_y = -int(rng.integers(0, resize_h - canvas + 1)) if resize_h > canvas else 0
        crop = (0, 0, width, height)
    else:
        crop = _rrc_box(rng, height, width, config)
        resize_w = resize_h = canvas
        offset_x = offset_y = 0
    flip = bool(rng.uniform() < config.flip_prob)
    colour = (1.0, 1.0, 1.0, 0.0)
    if rng.uniform() < config.jitter_prob:
        colour = (
            float(rng.uniform(1 - config.brightness, 1 + config.brightness)),
            float(rng.uniform(1 - config.contrast, 1 + config.contrast)),
            float(rng.uniform(1 - config.saturation, 1 + config.saturation)),
            float(rng.uniform(-config.hue, config.hue)),
        )
    return ViewParams(
        str(image_id), view, height, width, canvas, *crop, resize_w, resize_h, offset_x, offset_y, flip, scale, *colour
    )


def plan_views(
    sizes: Mapping[str, tuple[int, int]], num_views: int, seed: int, config: AugmentationConfig
) -> list[ViewParams]:
    """``num_views`` views per image; ``sizes``: {image_id: (height, width)}. Sorted by (image id, view).

    View ``k`` of an image depends only on ``(seed, image_id, k)``: a plan with more views extends
    one with fewer, and adding images never changes the views of the others.
    """
    if num_views <= 0:
        raise ConfigError(f"num_views must be positive, got {num_views}")
    plan = []
    for image_id in sorted(sizes, key=str):
        height, width = sizes[image_id]
        view_id(str(image_id), 0)  # validates the id early, naming it
        rng = image_generator(seed, str(image_id))
        plan.extend(draw_view(rng, str(image_id), k, int(height), int(width), config) for k in range(num_views))
    return plan


_FIELD_TYPES = {f.name: f.type for f in fields(ViewParams)}
_CASTS: dict[str, Callable] = {"str": str, "int": int, "bool": bool, "float": float}


def write_plan(plan: Sequence[ViewParams], path: str | Path) -> Path:
    """Write a plan as ``.parquet`` (one row per view) or ``.json`` (a list of objects)."""
    path = Path(path)
    rows = [asdict(view) for view in plan]
    if path.suffix == ".parquet":
        columns = {name: [row[name] for row in rows] for name in _FIELD_TYPES}
        pq.write_table(pa.table(columns), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    else:
        raise ConfigError(f"plan file {path} must end in .parquet or .json")
    return path


def read_plan(path: str | Path) -> list[ViewParams]:
    """Read a plan written by :func:`write_plan`; malformed files raise DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"view plan not found: {path}")
    try:
        if path.suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        elif path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            raise ConfigError(f"plan file {path} must end in .parquet or .json")
    except (pa.ArrowInvalid, json.JSONDecodeError, OSError) as error:
        raise DataError(f"view plan {path} is unreadable: {error}") from error
    plan = []
    for number, row in enumerate(rows):
        missing = set(_FIELD_TYPES) - set(row)
        if missing:
            raise DataError(f"view plan {path}: row {number} lacks {sorted(missing)}")
        try:
            plan.append(ViewParams(**{name: _CASTS[str(kind)](row[name]) for name, kind in _FIELD_TYPES.items()}))
        except DataError as error:
            raise DataError(f"view plan {path}: row {number}: {error}") from error
    return plan
