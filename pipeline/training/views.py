"""How a feature cache serves SegIC's augmentations: seeded cached views, feature flips and warps.

SegIC trains on augmented views (large-scale jitter 0.1-2.0 for semantic data; random resized crop
0.3-1.0, colour jitter p=0.2, flip p=0.1 for instance data), so the exact view a step wants is never
in a cache. The decision (docs/segic_cache.md) is: cache ``V`` seeded views per image next to the
plain image, and serve any other view by warping the nearest cached feature map into it
(:func:`warp_features`; a horizontal flip is the special case :func:`flip_features`).

A view is data (:class:`ViewParams`): an integer crop box in the original image, the size the crop
is resized to, the offset at which it is pasted into a square ``canvas`` (negative = cropped), a flip
of the whole canvas, and colour-jitter factors. Its geometry is one affine map per axis from
original-image coordinates to canvas coordinates (:meth:`ViewParams.to_canvas`); the renderer
(:func:`apply_view`, :func:`apply_view_to_mask`) and the feature warp use that same map.

Plans are drawn per image from ``numpy.random.Generator(PCG64)`` seeded by ``(seed, sha256(image_id))``:
the same seed gives the same plan on any machine, independent of the other images in the list, and
the first ``V`` views of a plan with more views are the plan with ``V`` views. View ids
``"<image_id>_v<k>"`` are plain store image ids, so the unchanged extraction stage caches them:
:func:`render_view_items` writes each view as a lossless PNG and returns ``(view_id, path)`` items
for :func:`pipeline.extraction.stage.extract_store`.

Coordinates are continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``), the convention of
PIL's resize and of ``grid_sample(align_corners=False)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from pipeline.errors import ConfigError, DataError

_IMAGE_ID = re.compile(r"^[A-Za-z0-9_\-]+$")
_VIEW_SUFFIX = re.compile(r"^(?P<image>.+)_v(?P<view>\d+)$")


# --------------------------------------------------------------------------------------------------
# Configuration and view parameters
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentationConfig:
    """The distribution views are drawn from.

    ``mode="lsj"``: large-scale jitter (SegIC's semantic datasets): the whole image, longest side
    resized to ``scale * canvas`` (aspect kept), pasted at the top-left when smaller than the canvas
    (padding bottom/right) or randomly cropped to the canvas when larger (detectron2's
    ``ResizeScale`` + ``FixedSizeCrop``).
    ``mode="rrc"``: random resized crop (SegIC's instance datasets): torchvision's
    ``RandomResizedCrop`` box (area ``crop_area`` of the image, aspect in ``crop_ratio``, 10 tries,
    central fallback), resized (squashed) to ``canvas x canvas``.
    Both: horizontal flip with ``flip_prob``; colour jitter with ``jitter_prob`` in a fixed order
    (brightness, contrast, saturation, hue; torchvision's ColorJitter shuffles the order: fixed here
    so a view is a pure function of its parameters).
    SegIC does not give jitter strengths or an LSJ flip rate: 0.4/0.4/0.4/0.1 and 0.5 are assumptions.
    """

    mode: str = "lsj"
    canvas: int = 896
    scale_range: tuple[float, float] = (0.1, 2.0)
    crop_area: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_prob: float = 0.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in ("lsj", "rrc"):
            raise ConfigError(f"augmentation mode must be 'lsj' or 'rrc', got {self.mode!r}")
        if self.canvas <= 0:
            raise ConfigError(f"canvas must be positive, got {self.canvas}")
        for name in ("scale_range", "crop_area", "crop_ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ConfigError(f"{name} must be 0 < low <= high, got {(low, high)}")
        for name in ("flip_prob", "jitter_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def segic_semantic_config(canvas: int = 896) -> AugmentationConfig:
    """SegIC's semantic-data augmentation: LSJ 0.1-2.0 (+ flip 0.5, assumed: detectron2's LSJ recipe)."""
    return AugmentationConfig(mode="lsj", canvas=canvas, flip_prob=0.5, jitter_prob=0.0)


def segic_instance_config(canvas: int = 896) -> AugmentationConfig:
    """SegIC's instance-data augmentation: RRC 0.3-1.0, colour jitter p=0.2, flip p=0.1."""
    return AugmentationConfig(mode="rrc", canvas=canvas, flip_prob=0.1, jitter_prob=0.2)


@dataclass(frozen=True)
class ViewParams:
    """One augmented view of one image (all geometry in pixels of the original image / canvas).

    ``crop_*``: integer box of the original ``height x width`` image; it is resized to
    ``resize_w x resize_h`` and pasted into a ``canvas x canvas`` image at ``(offset_x, offset_y)``
    (negative offsets crop), then the canvas is flipped horizontally if ``flip``. Colour factors
    (``brightness``, ``contrast``, ``saturation``: multiplicative, 1 = identity; ``hue``: shift in
    [-0.5, 0.5], 0 = identity) act on the image only. ``scale`` is the drawn jitter factor (recorded;
    the geometry is fully given by the other fields).
    """

    image_id: str
    view: int
    height: int
    width: int
    canvas: int
    crop_x: int
    crop_y: int
    crop_w: int
    crop_h: int
    resize_w: int
    resize_h: int
    offset_x: int
    offset_y: int
    flip: bool
    scale: float = 1.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    def __post_init__(self) -> None:
        where = f"view {self.image_id!r}/{self.view}"
        if not (0 <= self.crop_x and 0 <= self.crop_y and self.crop_w > 0 and self.crop_h > 0
                and self.crop_x + self.crop_w <= self.width and self.crop_y + self.crop_h <= self.height):
            raise DataError(
                f"{where}: crop box (x={self.crop_x}, y={self.crop_y}, w={self.crop_w}, h={self.crop_h}) "
                f"is not inside the {self.width}x{self.height} image"
            )
        if self.resize_w <= 0 or self.resize_h <= 0 or self.canvas <= 0:
            raise DataError(f"{where}: resize size and canvas must be positive")
        if not -0.5 <= self.hue <= 0.5 or min(self.brightness, self.contrast, self.saturation) < 0:
            raise DataError(f"{where}: invalid colour factors")

    @property
    def view_id(self) -> str:
        return view_id(self.image_id, self.view)

    @property
    def has_colour_jitter(self) -> bool:
        return (self.brightness, self.contrast, self.saturation, self.hue) != (1.0, 1.0, 1.0, 0.0)

    def to_canvas(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Original-image coordinates -> canvas coordinates (the exact map the renderer applies)."""
        cx = (x - self.crop_x) * (self.resize_w / self.crop_w) + self.offset_x
        cy = (y - self.crop_y) * (self.resize_h / self.crop_h) + self.offset_y
        return (self.canvas - cx if self.flip else cx), cy

    def from_canvas(self, cx: torch.Tensor, cy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvas coordinates -> original-image coordinates (inverse of :meth:`to_canvas`)."""
        cx = self.canvas - cx if self.flip else cx
        x = (cx - self.offset_x) * (self.crop_w / self.resize_w) + self.crop_x
        y = (cy - self.offset_y) * (self.crop_h / self.resize_h) + self.crop_y
        return x, y

    def visible_box(self) -> tuple[float, float, float, float]:
        """The original-image box ``(x0, y0, x1, y1)`` that appears on the canvas."""
        left, right = max(self.offset_x, 0), min(self.offset_x + self.resize_w, self.canvas)
        top, bottom = max(self.offset_y, 0), min(self.offset_y + self.resize_h, self.canvas)
        sx, sy = self.crop_w / self.resize_w, self.crop_h / self.resize_h
        return (
            self.crop_x + (left - self.offset_x) * sx,
            self.crop_y + (top - self.offset_y) * sy,
            self.crop_x + (right - self.offset_x) * sx,
            self.crop_y + (bottom - self.offset_y) * sy,
        )

    def pixels_per_pixel(self) -> float:
        """Linear magnification, canvas pixels per original pixel (geometric mean of both axes)."""
        return math.sqrt((self.resize_w / self.crop_w) * (self.resize_h / self.crop_h))


VIEW_PATH_SEPARATOR = "--"  # what "/" of a nested image id becomes in a view id


def view_id(image_id: str, view: int) -> str:
    """Store key of view ``view`` of ``image_id``: ``"<image_id>_v<view>"`` (no dots: WebDataset and
    the store split member names at the first dot).

    THE one place where an image id becomes a view's key: a view id also names the rendered PNG
    (:func:`render_view_items`), so the ``"/"`` of a nested id (FSS-1000's ``"<class>/<n>"``)
    becomes ``VIEW_PATH_SEPARATOR`` (``"apple/3"`` -> ``"apple--3_v0"``; two ids that meet there are
    refused as a duplicate by the store builder). Plain images keep their id as their store key (the
    store takes any string, ``"/"`` included; tested)."""
    image_id = str(image_id)
    key = image_id.replace("/", VIEW_PATH_SEPARATOR)
    if not _IMAGE_ID.match(key):
        raise DataError(f"image id {image_id!r} cannot name a cached view: use [A-Za-z0-9_-/] only (no dots)")
    if view < 0:
        raise DataError(f"view index of {image_id!r} must be >= 0, got {view}")
    return f"{key}_v{view}"


def parse_view_id(key: str) -> tuple[str, int]:
    """``"<image_id>_v<k>"`` -> ``(image_id, k)`` (a nested id in its key form, ``"apple--3"``)."""
    match = _VIEW_SUFFIX.match(key)
    if not match:
        raise DataError(f"{key!r} is not a view id ('<image_id>_v<k>')")
    return match.group("image"), int(match.group("view"))


def base_view(image_id: str, height: int, width: int, canvas: int, keep_aspect: bool = False) -> ViewParams:
    """The un-augmented image as a plain store of it holds it. ``keep_aspect=False``: squashed to the
    canvas (MobileNetV2 / VRP-SAM at 512); ``True``: longest side to the canvas, padded bottom/right
    (SAM's and SegIC's DINOv2 preprocessing). View index -1: not a cached view."""
    if keep_aspect:
        factor = canvas / max(height, width)
        size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    else:
        size = (canvas, canvas)
    return ViewParams(str(image_id), -1, height, width, canvas, 0, 0, width, height, *size, 0, 0, False)


# --------------------------------------------------------------------------------------------------
# Drawing plans
# --------------------------------------------------------------------------------------------------
def image_generator(seed: int, image_id: str, stream: str = "plan") -> np.random.Generator:
    """A PCG64 generator for one image, from ``seed``, ``sha256(image_id)`` and a stream name:
    identical on every machine, and independent of which other images are planned."""
    digest = hashlib.sha256(f"{stream}\0{image_id}".encode()).digest()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int.from_bytes(digest[:8], "little")])))


