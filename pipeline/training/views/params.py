"""A view of an image as data: the augmentation distribution (:class:`AugmentationConfig`), one
view's parameters (:class:`ViewParams`, its geometry one affine map per axis), and view ids.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError, DataError

_IMAGE_ID = re.compile(r"^[A-Za-z0-9_\-]+$")
_VIEW_SUFFIX = re.compile(r"^(?P<image>.+)_v(?P<view>\d+)$")


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
