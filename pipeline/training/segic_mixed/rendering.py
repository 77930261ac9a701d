"""Label masks into the model's frame through a side's view (worker side), and a sample's sides."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import DataError
from pipeline.training.segic_mixed.part import MixPart
from pipeline.training.views import ViewParams, warp_features
from refseg_models.frames import Frame


# --------------------------------------------------------------------------------------------------
# Geometry: label masks into the model's frame through a side's view
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _nearest_index(size_in: int, size_out: int) -> torch.Tensor:
    """PIL's NEAREST resampling as an index map (exactly what ``apply_view_to_mask`` does)."""
    row = np.arange(size_in, dtype=np.int32)[None, :]
    return torch.from_numpy(np.asarray(Image.fromarray(row, mode="I").resize((size_out, 1), Image.NEAREST))[0].astype(np.int64))


def render_masks(masks: torch.Tensor, view: ViewParams, fill: int) -> torch.Tensor:
    """``N x H x W`` uint8 masks -> ``N x canvas x canvas`` through ``view`` (crop, PIL-nearest resize,
    paste on a ``fill`` canvas, flip): :func:`~pipeline.training.views.apply_view_to_mask` for N masks at
    once, pixel for pixel (tested)."""
    if tuple(masks.shape[1:]) != (view.height, view.width):
        raise DataError(f"view of {view.image_id!r}: masks of shape {tuple(masks.shape[1:])}, the plan says {view.height}x{view.width}")
    crop = masks[:, view.crop_y : view.crop_y + view.crop_h, view.crop_x : view.crop_x + view.crop_w]
    resized = crop[:, _nearest_index(view.crop_h, view.resize_h)][:, :, _nearest_index(view.crop_w, view.resize_w)]
    canvas = torch.full((masks.shape[0], view.canvas, view.canvas), fill, dtype=masks.dtype)
    left, top = max(view.offset_x, 0), max(view.offset_y, 0)
    right, bottom = min(view.offset_x + view.resize_w, view.canvas), min(view.offset_y + view.resize_h, view.canvas)
    if right > left and bottom > top:
        canvas[:, top:bottom, left:right] = resized[
            :, top - view.offset_y : bottom - view.offset_y, left - view.offset_x : right - view.offset_x
        ]
    return canvas.flip(-1) if view.flip else canvas


def _to_frame(masks: torch.Tensor, frame: Frame, fill: int) -> torch.Tensor:
    """``N x H x W`` -> ``N x S x S`` uint8 exactly as :meth:`Frame.mask_to_frame` (nearest, padding ``fill``)."""
    vh, vw = frame.valid
    out = F.interpolate(masks[:, None].float(), (vh, vw), mode="nearest")
    return F.pad(out, (0, frame.size - vw, 0, frame.size - vh), value=float(fill))[:, 0].to(torch.uint8)


@dataclass
class Side:
    """One side (target or reference) of a sample: which store entry, and how it is served.

    ``view``: the view the side shows (None = the plain image as the store holds it);
    ``feature_flip``: the stored features are flipped in feature space (a cached view's flip
    toggled, or the plain image mirrored); ``warp_from``: for a fresh ``view``, the cached view (or
    plain image, as :func:`~pipeline.training.views.base_view`) its features are warped from.
    """

    part: MixPart
    image_id: str
    store_id: str
    view: ViewParams | None
    feature_flip: bool = False
    warp_from: ViewParams | None = None

    def features(self, raw: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(C x h x w float32 features, h x w bool valid cells or None)."""
        if self.warp_from is not None:
            warped, valid = warp_features({key: raw}, self.warp_from, self.view)
            return warped[key], valid[key]
        return (torch.flip(raw, dims=(-1,)) if self.feature_flip else raw), None
