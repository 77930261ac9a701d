"""SAM's frozen image encoder (segment_anything's ``ImageEncoderViT``) with both preprocessing modes.

The encoder is segment_anything's own class, built with exactly the arguments of
``segment_anything.build_sam._build_sam`` (image 1024, patch 16, window 14, rel-pos, LayerNorm eps
1e-6, 256 output channels) and the per-size depth/width/heads/global-attention indexes of
``build_sam_vit_{h,l,b}``. ``vit_tiny`` is OUR small configuration for tests and benchmarks (they
register it as ``sam_vit_tiny``, tests/tiny_sam.py; refseg does not): same input size and the same
256 x 64 x 64 output, so every downstream shape is identical; it has no pretrained weights. The blocks' attention runs through ``F.scaled_dot_product_attention`` with SAM's decomposed
relative-position bias as its mask (``sam_attention.py``: the same function and parameters, equal to
segment_anything's ``Attention`` to 1e-5 in fp32; ``attention="segment_anything"`` keeps its own).

Preprocessing modes (``preprocessing_id``):

* ``"vrp512_to1024_imagenet"`` (VRP-SAM, ProSAM, FCP): ``preprocess`` returns VRP-SAM's normalised
  3 x 512 x 512 tensor (the same tensor an ImageNet-normalised backbone gets); ``forward`` resizes
  it to 1024 x 1024 with ``F.interpolate(bilinear, align_corners=True)`` exactly as VRP-SAM's
  ``SAM_pred.forward_img_encoder`` does, then runs the encoder.
* ``"sam_longest1024_pad"`` (SAM's standard, e.g. PerSAM): longest side 1024, ``Sam.preprocess``
  normalisation (ImageNet mean/std * 255) and bottom/right zero padding -> 3 x 1024 x 1024.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from refseg_models.errors import ModelError
from refseg_models.encoders.checkpoint import (
    CheckpointError,
    freeze,
    load_state_dict_strict,
    read_state_dict,
)
from refseg_models.encoders.sam_attention import use_sdpa_attention
from refseg_models.encoders.transforms import sam_longest_pad, vrp_squash_imagenet, vrp_upsample_to_sam

SAM_IMAGE_SIZE = 1024
SAM_PATCH_SIZE = 16
SAM_EMBED_CHANNELS = 256
SAM_EMBED_SIZE = SAM_IMAGE_SIZE // SAM_PATCH_SIZE  # 64
VRP_INPUT_SIZE = 512

PREPROCESSING_VRP = "vrp512_to1024_imagenet"
PREPROCESSING_SAM = "sam_longest1024_pad"
PREPROCESSING_MODES = (PREPROCESSING_VRP, PREPROCESSING_SAM)

# Keys of a full SAM checkpoint (sam_vit_*.pth) that belong to the other two SAM parts.
_OTHER_SAM_PARTS = ("prompt_encoder.", "mask_decoder.")


@dataclass(frozen=True)
class SamEncoderConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


# segment_anything/build_sam.py: build_sam_vit_h / build_sam_vit_l / build_sam_vit_b.
SAM_ENCODER_CONFIGS: dict[str, SamEncoderConfig] = {
    "vit_h": SamEncoderConfig(1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": SamEncoderConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": SamEncoderConfig(768, 12, 12, (2, 5, 8, 11)),
    # Ours, for tests/demos only (~0.6M parameters): one windowed and one global block.
    "vit_tiny": SamEncoderConfig(96, 2, 3, (1,)),
}


# How the blocks' attention is computed (same function and weights; refseg_models/encoders/sam_attention.py).
ATTENTION_IMPLEMENTATIONS = ("sdpa", "segment_anything")


def build_sam_image_encoder_vit(variant: str, attention: str = "sdpa") -> ImageEncoderViT:
    """segment_anything's ``ImageEncoderViT`` with ``_build_sam``'s arguments for ``variant``.

    ``attention``: ``"sdpa"`` (default: segment_anything's ``Attention`` computed with
    ``F.scaled_dot_product_attention``, equal in fp32 to 1e-5) or ``"segment_anything"`` (its own
    explicit softmax(q k^T) kernels, the reference and the speed baseline).
    """
    if variant not in SAM_ENCODER_CONFIGS:
        raise ModelError(f"unknown SAM encoder variant {variant!r}; available: {', '.join(SAM_ENCODER_CONFIGS)}")
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ModelError(f"unknown SAM attention {attention!r}; available: {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    cfg = SAM_ENCODER_CONFIGS[variant]
    encoder = ImageEncoderViT(
        depth=cfg.depth,
        embed_dim=cfg.embed_dim,
        img_size=SAM_IMAGE_SIZE,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=cfg.num_heads,
        patch_size=SAM_PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=cfg.global_attn_indexes,
        window_size=14,
        out_chans=SAM_EMBED_CHANNELS,
    )
    return use_sdpa_attention(encoder) if attention == "sdpa" else encoder


def image_encoder_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The image-encoder weights of a full SAM checkpoint (``image_encoder.*``, prefix stripped;
    prompt encoder and mask decoder keys dropped) or of a bare image-encoder state dict (as is)."""
    if not any(k.startswith("image_encoder.") for k in state_dict):
        return dict(state_dict)
    stray = sorted(k for k in state_dict if not k.startswith(("image_encoder.",) + _OTHER_SAM_PARTS))
    if stray:
        raise CheckpointError(
            f"SAM checkpoint {source} has keys outside image_encoder/prompt_encoder/mask_decoder: {', '.join(stray[:12])}"
        )
    return {k[len("image_encoder.") :]: v for k, v in state_dict.items() if k.startswith("image_encoder.")}


