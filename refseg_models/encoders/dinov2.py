"""DINOv2 ViT-S/B/L/14, implemented locally in pure PyTorch with the official checkpoint key names.

No hub download: the model is built here and loaded strictly from a checkpoint file holding the
official backbone state dict (``dinov2_vit{s,b,l}14_pretrain.pth``, or the ``*_reg4`` variants):

    cls_token (1, 1, D), pos_embed (1, 1 + 37*37, D), mask_token (1, D), [register_tokens (1, R, D)],
    patch_embed.proj.{weight, bias}, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
    mlp.fc1, mlp.fc2, ls2.gamma}.*, norm.{weight, bias}

Hub configuration reproduced (``dinov2/hub/backbones.py``): img_size 518, patch 14, MLP ratio 4
(plain MLP with exact GELU for S/B/L), qkv/proj/MLP biases, LayerNorm eps 1e-6, LayerScale,
``interpolate_offset=0.1``, ``interpolate_antialias=False``. Positional embeddings are interpolated
as DINOv2's ``interpolate_pos_encoding`` does: bicubic with ``scale_factor=(h0 + 0.1) / 37`` (not a
target size), so 896 inputs reproduce the official numbers, not merely the shapes.

Output: the last block's tokens after the final LayerNorm (``x_norm_patchtokens``), as
``{"patch_tokens": B x D x H/14 x W/14}``: 64 x 64 for 896 inputs (SegIC), 37 x 37 for 518.
``mask_token`` is only used by DINOv2's masked pre-training; it is kept for strict key parity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from refseg_models.errors import ModelError
from refseg_models.encoders.checkpoint import freeze, load_state_dict_strict, read_state_dict
from refseg_models.encoders.transforms import imagenet_squash, segic_longest_pad

PATCH_SIZE = 14
PRETRAIN_IMG_SIZE = 518  # 37 x 37 patches
INTERPOLATE_OFFSET = 0.1
LAYERNORM_EPS = 1e-6

RESIZE_MODES = ("longest_pad", "squash")


@dataclass(frozen=True)
class DinoV2Config:
    embed_dim: int
    depth: int
    num_heads: int


# dinov2/models/vision_transformer.py: vit_small / vit_base / vit_large.
DINOV2_CONFIGS: dict[str, DinoV2Config] = {
    "vits14": DinoV2Config(384, 12, 6),
    "vitb14": DinoV2Config(768, 12, 12),
    "vitl14": DinoV2Config(1024, 24, 16),
}


class PatchEmbed(nn.Module):
    """B x 3 x H x W -> B x (H/14 * W/14) x D with a 14x14 stride-14 conv."""

    def __init__(self, embed_dim: int, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: B x N x D -> B x N x D (fused qkv, as DINOv2's)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d_head)) v, the same computation as DINOv2's Attention.
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def interpolate_pos_embed(pos_embed: torch.Tensor, h0: int, w0: int) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding``: (1, 1 + M*M, D) -> (1, 1 + h0*w0, D).

    Bicubic, no antialias, ``scale_factor = ((h0 + 0.1) / M, (w0 + 0.1) / M)`` (the official
    "interpolate_offset" kludge, kept because it changes the numbers); unchanged when h0 = w0 = M.
    """
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if m * m != n:
        raise ModelError(f"pos_embed has {n} patch positions, not a square grid")
    if h0 == m and w0 == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(
        patch,
        scale_factor=((h0 + INTERPOLATE_OFFSET) / m, (w0 + INTERPOLATE_OFFSET) / m),
        mode="bicubic",
        antialias=False,
    )
    if tuple(patch.shape[-2:]) != (h0, w0):
        raise ModelError(f"pos_embed interpolation gave {tuple(patch.shape[-2:])}, wanted {(h0, w0)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)
    return torch.cat([pos_embed[:, :1].float(), patch], dim=1).to(pos_embed.dtype)


class DinoV2ViT(nn.Module):
    """DINOv2 backbone. ``forward``: B x 3 x H x W (multiples of 14) -> final-norm patch tokens
    B x D x H/14 x W/14."""

    def __init__(self, cfg: DinoV2Config, num_register_tokens: int = 0) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.embed_dim = dim
        self.num_register_tokens = num_register_tokens
        num_patches = (PRETRAIN_IMG_SIZE // PATCH_SIZE) ** 2
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h % PATCH_SIZE or w % PATCH_SIZE:
            raise ModelError(f"DINOv2 input sides must be multiples of {PATCH_SIZE}, got {h} x {w}")
        h0, w0 = h // PATCH_SIZE, w // PATCH_SIZE
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, h0, w0)
        if self.num_register_tokens:
            # DINOv2 inserts registers after the cls token, after adding positions.
            tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(b, -1, -1), tokens[:, 1:]], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        patches = self.norm(tokens)[:, 1 + self.num_register_tokens :]
        return patches.transpose(1, 2).reshape(b, self.embed_dim, h0, w0)


