"""Exact CPU-side image preprocessing for the frozen encoders.

All functions take an ``H x W x 3`` uint8 RGB numpy array and are deterministic.

Resizing decisions (they decide numerical parity with the authors' code):

* VRP-SAM / FCP (HSNet-derived data code): the PIL image goes through torchvision's
  ``transforms.Resize((512, 512))`` - on a PIL image that is ``PIL.Image.resize(..., BILINEAR)``
  (PIL's bilinear filter widens its support when downsampling, i.e. it antialiases, and rounds to
  uint8) - then ``ToTensor`` (/255) and ``Normalize`` with ImageNet mean/std. :func:`squash_resize`
  reproduces this with PIL directly. The SAM input is that normalised 512 tensor resized to 1024 by
  ``F.interpolate(mode="bilinear", align_corners=True)`` inside the model (VRP-SAM's ``SAM_pred``);
  see :func:`vrp_upsample_to_sam`.
* SAM standard: segment_anything's ``ResizeLongestSide`` (PIL bilinear via torchvision) to 1024 on
  the longest side, ``(x - pixel_mean) / pixel_std`` with ImageNet mean/std * 255, zero padding at the
  bottom/right to 1024x1024 (exactly ``Sam.preprocess``).
* SegIC / DINOv2: ``ResizeLongestSide`` to 896 (14 * 64), ImageNet normalisation, padded area zero
  after normalisation (same construction as SAM's, other size).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from refseg_models.errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SAM's Sam.pixel_mean / pixel_std: ImageNet statistics on the [0, 255] scale.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an ``H x W x 3`` uint8 RGB array (raises ``ModelError``, a ValueError, naming what is wrong)."""
    if not isinstance(image, np.ndarray):
        raise ModelError(f"expected an HxWx3 uint8 numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ModelError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ModelError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ModelError(f"empty image of shape {image.shape}")
    return image


def squash_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size x size`` without keeping the aspect ratio, PIL bilinear (torchvision's
    ``Resize`` on a PIL image). Returns ``size x size x 3`` uint8."""
    check_image(image)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def to_chw_float(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``3 x H x W`` float32 in [0, 255] (a copy; the input is not touched)."""
    return torch.from_numpy(np.ascontiguousarray(image).transpose(2, 0, 1).copy()).float()


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel on a ``3 x H x W`` tensor."""
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def vrp_squash_imagenet(image: np.ndarray, size: int = 512) -> torch.Tensor:
    """VRP-SAM's input: PIL-bilinear squash to ``size``, /255, ImageNet mean/std -> ``3 x size x size``."""
    x = to_chw_float(squash_resize(image, size)) / 255.0
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def vrp_upsample_to_sam(batch: torch.Tensor, size: int = 1024) -> torch.Tensor:
    """VRP-SAM's ``SAM_pred.forward_img_encoder`` resize: ``B x 3 x 512 x 512`` normalised ->
    ``B x 3 x size x size`` with ``F.interpolate(bilinear, align_corners=True)``."""
    return F.interpolate(batch, (size, size), mode="bilinear", align_corners=True)


def longest_side_pad(
    image: np.ndarray,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Longest side to ``size`` (segment_anything's ``ResizeLongestSide``), normalise with
    ``mean``/``std`` (same scale as the pixels: [0, 255]), zero-pad bottom/right to ``size x size``.

    Returns:
        (``3 x size x size`` float32, (h, w) of the resized image before padding).
    """
    check_image(image)
    resized = ResizeLongestSide(size).apply_image(image)
    h, w = resized.shape[:2]
    x = normalize(to_chw_float(resized), mean, std)
    # Padding after normalisation: the padded area is exactly 0 in the encoder input.
    return F.pad(x, (0, size - w, 0, size - h)), (h, w)


def sam_longest_pad(image: np.ndarray, size: int = 1024) -> torch.Tensor:
    """SAM's standard preprocessing (``SamPredictor.set_image`` + ``Sam.preprocess``) -> ``3 x size x size``."""
    return longest_side_pad(image, size, SAM_PIXEL_MEAN, SAM_PIXEL_STD)[0]


def segic_longest_pad(image: np.ndarray, size: int = 896) -> torch.Tensor:
    """SegIC's DINOv2 input: longest side ``size``, ImageNet mean/std, padded area zeroed after
    normalisation -> ``3 x size x size``."""
    mean255 = tuple(255.0 * m for m in IMAGENET_MEAN)
    std255 = tuple(255.0 * s for s in IMAGENET_STD)
    return longest_side_pad(image, size, mean255, std255)[0]


def tf128_squash(image: np.ndarray, size: int = 512) -> torch.Tensor:
    """The TF MobileNetV2's input: PIL-bilinear squash to ``size``, then ``(x - 128) / 128``."""
    return (to_chw_float(squash_resize(image, size)) - 128.0) / 128.0


def imagenet_squash(image: np.ndarray, size: int) -> torch.Tensor:
    """PIL-bilinear squash to ``size``, /255, ImageNet mean/std (VRP-SAM's transform at any size)."""
    return vrp_squash_imagenet(image, size)


_PREPROCESSORS = {
    # Backbones and SAM in VRP-SAM mode share one 512 tensor (SAM upsamples it inside forward).
    "vrp512_squash_imagenet": partial(vrp_squash_imagenet, size=512),
    "vrp512_to1024_imagenet": partial(vrp_squash_imagenet, size=512),
    "vrp512_squash_tf128": partial(tf128_squash, size=512),
    "sam_longest1024_pad": partial(sam_longest_pad, size=1024),
}


def get_preprocessor(preprocessing_id: str) -> Callable[[np.ndarray], torch.Tensor]:
    """The preprocessing function named by an encoder's ``preprocessing_id``, without building the
    encoder (Ray Data decode tasks need the function, not the weights). Also parses the DINOv2 ids
    ``longest{S}_pad_imagenet`` and ``squash{S}_imagenet``."""
    if preprocessing_id in _PREPROCESSORS:
        return _PREPROCESSORS[preprocessing_id]
    backbone = re.fullmatch(r"vrp(\d+)_squash_(imagenet|tf128)", preprocessing_id)
    if backbone:  # the class-consistent backbones at another input size than VRP-SAM's 512
        size = int(backbone.group(1))
        return partial(vrp_squash_imagenet if backbone.group(2) == "imagenet" else tf128_squash, size=size)
    match = re.fullmatch(r"(longest|squash)(\d+)(_pad)?_imagenet", preprocessing_id)
    if match and (match.group(1) == "longest") == bool(match.group(3)):
        size = int(match.group(2))
        return partial(segic_longest_pad, size=size) if match.group(1) == "longest" else partial(imagenet_squash, size=size)
    raise ModelError(
        f"unknown preprocessing_id {preprocessing_id!r}; known: {', '.join(sorted(_PREPROCESSORS))}, "
        "vrp{S}_squash_imagenet, vrp{S}_squash_tf128, longest{S}_pad_imagenet, squash{S}_imagenet"
    )
