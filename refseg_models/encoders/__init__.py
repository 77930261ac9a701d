"""Frozen encoders: SAM image encoders and class-consistent backbones, built by name.

``build_encoder(name, checkpoint, **cfg)`` is the one entry point the pipeline uses; the names are
the :data:`ENCODERS` registry's (builders imported on first use, :mod:`refseg_models.registry`).

A missing weights path never silently yields random features: ``checkpoint=None`` is refused unless
the caller passes ``allow_random_init=True`` (tests, speed benchmarks).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from torch import nn

from refseg_models.encoders.base import BACKBONE_LAYERS, Backbone, FrozenEncoder
from refseg_models.encoders.checkpoint import CheckpointError
from refseg_models.encoders.transforms import get_preprocessor
from refseg_models.errors import ModelError, WeightsNotFoundError
from refseg_models.registry import Registry

ENCODERS = Registry("encoder", {
    "sam_vit_h": "refseg_models.encoders.sam_image_encoder:build_sam_vit_h",
    "sam_vit_l": "refseg_models.encoders.sam_image_encoder:build_sam_vit_l",
    "sam_vit_b": "refseg_models.encoders.sam_image_encoder:build_sam_vit_b",
    "resnet50_v2": "refseg_models.encoders.resnet50_v2:build_resnet50_v2_backbone",
    "resnet50_tv": "refseg_models.encoders.resnet50_tv:build_resnet50_tv_backbone",
    "vgg16": "refseg_models.encoders.vgg16:build_vgg16_backbone",
    "dinov2_vits14": "refseg_models.encoders.dinov2:build_dinov2_vits14",
    "dinov2_vitb14": "refseg_models.encoders.dinov2:build_dinov2_vitb14",
    "dinov2_vitl14": "refseg_models.encoders.dinov2:build_dinov2_vitl14",
    "mobilenet_v2": "refseg_models.encoders.mobilenet_v2:build_mobilenet_v2_backbone",
    # the proxy SAM: frozen MobileNetV2 + trained neck (needs backbone_checkpoint=...; docs/proxy_sam.md)
    "sam_proxy_mobilenet_v2": "refseg_models.encoders.sam_proxy:build_sam_proxy_encoder",
})


def available_encoders() -> list[str]:
    return ENCODERS.names()


def build_encoder(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    allow_random_init: bool = False,
    **cfg: Any,
) -> nn.Module:
    """Build the frozen encoder ``name`` (eval mode, ``requires_grad=False``).

    Args:
        name: one of :func:`available_encoders`.
        checkpoint: weights file (loaded with ``weights_only=True``, strictly).
        allow_random_init: permit ``checkpoint=None`` (random weights; never for real features).
        **cfg: builder options, e.g. ``preprocessing="sam_longest1024_pad"`` for SAM encoders,
            ``input_size=896`` / ``preprocessing=...`` for DINOv2.

    Raises:
        ModelError: unknown ``name`` (the message lists the options), or ``checkpoint=None``
            without ``allow_random_init``.
        WeightsNotFoundError: ``checkpoint`` does not exist (the message names the path).
        CheckpointError: the file does not match the architecture (names missing/unexpected keys).
    """
    ENCODERS.check(name)
    if checkpoint is None and not allow_random_init:
        raise ModelError(
            f"encoder {name!r} needs a checkpoint path; pass allow_random_init=True to build it with random "
            "weights (tests and speed benchmarks only: random features are meaningless)"
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise WeightsNotFoundError(f"checkpoint file for encoder {name!r} not found: {checkpoint}")
    return ENCODERS.get(name)(checkpoint=checkpoint, **cfg)


def encoder_options(name: str) -> list[str]:
    """The keyword options the builder of encoder ``name`` accepts (besides ``checkpoint``)."""
    return [p for p in inspect.signature(ENCODERS.get(name)).parameters if p != "checkpoint"]


__all__ = [
    "BACKBONE_LAYERS",
    "Backbone",
    "CheckpointError",
    "ENCODERS",
    "FrozenEncoder",
    "available_encoders",
    "build_encoder",
    "encoder_options",
    "get_preprocessor",
]
