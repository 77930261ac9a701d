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

Modules by concept: :mod:`.params` (a view as data, view ids), :mod:`.plans` (drawing views and
plans, plan files), :mod:`.render` (images and masks through a view) and :mod:`.warp` (serving a
view from cached features).
"""

from pipeline.training.views.params import AugmentationConfig, VIEW_PATH_SEPARATOR, ViewParams, base_view, parse_view_id, segic_instance_config, segic_semantic_config, view_id
from pipeline.training.views.plans import draw_view, image_generator, plan_views, random_resized_crop, read_plan, write_plan
from pipeline.training.views.render import apply_view, apply_view_to_instances, apply_view_to_mask, render_view_items
from pipeline.training.views.warp import flip_features, nearest_view, view_coverage, warp_features, warp_grid

__all__ = [
    "AugmentationConfig",
    "VIEW_PATH_SEPARATOR",
    "ViewParams",
    "apply_view",
    "apply_view_to_instances",
    "apply_view_to_mask",
    "base_view",
    "draw_view",
    "flip_features",
    "image_generator",
    "nearest_view",
    "parse_view_id",
    "plan_views",
    "random_resized_crop",
    "read_plan",
    "render_view_items",
    "segic_instance_config",
    "segic_semantic_config",
    "view_coverage",
    "view_id",
    "warp_features",
    "warp_grid",
    "write_plan",
]
