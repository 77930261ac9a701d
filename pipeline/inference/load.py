"""A predictor from an inference checkpoint and the frozen encoders' weights files, as users give
them (``refseg predict``, the MLflow model's loader)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_predictor(
    checkpoint: str | Path,
    sam_checkpoint: str | Path | None = None,
    backbone_checkpoint: str | Path | None = None,
    device: str = "cpu",
    allow_random_init: bool = False,
) -> Any:
    """:class:`refseg_models.predictor.RefSegPredictor` of ``checkpoint`` (read ``weights_only``).

    A checkpoint trained on the proxy SAM needs no SAM file (the shipped one is the default) and its
    MobileNetV2 is the backbone's file (``backbone_checkpoint``), as in the training job."""
    from refseg_models.checkpoint import load_inference_checkpoint
    from refseg_models.encoders import encoder_options
    from refseg_models.encoders.sam_proxy import PROXY_ENCODER, default_proxy_sam_checkpoint
    from refseg_models.predictor import RefSegPredictor

    sam = load_inference_checkpoint(checkpoint).encoders.get("sam")
    options: dict[str, dict[str, Any]] = {}
    if sam is not None and sam.encoder_id == PROXY_ENCODER and sam_checkpoint is None:
        sam_checkpoint = default_proxy_sam_checkpoint()
    if sam is not None and backbone_checkpoint and "backbone_checkpoint" in encoder_options(sam.encoder_id):
        options["sam"] = {"backbone_checkpoint": str(backbone_checkpoint)}
    return RefSegPredictor.from_checkpoint(
        checkpoint, sam_checkpoint=sam_checkpoint, backbone_checkpoint=backbone_checkpoint, device=device,
        allow_random_init=allow_random_init, encoder_options=options,
    )
