"""Serving a view from cached features: flips and warps in feature space, and the nearest cached view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import DataError
from pipeline.training.views.params import ViewParams


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