def _rrc_box(rng: np.random.Generator, height: int, width: int, config: AugmentationConfig) -> tuple[int, int, int, int]:
    # torchvision.transforms.RandomResizedCrop.get_params, drawn from our generator.
    area = height * width
    log_ratio = (math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*config.crop_area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
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


# --------------------------------------------------------------------------------------------------
# Rendering views (image and masks share one geometric path)
# --------------------------------------------------------------------------------------------------
def _geometric(array: np.ndarray, view: ViewParams, resample: int, fill: int) -> np.ndarray:
    """Crop, resize, paste and flip an ``H x W`` or ``H x W x C`` uint8 array as ``view`` says."""
    if array.shape[:2] != (view.height, view.width):
        raise DataError(
            f"view {view.view_id if view.view >= 0 else view.image_id}: array of shape {array.shape[:2]} "
            f"but the plan was drawn for {view.height}x{view.width}"
        )
    crop = array[view.crop_y : view.crop_y + view.crop_h, view.crop_x : view.crop_x + view.crop_w]
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((view.resize_w, view.resize_h), resample))
    canvas = np.full((view.canvas, view.canvas, *array.shape[2:]), fill, dtype=array.dtype)
    left, top = max(view.offset_x, 0), max(view.offset_y, 0)
    right = min(view.offset_x + view.resize_w, view.canvas)
    bottom = min(view.offset_y + view.resize_h, view.canvas)
    if right > left and bottom > top:
        canvas[top:bottom, left:right] = resized[
            top - view.offset_y : bottom - view.offset_y, left - view.offset_x : right - view.offset_x
        ]
    return np.ascontiguousarray(canvas[:, ::-1]) if view.flip else canvas


