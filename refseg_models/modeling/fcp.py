"""FCP (AAAI 2025, "Foreground-Covering Prototype Generation and Matching for SAM-Aided Few-Shot
Segmentation"): foreground-covering prototype generation and matching, on frozen SAM decoding.

Trainable part (2,856,448 parameters with the ResNet-50 configuration, T = 3, 50 + 50 prototypes):
  down      1x1 conv (C3 + C2)->256, no bias, ReLU, Dropout2d(0.5) (concat order layer3, layer2);
  sam_proj  1x1 conv 256->256, no bias, ReLU on the SAM embeddings G of target and reference;
  decoder   two shared 513->256 merge convs (SAM, ResNet), 50 support + 50 query prototypes,
            T support and T query cross-attentions, a matching cross- and self-attention.

Per layer t (as the authors' code does it; docs/methods.md):
* support branch: keys = merge_sam([G^S, SAM-prototype, mask*10]) with keys outside the reference
  mask blocked (empty-mask guard in ``CrossAttentionLayer``); values = the same merged SAM map, but
  merge_res([F^S, ResNet-prototype, mask*10]) in the last layer. No self-attention.
* query branch: keys = merge_sam([G^Q, SAM-prototype, pseudo*10]), no attention mask; after every
  non-final layer the pseudo mask becomes the attention pseudo mask (head-averaged attention,
  min-max normalised over HW per prototype, max over prototypes); last layer values =
  merge_res([F^Q, ResNet-prototype, pseudo*10]) with the current pseudo mask.
* matching: support prototypes attend to query prototypes, then self-attention -> B x 50 x 256.
The SAM-feature prototype is the masked average of the RAW reference SAM embedding; the ResNet
prototype that of the projected (``down``) reference features.

Dropout as the authors' ``transformer_decoder``: branch cross-attentions attention-dropout 0.5
with residual dropout 0; matching cross-attention attention-dropout 0.2; matching self-attention
none. Min-max normalisation epsilon 1e-9 (theirs). The attention maps used for pseudo masks and
losses are the ones MultiheadAttention returns (after attention dropout in training mode).

Choices where the paper is not explicit (stated in docs/methods.md):
* sine positions are added to the keys of the branch cross-attentions (as VRP-SAM); the matching
  attentions use none (prototypes have no position).
* k-shot: each shot is encoded with its own SAM features and decoded on its own; the k logit maps
  are averaged (the authors' ``predict_mask_nshot``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from refseg_models.config import MethodConfig
from refseg_models.criterion import FCPCriterion
from refseg_models.errors import ModelError
from refseg_models.feature_spec import FeatureSpec
from refseg_models.losses import GUIDE_LOSSES, GUIDE_WEIGHTINGS
from refseg_models.modeling.attention import CrossAttentionLayer, SelfAttentionLayer
from refseg_models.modeling.features import masked_average_pool, resize_mask_nearest, resize_to_grid
from refseg_models.modeling.inputs import BACKBONE_LAYERS, EpisodeFeatures
from refseg_models.modeling.position_encoding import sine_position_encoding
from refseg_models.modeling.pseudo_mask import prior_pseudo_mask
from refseg_models.modeling.sam_decoder import SAM_EMBED_DIM, SamDecoder, upsample_logits
from refseg_models.modeling.vrp_sam import RESNET50_CHANNELS, PromptEncoderMethod


# The authors' min-max normalisation epsilon (transformer_decoder).
MINMAX_EPS = 1e-9


def attention_pseudo_mask(attention: torch.Tensor, size: int) -> torch.Tensor:
    """FCP's attention-based pseudo mask.

    attention: B x N x L (L = size * size) head-averaged weights -> B x 1 x size x size in [0, 1]:
    min-max normalised over L per prototype, then max over the N prototypes. Always in fp32: under
    bf16 autocast the weights (~1/L each) differ by less than bf16 resolves, the normalisation turns
    that rounding into 0/1 masks and the guide loss's gradient into noise (measured:
    tests/test_training_step_equivalence.py); the authors' 1e-9 epsilon is also below bf16's range.
    """
    attention = attention.float()
    lo = attention.min(dim=-1, keepdim=True)[0]
    hi = attention.max(dim=-1, keepdim=True)[0]
    normalised = (attention - lo) / (hi - lo + MINMAX_EPS)
    return normalised.max(dim=1)[0].reshape(attention.shape[0], 1, size, size)


class FCPDecoder(nn.Module):
    """Support / query prototype generation (T layers each) and prototype-prototype matching."""

    def __init__(self, config: FCPConfig) -> None:
        super().__init__()
        layers, dim, heads = config.num_layers, config.hidden_dim, config.num_heads
        if layers < 2:
            raise ModelError(f"FCP needs T >= 2 layers (T-1 attention pseudo masks), got {layers}")
        self.num_layers = layers
        self.merge_sam = nn.Sequential(nn.Conv2d(2 * dim + 1, dim, kernel_size=1, bias=False), nn.ReLU())
        self.merge_res = nn.Sequential(nn.Conv2d(2 * dim + 1, dim, kernel_size=1, bias=False), nn.ReLU())
        self.support_prototypes = nn.Embedding(config.num_prototypes, dim)
        self.query_prototypes = nn.Embedding(config.num_prototypes, dim)
        branch_dropout = config.branch_attention_dropout
        self.support_layers = nn.ModuleList(
            CrossAttentionLayer(dim, heads, attention_dropout=branch_dropout) for _ in range(layers)
        )
        self.query_layers = nn.ModuleList(
            CrossAttentionLayer(dim, heads, attention_dropout=branch_dropout) for _ in range(layers)
        )
        self.match_cross = CrossAttentionLayer(dim, heads, attention_dropout=config.match_attention_dropout)
        self.match_self = SelfAttentionLayer(dim, heads)

    @staticmethod
    def _merge(conv: nn.Module, feat: torch.Tensor, prototype: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = feat.shape[-1]
        merged = conv(torch.cat([feat, prototype.expand(-1, -1, s, s), mask * 10], dim=1))
        return merged.flatten(2).transpose(1, 2)  # B x L x C

    def forward(
        self,
        target_sam: torch.Tensor,
        reference_sam: torch.Tensor,
        target_res: torch.Tensor,
        reference_res: torch.Tensor,
        reference_mask: torch.Tensor,
        pseudo_mask: torch.Tensor,
        sam_prototype: torch.Tensor,
        res_prototype: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """
        Args (M = batch of shot-episodes, S = 64, C = 256):
          target_sam, reference_sam: M x C x S x S projected SAM embeddings.
          target_res, reference_res: M x C x S x S projected ResNet features.
          reference_mask: M x 1 x S x S {0,1}; pseudo_mask: M x 1 x S x S prior pseudo mask.
          sam_prototype, res_prototype: M x C x 1 x 1 masked averages.
        Returns:
          tokens: M x N x C; attention_pseudo_masks: M x (T-1) x S x S;
          attention_maps: M x 2T x N x S*S (T support maps, then T query maps).
        """
        m, c, s, _ = target_sam.shape
        pos = sine_position_encoding(s, s, c // 2, device=target_sam.device, dtype=target_sam.dtype)
        pos = pos.flatten(2).transpose(1, 2)
        last = self.num_layers - 1
        maps = []

        support_keys = self._merge(self.merge_sam, reference_sam, sam_prototype, reference_mask)
        support_res = self._merge(self.merge_res, reference_res, res_prototype, reference_mask)
        blocked = reference_mask.flatten(1) < 0.5  # M x L
        support = self.support_prototypes.weight.unsqueeze(0).expand(m, -1, -1)
        for t, layer in enumerate(self.support_layers):
            values = support_res if t == last else support_keys
            support, attn = layer(support, support_keys, values, key_pos=pos, blocked=blocked, need_weights=True)
            maps.append(attn)

        query = self.query_prototypes.weight.unsqueeze(0).expand(m, -1, -1)
        current = pseudo_mask
        attention_masks = []
        for t, layer in enumerate(self.query_layers):
            keys = self._merge(self.merge_sam, target_sam, sam_prototype, current)
            values = self._merge(self.merge_res, target_res, res_prototype, current) if t == last else keys
            query, attn = layer(query, keys, values, key_pos=pos, need_weights=True)
            maps.append(attn)
            if t < last:
                current = attention_pseudo_mask(attn, s)
                attention_masks.append(current)

        tokens = self.match_cross(support, query, query)[0]
        tokens = self.match_self(tokens)
        return {
            "tokens": tokens,
            "attention_pseudo_masks": torch.cat(attention_masks, dim=1),
            "attention_maps": torch.stack(maps, dim=1),
        }


class FCPPromptEncoder(nn.Module):
    """FCP's trainable part: projections + ``FCPDecoder``; features -> per-shot prompt tokens.
    Built from :class:`FCPConfig` (its defaults are written there only)."""

    def __init__(self, config: FCPConfig) -> None:
        super().__init__()
        if len(config.backbone_channels) != 3:
            raise ModelError(f"backbone_channels must be (layer2, layer3, layer4), got {config.backbone_channels}")
        c2, c3, _ = config.backbone_channels
        dim = config.hidden_dim
        if dim != SAM_EMBED_DIM:
            raise ModelError(f"FCP merges SAM features and prototypes at one width: hidden_dim must be SAM's "
                             f"{SAM_EMBED_DIM}, got {dim}")
        self.num_prototypes = config.num_prototypes
        self.feature_size = config.feature_size
        self.down = nn.Sequential(
            nn.Conv2d(c3 + c2, dim, kernel_size=1, bias=False), nn.ReLU(), nn.Dropout2d(config.feature_dropout)
        )
        self.sam_proj = nn.Sequential(nn.Conv2d(SAM_EMBED_DIM, dim, kernel_size=1, bias=False), nn.ReLU())
        self.decoder = FCPDecoder(config)

    def _project(self, layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
        s = self.feature_size
        # FCP's code concatenates (layer3, layer2), the reverse of VRP-SAM's order.
        return self.down(torch.cat([resize_to_grid(layer3, s), resize_to_grid(layer2, s)], dim=1))

    def forward(self, features: EpisodeFeatures) -> dict[str, torch.Tensor]:
        """
        Returns (B episodes, k shots, N prototypes, S = 64):
          tokens: B x k x N x 256; pseudo_mask: B x k x S x S (prior);
          attention_pseudo_masks: B x k x (T-1) x S x S; attention_maps: B x k x 2T x N x S*S.
        """
        b, k, s = features.batch_size, features.shots, self.feature_size
        ref_bb = {name: t.flatten(0, 1) for name, t in features.reference_backbone.items()}
        ref_mask = resize_mask_nearest(features.reference_masks.flatten(0, 1), s).to(features.target_sam.dtype)
        ref_sam_raw = resize_to_grid(features.reference_sam.flatten(0, 1), s)
        tgt_sam_raw = resize_to_grid(features.target_sam, s)

        target_res = self._project(features.target_backbone["layer2"], features.target_backbone["layer3"])
        target_res = target_res.repeat_interleave(k, dim=0)
        reference_res = self._project(ref_bb["layer2"], ref_bb["layer3"])
        res_prototype = masked_average_pool(reference_res, ref_mask)
        sam_prototype = masked_average_pool(ref_sam_raw, ref_mask)
        target_sam = self.sam_proj(tgt_sam_raw).repeat_interleave(k, dim=0)
        reference_sam = self.sam_proj(ref_sam_raw)

        pseudo = prior_pseudo_mask(
            features.target_backbone["layer4"].repeat_interleave(k, dim=0),
            features.reference_masked_layer4.flatten(0, 1),
            ref_mask,
        )
        pseudo = resize_to_grid(pseudo, s)
        dec = self.decoder(
            target_sam, reference_sam, target_res, reference_res, ref_mask, pseudo, sam_prototype, res_prototype
        )
        return {
            "tokens": dec["tokens"].reshape(b, k, *dec["tokens"].shape[1:]),
            "pseudo_mask": pseudo.reshape(b, k, s, s),
            "attention_pseudo_masks": dec["attention_pseudo_masks"].reshape(b, k, -1, s, s),
            "attention_maps": dec["attention_maps"].reshape(b, k, *dec["attention_maps"].shape[1:]),
        }


@dataclass(frozen=True)
class FCPConfig(MethodConfig):
    """FCP's configuration; defaults are the paper's ResNet-50 setting (T = 3, 50 + 50 prototypes,
    4 heads, the authors' dropouts, loss weights guide 0.5 / orthogonality 0.05).

    ``guide_weighting``: ``"authors"`` (train.py: layer m divided by T-1-m) or ``"paper"`` (eq. 9).
    ``guide_loss``: ``"authors"`` (their ``compute_pseudo_objective``: BCE-with-logits + Dice on
    sigmoid of the probability maps; the published numbers come from it) or ``"paper"`` (plain BCE +
    Dice on the maps, as eq. 9 writes); see docs/methods.md.
    """

    backbone_channels: tuple[int, int, int] = RESNET50_CHANNELS
    num_prototypes: int = 50
    hidden_dim: int = 256
    num_heads: int = 4
    num_layers: int = 3
    branch_attention_dropout: float = 0.5
    match_attention_dropout: float = 0.2
    feature_dropout: float = 0.5
    feature_size: int = 64
    output_size: int = 512
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    guide_weight: float = 0.5
    ortho_weight: float = 0.05
    guide_weighting: str = "authors"
    guide_loss: str = "authors"

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(target_sam=True, reference_sam=True, backbone=BACKBONE_LAYERS, masked_reference_layer4=True)


class FCP(PromptEncoderMethod):
    """FCP on features: ``FCPPromptEncoder`` (trainable) + frozen SAM decoding."""

    config_class = FCPConfig
    prompt_encoder_class = FCPPromptEncoder

    def __init__(self, config: FCPConfig, prompt_encoder: FCPPromptEncoder, sam_decoder: SamDecoder) -> None:
        super().__init__()
        if config.guide_weighting not in GUIDE_WEIGHTINGS:
            raise ModelError(f"guide_weighting must be one of {GUIDE_WEIGHTINGS}, got {config.guide_weighting!r}")
        if config.guide_loss not in GUIDE_LOSSES:
            raise ModelError(f"guide_loss must be one of {GUIDE_LOSSES}, got {config.guide_loss!r}")
        self.config = config
        self.prompt_encoder = prompt_encoder
        self.sam_decoder = sam_decoder
        self.output_size = config.output_size
        self.criterion = FCPCriterion(
            config.bce_weight, config.dice_weight, config.guide_weight, config.ortho_weight, config.guide_weighting,
            config.guide_loss,
        )

    def prompt_tokens(self, features: EpisodeFeatures) -> torch.Tensor:
        """B x k x 50 x 256 per-shot prompt tokens."""
        self.check_features(features)
        return self.prompt_encoder(features)["tokens"]

    def decode_tokens(self, target_sam: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """B x 256 x G x G + tokens (B x N x 256, or B x k x N x 256 decoded per shot and the k
        logit maps averaged) -> B x 1 x out x out logits."""
        if tokens.dim() == 3:
            tokens = tokens.unsqueeze(1)
        b, k = tokens.shape[:2]
        low = self.sam_decoder.decode(target_sam.repeat_interleave(k, dim=0), tokens.flatten(0, 1))
        low = low.reshape(b, k, *low.shape[-2:]).mean(dim=1, keepdim=True)
        return upsample_logits(low, self.output_size)

    def forward(self, features: EpisodeFeatures) -> dict[str, torch.Tensor]:
        """
        Returns:
          mask_logits: B x 1 x 512 x 512 (mean over shots of the per-shot logits).
          prompt_tokens: B x k x 50 x 256.  pseudo_mask: B x k x G x G (prior).
          attention_pseudo_masks: B x k x (T-1) x G x G.  attention_maps: B x k x 2T x 50 x G*G.
        """
        self.check_features(features)
        enc = self.prompt_encoder(features)
        return {
            "mask_logits": self.decode_tokens(features.target_sam, enc["tokens"]),
            "prompt_tokens": enc["tokens"],
            "pseudo_mask": enc["pseudo_mask"],
            "attention_pseudo_masks": enc["attention_pseudo_masks"],
            "attention_maps": enc["attention_maps"],
        }

    def loss(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """prompt (BCE + Dice at 512) + 0.5 guide + 0.05 orthogonality, valid pixels only."""
        return self.criterion(outputs, targets, valid)