class SamImageEncoder(nn.Module):
    """Frozen SAM image encoder: preprocessed batch -> ``{"image_embedding": B x 256 x 64 x 64}``.

    Its state dict has ``image_encoder.*`` keys, i.e. the layout of a full SAM checkpoint's encoder
    part, so a saved ``SamImageEncoder`` loads back with :func:`build_sam_image_encoder`.
    """

    def __init__(self, variant: str, image_encoder: ImageEncoderViT, preprocessing: str = PREPROCESSING_VRP) -> None:
        super().__init__()
        if preprocessing not in PREPROCESSING_MODES:
            raise ModelError(f"unknown SAM preprocessing {preprocessing!r}; available: {', '.join(PREPROCESSING_MODES)}")
        self.variant = variant
        self.encoder_id = f"sam_{variant}"
        self.preprocessing_id = preprocessing
        # Side of the square tensor preprocess() returns and forward() accepts.
        self.input_size = VRP_INPUT_SIZE if preprocessing == PREPROCESSING_VRP else SAM_IMAGE_SIZE
        self.image_encoder = image_encoder
        freeze(self)

    def train(self, mode: bool = True) -> "SamImageEncoder":
        return super().train(False)  # frozen by contract

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> 3 x 512 x 512 (VRP mode) or 3 x 1024 x 1024 (SAM mode) float32."""
        if self.preprocessing_id == PREPROCESSING_VRP:
            return vrp_squash_imagenet(image, VRP_INPUT_SIZE)
        return sam_longest_pad(image, SAM_IMAGE_SIZE)

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """B x 3 x S x S (S = ``input_size``) -> {"image_embedding": B x 256 x 64 x 64}."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, self.input_size, self.input_size):
            raise ModelError(
                f"{self.encoder_id} with {self.preprocessing_id} expects B x 3 x {self.input_size} x "
                f"{self.input_size}, got {tuple(batch.shape)}"
            )
        if self.preprocessing_id == PREPROCESSING_VRP:
            batch = vrp_upsample_to_sam(batch, SAM_IMAGE_SIZE)
        return {"image_embedding": self.image_encoder(batch)}

    def output_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {"image_embedding": (SAM_EMBED_CHANNELS, SAM_EMBED_SIZE, SAM_EMBED_SIZE)}


def build_sam_image_encoder(
    variant: str,
    checkpoint: str | Path | None,
    preprocessing: str = PREPROCESSING_VRP,
    attention: str = "sdpa",
) -> SamImageEncoder:
    """Build ``sam_{variant}`` and load it strictly from ``checkpoint`` (a full SAM checkpoint such as
    ``sam_vit_h_4b8939.pth`` or a bare image-encoder state dict). ``checkpoint=None``: random init
    (callers must opt in; see ``build_encoder(allow_random_init=True)``). ``attention``: see
    :func:`build_sam_image_encoder_vit` (not part of the feature-set key: the same function)."""
    encoder = build_sam_image_encoder_vit(variant, attention)
    if checkpoint is not None:
        source = str(checkpoint)
        load_state_dict_strict(encoder, image_encoder_state_dict(read_state_dict(checkpoint), source), source)
    return SamImageEncoder(variant, encoder, preprocessing)


# The registry's builders (refseg_models.encoders.ENCODERS), one per variant; vit_tiny's is registered
# by the tests and benchmarks that use it (tests/tiny_sam.py), not by refseg.
build_sam_vit_h = partial(build_sam_image_encoder, "vit_h")
build_sam_vit_l = partial(build_sam_image_encoder, "vit_l")
build_sam_vit_b = partial(build_sam_image_encoder, "vit_b")
build_sam_vit_tiny = partial(build_sam_image_encoder, "vit_tiny")
