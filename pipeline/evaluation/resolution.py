"""Evaluation resolution: where predictions and ground truth are compared.

* ``fixed`` (VRP-SAM: 512x512; HSNet default 400x400): the ground truth is nearest-resized to
  ``size x size``, the logits bilinearly resized to it.
* ``original``: logits bilinearly resized to each image's original size, ground truth untouched.

A pixel is foreground when its logit is > 0 (sigmoid > 0.5). Every reported number must say which
mode and size it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from refseg_models.frames import Frame

Mode = Literal["fixed", "original"]


@dataclass(frozen=True)
class EvalResolution:
    mode: Mode = "fixed"
    size: int = 512

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "original"):
            raise ConfigError(f"evaluation resolution mode must be 'fixed' or 'original', got {self.mode!r}")
        if self.size < 1:
            raise ConfigError(f"evaluation size must be positive, got {self.size}")

    def describe(self) -> str:
        return f"{self.size}x{self.size} (resized GT)" if self.mode == "fixed" else "original image size"

    def prepare(self, logits: torch.Tensor, gt: np.ndarray, frame: Frame | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One episode: ``logits`` (h x w or 1 x h x w) over the method's input ``frame`` and ``gt``
        (H x W, original size) -> (bool prediction, gt) at the evaluation resolution.

        ``frame=None`` means a squash frame (the logits cover the whole image, as VRP-SAM's 512
        output does); a padded frame (SAM's / SegIC's longest-side pad) is cropped to the image
        first (:meth:`refseg_models.frames.Frame.logits_to_size`)."""
        logits = logits.detach().float().reshape(1, 1, *logits.shape[-2:])
        gt = np.asarray(gt)
        if self.mode == "fixed":
            target_size = (self.size, self.size)
            gt_tensor = torch.from_numpy(gt.astype(np.uint8))[None, None].float()
            gt = F.interpolate(gt_tensor, size=target_size, mode="nearest")[0, 0].numpy().astype(np.uint8)
        else:
            target_size = tuple(gt.shape)
        if frame is not None:
            logits = frame.logits_to_size(logits, target_size)
        elif tuple(logits.shape[-2:]) != target_size:
            logits = F.interpolate(logits, size=target_size, mode="bilinear", align_corners=False)
        return (logits[0, 0] > 0).cpu().numpy(), gt