def _colour(image: np.ndarray, view: ViewParams) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(image).transpose(2, 0, 1).copy())
    tensor = TF.adjust_brightness(tensor, view.brightness)
    tensor = TF.adjust_contrast(tensor, view.contrast)
    tensor = TF.adjust_saturation(tensor, view.saturation)
    tensor = TF.adjust_hue(tensor, view.hue)
    return tensor.numpy().transpose(1, 2, 0).copy()


def apply_view(image: np.ndarray, view: ViewParams, fill: int = 0) -> np.ndarray:
    """``H x W x 3`` uint8 RGB -> ``canvas x canvas x 3`` uint8: the view, exactly.

    Colour jitter acts on the crop before resizing (so padding never enters the contrast mean and
    a flip commutes with it); then PIL-bilinear resize, paste on a ``fill`` canvas, flip.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"image {view.image_id!r}: expected an HxWx3 uint8 array, got {image.shape} {image.dtype}")
    if view.has_colour_jitter:
        # Jitter the crop region only, then run the geometric path on the jittered image.
        jittered = image.copy()
        box = (slice(view.crop_y, view.crop_y + view.crop_h), slice(view.crop_x, view.crop_x + view.crop_w))
        jittered[box] = _colour(image[box], view)
        image = jittered
    return _geometric(image, view, Image.BILINEAR, fill)


def apply_view_to_mask(mask: np.ndarray, view: ViewParams, fill: int = 0) -> np.ndarray:
    """``H x W`` bool/uint8 mask -> ``canvas x canvas`` of the same dtype (nearest, geometric ops only).

    ``fill`` marks canvas pixels outside the image: 0 for instance masks, ``IGNORE_INDEX`` (255)
    for evaluation masks so padding is neither foreground nor background.
    """
    if mask.ndim != 2:
        raise DataError(f"mask of image {view.image_id!r}: expected H x W, got shape {mask.shape}")
    out = _geometric(mask.astype(np.uint8), view, Image.NEAREST, int(fill))
    return out.astype(bool) if mask.dtype == bool else out.astype(mask.dtype)


def apply_view_to_instances(instances: Iterable[tuple[int, np.ndarray]], view: ViewParams) -> list[tuple[int, np.ndarray]]:
    """``CocoInstances.instance_masks`` output -> the same instances in the view (empty ones dropped)."""
    out = []
    for class_id, mask in instances:
        rendered = apply_view_to_mask(mask, view, fill=0)
        if rendered.any():
            out.append((class_id, rendered))
    return out


def render_view_items(
    plan: Sequence[ViewParams], load_image: Callable[[str], np.ndarray], out_dir: str | Path
) -> list[tuple[str, str]]:
    """Render every view as a lossless PNG ``out_dir/<view_id>.png``; returns ``(view_id, path)`` items
    for the unchanged extraction stage (``extract_store(items, ...)``). Existing files are reused
    (renders are deterministic), so an interrupted render resumes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items, current, image = [], None, None
    for view in plan:
        path = out_dir / f"{view.view_id}.png"
        if not path.is_file():
            if view.image_id != current:
                current, image = view.image_id, load_image(view.image_id)
            partial = path.with_suffix(".png.partial")
            Image.fromarray(apply_view(image, view)).save(partial, format="PNG")
            partial.replace(path)
        items.append((view.view_id, str(path)))
    return items


