"""VRP-SAM (Sun et al., CVPR 2024): visual reference prompt encoder + frozen SAM decoding.

Trainable part (1,592,064 parameters with the ResNet-50 configuration; the authors' code,
github.com/syp2ysy/VRP-SAM ``model/VRP_encoder.py``; details in docs/methods.md):
  down   1x1 conv (C2 + C3)->256, no bias, ReLU, Dropout2d(0.5), shared by reference and target;
  merge  1x1 conv (256+256+1)->256, no bias, ReLU, shared: [feat, prototype, mask*10];
  decoder 50 learned queries; cross-attn(reference) -> self-attn -> cross-attn(target) -> self-attn,
         4 heads, post-norm, dropout 0, no FFN, sine positions on the keys of the cross-attentions.
Frozen: SAM's prompt encoder + mask decoder (``SamDecoder``), the backbone (features come in).

k-shot (as the authors' ``predict_mask_nshot``): every shot is encoded on its own (its own pseudo
mask) and the 50 tokens of each shot are concatenated -> 50*k sparse tokens for SAM.

Deviation for non-dilated backbones (MobileNetV2 etc.): layer2 / layer3 maps smaller than the 64 x 64
SAM grid are resized bilinearly (align_corners=True) to it, and the pseudo mask computed on layer4's
grid likewise; with the paper's dilated ResNet-50 every map is already 64 x 64 and nothing changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from refseg_models.errors import ModelError
from refseg_models.feature_spec import FeatureSpec
from refseg_models.config import MethodConfig
from refseg_models.criterion import PromptMaskCriterion
from refseg_models.modeling.attention import CrossAttentionLayer, SelfAttentionLayer
from refseg_models.modeling.features import masked_average_pool, resize_mask_nearest, resize_to_grid
from refseg_models.method import RefSegMethod, check_sam_decoder_grid
from refseg_models.modeling.inputs import BACKBONE_LAYERS, EpisodeFeatures
from refseg_models.modeling.position_encoding import sine_position_encoding
from refseg_models.modeling.pseudo_mask import prior_pseudo_mask
from refseg_models.modeling.sam_decoder import SamDecoder, upsample_logits

RESNET50_CHANNELS = (512, 1024, 2048)


class VRPDecoder(nn.Module):
    """50 learned queries -> cross(reference) -> self -> cross(target) -> self (one layer)."""

    def __init__(self, num_queries: int, dim: int, num_heads: int) -> None:
        super().__init__()
        self.queries = nn.Embedding(num_queries, dim)
        self.cross_reference = CrossAttentionLayer(dim, num_heads)
        self.self_reference = SelfAttentionLayer(dim, num_heads)
        self.cross_target = CrossAttentionLayer(dim, num_heads)
        self.self_target = SelfAttentionLayer(dim, num_heads)

    def forward(self, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """target, reference: B x C x H x W merged features -> B x N x C prompt tokens."""
        b, c, h, w = target.shape
        pos = sine_position_encoding(h, w, c // 2, device=target.device, dtype=target.dtype)
        pos = pos.flatten(2).transpose(1, 2)  # 1 x HW x C
        tgt = target.flatten(2).transpose(1, 2)
        ref = reference.flatten(2).transpose(1, 2)
        x = self.queries.weight.unsqueeze(0).expand(b, -1, -1)
        x = self.cross_reference(x, ref, ref, key_pos=pos)[0]
        x = self.self_reference(x)
        x = self.cross_target(x, tgt, tgt, key_pos=pos)[0]
        return self.self_target(x)


class VisualReferencePromptEncoder(nn.Module):
    """VRP-SAM's trainable prompt encoder: features of an episode batch -> sparse prompt tokens.

    Built from a config with VRP-SAM's fields (:class:`VRPSamConfig`, ProSAM's): its defaults are
    written there only."""

    def __init__(self, config: VRPSamConfig) -> None:
        super().__init__()
        if len(config.backbone_channels) != 3:
            raise ModelError(f"backbone_channels must be (layer2, layer3, layer4), got {config.backbone_channels}")
        c2, c3, _ = config.backbone_channels
        dim = config.hidden_dim
        self.num_queries = config.num_queries
        self.feature_size = config.feature_size
        self.down = nn.Sequential(
            nn.Conv2d(c2 + c3, dim, kernel_size=1, bias=False), nn.ReLU(), nn.Dropout2d(config.feature_dropout)
        )
        self.merge = nn.Sequential(nn.Conv2d(2 * dim + 1, dim, kernel_size=1, bias=False), nn.ReLU())
        self.decoder = VRPDecoder(config.num_queries, dim, config.num_heads)

    def _project(self, layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
        s = self.feature_size
        # VRP-SAM concatenates (layer2, layer3) in this order.
        return self.down(torch.cat([resize_to_grid(layer2, s), resize_to_grid(layer3, s)], dim=1))

    def forward(self, features: EpisodeFeatures) -> dict[str, torch.Tensor]:
        """
        Returns:
          tokens: B x (k*N) x 256 sparse prompt tokens (shot-major).
          pseudo_mask: B x k x 64 x 64 prior pseudo masks (one per shot).
        """
        b, k, s = features.batch_size, features.shots, self.feature_size
        ref_bb = {name: features.reference_backbone[name].flatten(0, 1) for name in BACKBONE_LAYERS}  # Bk x C x h x w
        ref_mask = resize_mask_nearest(features.reference_masks.flatten(0, 1), s).to(features.target_sam.dtype)

        target = self._project(features.target_backbone["layer2"], features.target_backbone["layer3"])
        target = target.repeat_interleave(k, dim=0)
        reference = self._project(ref_bb["layer2"], ref_bb["layer3"])
        prototype = masked_average_pool(reference, ref_mask).expand(-1, -1, s, s)

        pseudo = prior_pseudo_mask(
            features.target_backbone["layer4"].repeat_interleave(k, dim=0),
            features.reference_masked_layer4.flatten(0, 1),
            ref_mask,
        )
        pseudo = resize_to_grid(pseudo, s)

        reference = self.merge(torch.cat([reference, prototype, ref_mask * 10], dim=1))
        target = self.merge(torch.cat([target, prototype, pseudo * 10], dim=1))
        tokens = self.decoder(target, reference)  # Bk x N x C
        return {
            "tokens": tokens.reshape(b, k * self.num_queries, -1),
            "pseudo_mask": pseudo.reshape(b, k, s, s),
        }


@dataclass(frozen=True)
class VRPSamConfig(MethodConfig):
    """VRP-SAM's configuration; defaults are the paper's (ResNet-50 v2, SAM's 64 x 64 grid, 512).

    ``backbone_channels``: (layer2, layer3, layer4) channels of the frozen backbone (MobileNetV2:
    (32, 96, 1280)). ``feature_size``: the SAM embedding grid G (64 for SAM; the proxy SAM's grid
    for it), to which the backbone maps are resized. ``feature_dropout``: Dropout2d after ``down``.
    ``bce_weight`` / ``dice_weight``: the loss weights (1 and 1 in the authors' code).
    """

    backbone_channels: tuple[int, int, int] = RESNET50_CHANNELS
    num_queries: int = 50
    hidden_dim: int = 256
    num_heads: int = 4
    feature_dropout: float = 0.5
    feature_size: int = 64
    output_size: int = 512
    bce_weight: float = 1.0
    dice_weight: float = 1.0

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(target_sam=True, backbone=BACKBONE_LAYERS, masked_reference_layer4=True)


def config_for_sam_and_backbone(config: Any, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Any:
    """VRP-SAM / ProSAM / FCP configs on given features: the SAM grid G (``feature_size``) from the
    SAM embedding, ``backbone_channels`` from the backbone's layer2/3/4."""
    changes: dict[str, Any] = {}
    if "sam" in shapes:
        changes["feature_size"] = int(shapes["sam"]["image_embedding"][-1])
    if "backbone" in shapes:
        changes["backbone_channels"] = tuple(int(shapes["backbone"][name][0]) for name in BACKBONE_LAYERS)
    return config.replace(**changes)


class PromptEncoderMethod(RefSegMethod):
    """A trainable prompt encoder in front of a frozen SAM decoder, on a SAM grid and a backbone's
    layer2/3/4 (VRP-SAM, ProSAM, FCP): built the same way, ``cls(config, prompt_encoder(config),
    sam_decoder)``, and adapted to the features at hand the same way."""

    uses_sam_decoder = True
    logits_frame = "backbone"
    prompt_encoder_class: ClassVar[type[nn.Module]]  # built from the method's config alone

    @classmethod
    def from_config(cls, config: Any, sam_decoder: SamDecoder | None = None) -> "PromptEncoderMethod":
        check_sam_decoder_grid(sam_decoder, config.feature_size, cls.name)
        return cls(config, cls.prompt_encoder_class(config), sam_decoder)

    @classmethod
    def config_for_features(cls, config: Any, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Any:
        return config_for_sam_and_backbone(config, shapes)


class VRPSam(PromptEncoderMethod):
    """VRP-SAM on features: prompt encoder (trainable) + SAM prompt encoder / mask decoder (frozen)."""

    config_class = VRPSamConfig
    prompt_encoder_class = VisualReferencePromptEncoder

    def __init__(self, config: VRPSamConfig, prompt_encoder: VisualReferencePromptEncoder, sam_decoder: SamDecoder):
        super().__init__()
        self.config = config
        self.prompt_encoder = prompt_encoder
        self.sam_decoder = sam_decoder
        self.output_size = config.output_size
        self.criterion = PromptMaskCriterion(config.bce_weight, config.dice_weight)

    def prompt_tokens(self, features: EpisodeFeatures) -> torch.Tensor:
        """B x (k*50) x 256 tokens that go to SAM (deterministic in eval mode)."""
        self.check_features(features)
        return self.prompt_encoder(features)["tokens"]

    def decode_tokens(self, target_sam: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """B x 256 x G x G + B x N x 256 -> B x 1 x out x out mask logits."""
        return upsample_logits(self.sam_decoder.decode(target_sam, tokens), self.output_size)

    def forward(self, features: EpisodeFeatures) -> dict[str, torch.Tensor]:
        """
        Returns:
          mask_logits: B x 1 x 512 x 512 (SAM's 4G x 4G low-res logits upsampled bilinearly).
          low_res_logits: B x 1 x 4G x 4G.  prompt_tokens: B x (k*50) x 256.
          pseudo_mask: B x k x G x G.
        """
        self.check_features(features)
        enc = self.prompt_encoder(features)
        low = self.sam_decoder.decode(features.target_sam, enc["tokens"])
        return {
            "mask_logits": upsample_logits(low, self.output_size),
            "low_res_logits": low,
            "prompt_tokens": enc["tokens"],
            "pseudo_mask": enc["pseudo_mask"],
        }

    def loss(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """BCE + Dice at 512 over valid pixels: {"loss", "loss_bce", "loss_dice"}."""
        return self.criterion(outputs, targets, valid)
