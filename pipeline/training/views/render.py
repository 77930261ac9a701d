"""Rendering views: an image and its masks through one geometric path (crop, resize, paste, flip),
colour jitter on the image only, and the rendered views as extraction items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from pipeline.errors import DataError
from pipeline.training.views.params import ViewParams


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