# --------------------------------------------------------------------------------------------------
# Feature-space views
# --------------------------------------------------------------------------------------------------
def flip_features(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Horizontal flip of cached feature maps ``{name: ... x h x w}`` (width = last axis).

    Exact only for a flip-equivariant encoder. Neither encoder family here is: TF-SAME padding pads
    right/bottom only (MobileNetV2), ViT position embeddings are not mirror-symmetric (DINOv2, SAM),
    and learned filters are not mirror-symmetric. The error is measured in docs/segic_cache.md.
    """
    return {name: torch.flip(value, dims=(-1,)) for name, value in features.items()}


def warp_grid(source: ViewParams, target: ViewParams, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each cell of ``target``'s ``height x width`` feature grid lies in ``source``'s feature map.

    Feature cell ``(i, j)`` is centred on canvas ``((j + 0.5) * canvas / width, ...)`` (the encoders
    squash the square canvas to their input; a geometric receptive-field offset for TF-SAME padding
    was tried and made MobileNetV2's flips worse, see docs/segic_cache.md), so its centre maps
    through target canvas -> original image -> source canvas -> source cell index.
    Returns ``(grid, valid)``: ``1 x h x w x 2`` in ``grid_sample``'s ``align_corners=False``
    coordinates, and ``h x w`` bool, True where the point is image content in both views (not
    padding, not outside the source view).
    """
    if source.image_id != target.image_id or (source.height, source.width) != (target.height, target.width):
        raise DataError(f"cannot warp view of {source.image_id!r} into a view of {target.image_id!r}")
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) * target.canvas / height
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) * target.canvas / width
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    ox, oy = target.from_canvas(cx, cy)
    sx, sy = source.to_canvas(ox, oy)

    def inside(view: ViewParams, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x0, y0, x1, y1 = view.visible_box()
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)

    valid = inside(target, ox, oy) & inside(source, ox, oy)
    grid = torch.stack((2 * sx / source.canvas - 1, 2 * sy / source.canvas - 1), dim=-1)[None]
    return grid.float(), valid


