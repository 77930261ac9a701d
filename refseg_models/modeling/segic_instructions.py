"""SegIC's in-context instructions as pure functions (paper section 3.2, authors' ``model/segic.py``).

* instance feature: masked mean of the reference features (the "visual instruction" before its
  projection, and the prototype the geometric instruction is computed from);
* geometric instruction: cosine map between the target features and that instance feature, used as
  the dense mask prompt, plus its top-k location(s) as positive point prompt(s);
* box of a binary mask (SegIC feeds the target's GT box as an extra prompt with p = 0.5 in training).

Everything here is differentiable where it needs to be and has no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refseg_models.errors import ModelError


def instance_features(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked mean of ``features`` over ``masks`` (authors' ``extract_inst_feat``).

    Args:
        features: N x C x h x w feature maps.
        masks: N x H x W masks in {0, 1} (any resolution; float or bool).

    Returns:
        N x C instance features. The mask is resized bilinearly to h x w and thresholded at 0.5,
        and the sum is divided by max(area, 1), as the authors do, so an empty mask gives a zero
        vector instead of NaN.
    """
    if features.dim() != 4 or masks.dim() != 3 or features.shape[0] != masks.shape[0]:
        raise ModelError(
            f"instance_features expects N x C x h x w features and N x H x W masks, got "
            f"{tuple(features.shape)} and {tuple(masks.shape)}"
        )
    h, w = features.shape[-2:]
    small = F.interpolate(masks[:, None].float(), (h, w), mode="bilinear", align_corners=False)[:, 0]
    small = (small > 0.5).to(features.dtype)
    area = small.sum(dim=(-1, -2)).clamp(min=1.0)
    return torch.einsum("nchw,nhw->nc", features, small) / area[:, None]


def cosine_similarity_map(
    features: torch.Tensor, prototypes: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Cosine similarity of every position of ``features`` with each prototype.

    Args:
        features: C x h x w target features (one image).
        prototypes: n x C instance features.

    Returns:
        n x h x w similarities in [-1, 1] (``eps`` guards zero vectors: an empty reference mask
        gives a zero prototype and therefore an all-zero map).
    """
    flat = features.flatten(1)  # C x hw
    numerator = prototypes @ flat  # n x hw
    norms = prototypes.norm(dim=1, keepdim=True) * flat.norm(dim=0, keepdim=True)
    return (numerator / norms.clamp(min=eps)).view(prototypes.shape[0], *features.shape[-2:])


def top_points(score_maps: torch.Tensor, num_points: int = 1) -> torch.Tensor:
    """Locations of the ``num_points`` highest values of each map, as (x, y) pixel coordinates.

    Args:
        score_maps: n x H x W maps.

    Returns:
        n x num_points x 2 float (x, y) in the maps' own pixel grid (the authors' ``get_max`` with
        ``target_hw`` equal to the map size; SAM's prompt encoder adds the half-pixel shift).
    """
    n, _, w = score_maps.shape
    index = score_maps.reshape(n, -1).topk(num_points, dim=-1).indices
    xs = (index % w).to(score_maps.dtype)
    ys = torch.div(index, w, rounding_mode="floor").to(score_maps.dtype)
    return torch.stack([xs, ys], dim=-1)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight (x0, y0, x1, y1) boxes of binary masks in pixel coordinates (inclusive max index).

    Args:
        masks: N x H x W.

    Returns:
        N x 4 float. An empty mask gives the box (0, 0, 0, 0).
    """
    n, h, w = masks.shape
    binary = masks > 0.5
    boxes = torch.zeros(n, 4, dtype=torch.float32, device=masks.device)
    rows = binary.any(dim=2)  # N x H
    cols = binary.any(dim=1)  # N x W
    ys = torch.arange(h, device=masks.device)
    xs = torch.arange(w, device=masks.device)
    for i in range(n):
        if rows[i].any():
            y = ys[rows[i]]
            x = xs[cols[i]]
            boxes[i] = torch.stack([x.min(), y.min(), x.max(), y.max()]).float()
    return boxes


def geometric_instruction(
    target_features: torch.Tensor,
    prototypes: torch.Tensor,
    input_size: int,
    similarity_size: int | None,
    num_points: int = 1,
    tau: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SegIC's geometric instruction for one target image and n instructions (authors' code path).

    The target features are bilinearly upsampled to ``similarity_size`` (the authors use
    input_size // 4), the cosine map with each prototype is computed there, averaged over the k
    shots of an instruction (k-shot extension; the paper is 1-shot), upsampled bilinearly to
    ``input_size`` and divided by ``tau``; the top-``num_points`` locations of each map become
    positive points.

    Args:
        target_features: C x h x w features of the target (raw encoder features, not the neck).
        prototypes: n x k x C instance features (k shots per instruction).
        input_size: side of the (square, padded) model input frame, e.g. 896.
        similarity_size: side at which similarities are computed; None keeps the feature grid.

    Returns:
        (dense n x 1 x input_size x input_size maps, points n x num_points x 2 in input pixels).
    """
    if prototypes.dim() != 3:
        raise ModelError(f"prototypes must be n x k x C, got {tuple(prototypes.shape)}")
    n, k, c = prototypes.shape
    features = target_features
    if similarity_size is not None and features.shape[-1] != similarity_size:
        features = F.interpolate(
            features[None], (similarity_size, similarity_size), mode="bilinear", align_corners=False
        )[0]
    similarity = cosine_similarity_map(features, prototypes.reshape(n * k, c))
    similarity = similarity.view(n, k, *similarity.shape[-2:]).mean(dim=1, keepdim=True)
    dense = F.interpolate(similarity, (input_size, input_size), mode="bilinear", align_corners=False)
    dense = dense / tau
    return dense, top_points(dense[:, 0], num_points)