class DinoV2Encoder(nn.Module):
    """Frozen DINOv2 encoder: preprocessed batch -> ``{"patch_tokens": B x D x S/14 x S/14}``.

    Preprocessing (``preprocessing_id``):
      * ``"longest{S}_pad_imagenet"`` (``resize="longest_pad"``, SegIC with S = 896): longest side to
        S, ImageNet mean/std, padded area zero after normalisation.
      * ``"squash{S}_imagenet"`` (``resize="squash"``): PIL-bilinear squash to S x S, ImageNet.
    """

    def __init__(self, variant: str, vit: DinoV2ViT, input_size: int = 896, resize: str = "longest_pad") -> None:
        super().__init__()
        if input_size % PATCH_SIZE:
            raise ModelError(f"DINOv2 input_size must be a multiple of {PATCH_SIZE}, got {input_size}")
        if resize not in RESIZE_MODES:
            raise ModelError(f"unknown DINOv2 resize mode {resize!r}; available: {', '.join(RESIZE_MODES)}")
        suffix = "_reg" if vit.num_register_tokens else ""
        self.encoder_id = f"dinov2_{variant}{suffix}"
        self.input_size = input_size
        self.resize = resize
        self.preprocessing_id = (
            f"longest{input_size}_pad_imagenet" if resize == "longest_pad" else f"squash{input_size}_imagenet"
        )
        self.vit = vit
        freeze(self)

    def train(self, mode: bool = True) -> "DinoV2Encoder":
        return super().train(False)  # frozen by contract

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """HxWx3 uint8 RGB -> 3 x S x S float32."""
        if self.resize == "longest_pad":
            return segic_longest_pad(image, self.input_size)
        return imagenet_squash(image, self.input_size)

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"patch_tokens": self.vit(batch)}

    def output_shapes(self) -> dict[str, tuple[int, int, int]]:
        side = self.input_size // PATCH_SIZE
        return {"patch_tokens": (self.vit.embed_dim, side, side)}


def build_dinov2_encoder(
    variant: str,
    checkpoint: str | Path | None,
    input_size: int = 896,
    resize: str = "longest_pad",
    num_register_tokens: int = 0,
) -> DinoV2Encoder:
    """DINOv2 ``variant`` ("vits14", "vitb14", "vitl14") loaded strictly from an official backbone
    checkpoint (``num_register_tokens=4`` for the ``*_reg4`` files). Defaults: SegIC's 896 input."""
    if variant not in DINOV2_CONFIGS:
        raise ModelError(f"unknown DINOv2 variant {variant!r}; available: {', '.join(DINOV2_CONFIGS)}")
    vit = DinoV2ViT(DINOV2_CONFIGS[variant], num_register_tokens=num_register_tokens)
    if checkpoint is not None:
        load_state_dict_strict(vit, read_state_dict(checkpoint), str(checkpoint))
    return DinoV2Encoder(variant, vit, input_size=input_size, resize=resize)


# The registry's builders (refseg_models.encoders.ENCODERS), one per variant.
build_dinov2_vits14 = partial(build_dinov2_encoder, "vits14")
build_dinov2_vitb14 = partial(build_dinov2_encoder, "vitb14")
build_dinov2_vitl14 = partial(build_dinov2_encoder, "vitl14")