def warp_features(
    features: Mapping[str, torch.Tensor], source: ViewParams, target: ViewParams
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Serve view ``target`` from the cached features of view ``source`` of the same image.

    Args:
        features: {name: C x h x w} of ``source`` (any float dtype).
    Returns:
        ({name: C x h x w float32} bilinearly resampled at ``target``'s cell centres (edge cells
        replicated between the last centre and the image border), zero where ``target`` shows
        content ``source`` does not have), ({name: h x w bool} valid cells).
        With ``source == target`` this is the identity; with only ``flip`` differing it is
        :func:`flip_features` (both exact up to float rounding, tested).
    """
    warped, valid = {}, {}
    for name, value in features.items():
        if value.ndim != 3:
            raise DataError(f"feature {name!r}: expected C x h x w, got shape {tuple(value.shape)}")
        height, width = value.shape[-2:]
        grid, ok = warp_grid(source, target, height, width)
        sampled = F.grid_sample(value[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        warped[name] = sampled * ok.to(sampled.dtype)
        valid[name] = ok
    return warped, valid


def view_coverage(query: ViewParams, cached: ViewParams) -> float:
    """Fraction of ``query``'s visible original-image area that ``cached`` also shows."""
    qx0, qy0, qx1, qy1 = query.visible_box()
    cx0, cy0, cx1, cy1 = cached.visible_box()
    inter = max(0.0, min(qx1, cx1) - max(qx0, cx0)) * max(0.0, min(qy1, cy1) - max(qy0, cy0))
    area = max(qx1 - qx0, 0.0) * max(qy1 - qy0, 0.0)
    return inter / area if area > 0 else 0.0


def nearest_view(query: ViewParams, cached: Sequence[ViewParams]) -> ViewParams:
    """The cached view that best serves ``query``: coverage x resolution match
    (``min(r, 1/r)``, r = ratio of magnifications), so a view that shows the query's content at a
    similar resolution wins. Flip and colour are ignored (the warp flips; colour cannot be served)."""
    if not cached:
        raise DataError(f"no cached view of image {query.image_id!r} to serve the query from")

    def score(view: ViewParams) -> float:
        ratio = view.pixels_per_pixel() / query.pixels_per_pixel()
        return view_coverage(query, view) * min(ratio, 1 / ratio)

    return max(cached, key=score)
