"""Input frames: where an image sits inside an encoder's square input, and how masks and logits
move between the original image and that frame. One implementation for predict, evaluation and
training.

Two kinds of frame, named by the encoder's ``preprocessing_id``:

* squash (VRP-SAM / FCP / ProSAM's 512 input, ids starting with ``vrp`` or ``squash``): the image
  is resized to ``size x size`` without keeping its aspect ratio;
* longest-side pad (SAM's ``sam_longest1024_pad``, SegIC's DINOv2 ``longest896_pad_imagenet``):
  longest side resized to ``size``, image at the top-left, padding bottom/right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from refseg_models.errors import ModelError


def frame_size_of(preprocessing_id: str) -> int:
    """The frame side an encoder's preprocessing id names (ids carry their input size:
    ``vrp512_squash_tf128`` -> 512, ``vrp512_to1024_imagenet`` -> 512, ``sam_longest1024_pad`` -> 1024,
    ``longest896_pad_imagenet`` -> 896)."""
    match = re.search(r"(\d+)", preprocessing_id)
    if match is None:
        raise ModelError(f"preprocessing id {preprocessing_id!r} names no input size")
    return int(match.group(1))


def is_padded(preprocessing_id: str) -> bool:
    """Whether an encoder's preprocessing pads (longest side) rather than squashes."""
    return "longest" in preprocessing_id


@dataclass(frozen=True)
class Frame:
    """Where an image of size ``original`` (h, w) lies in a square input of side ``size``."""

    original: tuple[int, int]
    size: int
    padded: bool

    @classmethod
    def of(cls, preprocessing_id: str, size: int, original: tuple[int, int]) -> "Frame":
        return cls((int(original[0]), int(original[1])), int(size), is_padded(preprocessing_id))

    @property
    def valid(self) -> tuple[int, int]:
        """(h, w) of the image inside the frame (the whole frame for squash)."""
        if not self.padded:
            return (self.size, self.size)
        return ResizeLongestSide.get_preprocess_shape(self.original[0], self.original[1], self.size)

    def scaled(self, size: int) -> "Frame":
        return Frame(self.original, size, self.padded)

    def mask_to_frame(self, mask: np.ndarray | torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
        """H x W mask at the original size -> size x size float (nearest resize; padding
        ``pad_value``, e.g. 255 to ignore the padding of a target label mask).

        Values are kept (a {0, 1, 255} label mask stays one)."""
        vh, vw = self.valid
        t = torch.from_numpy(np.array(mask, dtype=np.float32)) if isinstance(mask, np.ndarray) else mask.float()
        t = F.interpolate(t[None, None], (vh, vw), mode="nearest")
        return F.pad(t, (0, self.size - vw, 0, self.size - vh), value=pad_value)[0, 0]

    def crop_valid(self, logits: torch.Tensor) -> torch.Tensor:
        """B x C x h x w logits over the whole frame -> the part covering the image, resampled to
        the frame's scale (bilinear)."""
        full = F.interpolate(logits.float(), (self.size, self.size), mode="bilinear", align_corners=False)
        vh, vw = self.valid
        return full[..., :vh, :vw]

    def logits_to_size(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """B x C x h x w logits over the frame -> B x C x size (image content only, bilinear).

        For a squash frame this is one bilinear resize of the logits (as VRP-SAM resizes its
        output); for a padded frame the padding is cropped first."""
        if not self.padded:
            if tuple(logits.shape[-2:]) == tuple(size):
                return logits.float()
            return F.interpolate(logits.float(), size, mode="bilinear", align_corners=False)
        return F.interpolate(self.crop_valid(logits), size, mode="bilinear", align_corners=False)

    def logits_to_image(self, logits: torch.Tensor) -> np.ndarray:
        """1 x 1 x h x w logits over the frame -> bool mask at the original size (> 0)."""
        return (self.logits_to_size(logits, self.original)[0, 0] > 0).cpu().numpy()


def frame_of(encoder: Any, original: tuple[int, int]) -> Frame:
    """The frame ``encoder.preprocess`` puts an image of size ``original`` (h, w) in."""
    return Frame.of(str(encoder.preprocessing_id), int(encoder.input_size), original)
