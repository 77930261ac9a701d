"""SegIC (Meng et al., ECCV 2024): an in-context decoder trained from scratch on frozen DINOv2 features.

Trainable parts (the paper, section 3, and the authors' ``model/segic.py`` +
``model/backbone/__init__.py``; details in docs/methods_segic_persam.md):

* ``neck``: 1x1 conv C->256 + LayerNorm2d + 3x3 conv + LayerNorm2d (:class:`SegICNeck`);
* ``prompt_encoder``: SAM's PromptEncoder whose dense-mask path downscales the input-resolution
  cosine map to the 64x64 grid with strides (7, 2) (:class:`SegICPromptEncoder`);
* ``mask_decoder``: SAM's MaskDecoder (two-way transformer depth 2, 8 heads, MLP 2048, 3 + 1 mask
  tokens, IoU head), instantiated fresh from segment_anything's classes and trained from scratch;
* ``visual_instruction``: Linear(C->256) on the masked mean of the reference features;
* ``meta_instruction``: Linear(text_dim->256) on a text embedding, only with
  ``use_meta_instruction=True`` (default off; it then needs real text embeddings, and is refused
  for novel-class evaluation, see ``forward``).

Per target image and instruction the sparse prompt is, in the authors' order: the top-1 point of
the cosine map (+ SAM's padding token when no box), the target GT box (training only, p = 0.5),
the meta token, then the k visual tokens (one per reference shot). The dense prompt is the cosine
map itself. Decoding is SAM's, one target image against its instruction sets (as the authors do).

Deliberate deviations (stated in docs/methods_segic_persam.md):
* k-shot (the paper is 1-shot): k visual tokens and the mean of the k per-shot cosine maps;
* features whose grid differs from ``feature_size`` are resized bilinearly to it (only needed for
  non-ViT backbones such as the MobileNetV2 used in the tests; DINOv2 at 896 already gives 64x64);
* there is no CLIP here: meta embeddings are passed in by the caller (precomputed text features);
  a model with the meta instruction on and no text embedding is refused (never a zero vector).
* context reversion (``--reverse_context``) runs inside ``forward`` in training mode when
  ``config.context_reversion``: a second pass with reference and target swapped, the detached first
  prediction (> 0) as the new reference mask and the first reference as the new ground truth; the
  criterion averages both passes. With k > 1 shots only shot 0 is reversed (the paper is 1-shot).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from torch import nn

from refseg_models.config import MethodConfig
from refseg_models.criterion import SegICCriterion
from refseg_models.errors import ModelError
from refseg_models.method import FeatureSpec, RefSegMethod
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.segic_instructions import geometric_instruction, instance_features, masks_to_boxes
from refseg_models.modeling.segic_neck import SegICNeck
from refseg_models.modeling.segic_prompt_encoder import SegICPromptEncoder

# DINOv2 channel widths, for the documented parameter counts.
DINOV2_CHANNELS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024}


@dataclass(frozen=True)
class SegICConfig(MethodConfig):
    """SegIC's configuration; defaults are the paper's DINOv2-L setting (C = 1024, 896 input, 64 x 64
    grid, 1 point, box prompt p = 0.5 in training, loss on 12,544 importance-sampled points, negative
    instructions weighted 0.1, context reversion on).

    ``in_channels``: channels of the frozen encoder's ``feature_key`` map (ViT-B 768, ViT-L 1024;
    ``DINOV2_CHANNELS``). ``similarity_size``: side at which cosine maps are computed (None:
    input_size // 4 = 224, the authors').
    """

    in_channels: int = 1024
    embed_dim: int = 256
    input_size: int = 896
    feature_size: int = 64
    mask_in_chans: int = 16
    mask_down_strides: tuple[int, int] = (7, 2)
    similarity_size: int | None = None
    num_points: int = 1
    box_prob: float = 0.5
    tau: float = 1.0
    use_meta_instruction: bool = False
    text_dim: int = 768
    feature_key: str = "patch_tokens"
    context_reversion: bool = True
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    negative_weight: float = 0.1
    loss_points: int = 112 * 112
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75


class SegIC(RefSegMethod):
    name = "segic"
    config_class = SegICConfig
    uses_sam_decoder = False
    logits_frame = "backbone"
    frozen_modules = ()

    def __init__(
        self,
        config: SegICConfig,
        neck: SegICNeck,
        prompt_encoder: SegICPromptEncoder,
        mask_decoder: MaskDecoder,
        visual_instruction: nn.Linear,
        meta_instruction: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.neck = neck
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.visual_instruction = visual_instruction
        self.meta_instruction = meta_instruction
        self.input_size = config.input_size
        self.feature_size = config.feature_size
        self.similarity_size = config.input_size // 4 if config.similarity_size is None else config.similarity_size
        self.num_points = config.num_points
        self.box_prob = config.box_prob
        self.tau = config.tau
        self.feature_key = config.feature_key
        self.criterion = SegICCriterion(
            config.ce_weight,
            config.dice_weight,
            config.negative_weight,
            config.loss_points,
            config.oversample_ratio,
            config.importance_sample_ratio,
        )

    @classmethod
    def from_config(cls, config: SegICConfig, sam_decoder: nn.Module | None = None) -> "SegIC":
        """The SAM-style decoder is SAM's exact configuration: TwoWayTransformer(depth=2, 256,
        mlp 2048, 8 heads), 3 multimask outputs + 1, IoU head depth 3 / hidden 256, all trained from
        scratch (SegIC uses no pretrained SAM decoder: ``sam_decoder`` must be None)."""
        if sam_decoder is not None:
            raise ModelError("SegIC trains its own decoder from scratch: it takes no SAM decoder")
        strides = tuple(int(s) for s in config.mask_down_strides)
        if len(strides) != 2:
            raise ModelError(f"mask_down_strides must have two entries, got {config.mask_down_strides}")
        neck = SegICNeck(config.in_channels, config.embed_dim)
        prompt_encoder = SegICPromptEncoder(
            embed_dim=config.embed_dim,
            image_embedding_size=(config.feature_size, config.feature_size),
            input_image_size=(config.input_size, config.input_size),
            mask_in_chans=config.mask_in_chans,
            mask_down_strides=strides,  # type: ignore[arg-type]
        )
        mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=config.embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=config.embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        meta = nn.Linear(config.text_dim, config.embed_dim) if config.use_meta_instruction else None
        return cls(config, neck, prompt_encoder, mask_decoder, nn.Linear(config.in_channels, config.embed_dim), meta)

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(backbone=(self.feature_key,), target_boxes=True)

    def frame_size(self) -> int:
        return self.input_size

    @classmethod
    def config_for_features(cls, config: SegICConfig, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> SegICConfig:
        """``in_channels`` from the frozen encoder's ``feature_key`` map."""
        if "backbone" in shapes and config.feature_key in shapes["backbone"]:
            return config.replace(in_channels=int(shapes["backbone"][config.feature_key][0]))
        return config

    @property
    def in_channels(self) -> int:
        return self.visual_instruction.in_features

    @property
    def use_meta_instruction(self) -> bool:
        return self.meta_instruction is not None

    def _to_grid(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-2:] == (self.feature_size, self.feature_size):
            return features
        return F.interpolate(
            features, (self.feature_size, self.feature_size), mode="bilinear", align_corners=False
        )

    def _decode(
        self,
        image_embedding: torch.Tensor,
        prototypes: torch.Tensor,
        target_features: torch.Tensor,
        box: torch.Tensor | None,
        meta_token: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Decode n instruction sets against one target.

        Args:
            image_embedding: 1 x 256 x s x s neck output of the target.
            prototypes: n x k x C instance features (k shots per instruction).
            target_features: C x s x s raw target features (for the cosine map).
            box: 1 x 4 target box in input pixels, or None.
            meta_token: n x 1 x 256 projected meta instruction, or None.
        """
        n = prototypes.shape[0]
        dense, points = geometric_instruction(
            target_features, prototypes, self.input_size, self.similarity_size, self.num_points, self.tau
        )
        labels = torch.ones(points.shape[:2], dtype=torch.int64, device=points.device)
        boxes = box.expand(n, 4) if box is not None else None
        sparse, dense_embeddings = self.prompt_encoder(points=(points, labels), boxes=boxes, masks=dense)
        extra = [] if meta_token is None else [meta_token]
        extra.append(self.visual_instruction(prototypes))  # n x k x 256
        sparse = torch.cat([sparse, *extra], dim=1)
        low_res, iou = self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense_embeddings,
            multimask_output=False,
        )
        return {"mask_logits": low_res, "iou_predictions": iou, "dense_prompt": dense, "points": points}

    def forward(
        self,
        features: EpisodeFeatures,
        *,
        negative_prototypes: Sequence[torch.Tensor | None] | None = None,
        novel_class_eval: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """The contract's forward: SegIC on ``features.target_backbone[feature_key]`` etc.

        ``target_boxes`` / ``meta_embeddings`` come from ``features``; ``negative_prototypes`` are
        the queue's negative instructions (training); ``novel_class_eval`` refuses a meta instruction.
        In training mode with ``config.context_reversion`` the outputs hold a ``"reversed"`` pass
        (its own outputs plus ``targets`` / ``valid``) that the criterion averages in.
        """
        self.check_features(features)
        target = features.target_backbone[self.feature_key]
        reference = features.reference_backbone[self.feature_key]
        outputs = self.forward_tensors(
            target,
            reference,
            features.reference_masks,
            target_boxes=features.target_boxes,
            meta_embeddings=features.meta_embeddings,
            negative_prototypes=negative_prototypes,
            novel_class_eval=novel_class_eval,
            generator=generator,
        )
        if self.training and self.config.context_reversion:
            size = features.reference_masks.shape[-2:]
            first = F.interpolate(outputs["mask_logits"].detach(), size, mode="bilinear", align_corners=False) > 0
            new_ground_truth = features.reference_masks[:, 0]
            second = self.forward_tensors(
                reference[:, 0],
                target[:, None],
                first.to(features.reference_masks.dtype),
                target_boxes=masks_to_boxes(new_ground_truth),
                meta_embeddings=features.meta_embeddings,
                novel_class_eval=novel_class_eval,
                generator=generator,
            )
            second["targets"] = (new_ground_truth > 0.5).to(target.dtype)
            second["valid"] = torch.ones_like(second["targets"])
            outputs["reversed"] = second
        return outputs

    def loss(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point-sampled sigmoid-CE + Dice over positives (1) and negatives (0.1), both passes."""
        return self.criterion(outputs, targets, valid)

    def forward_tensors(
        self,
        target_features: torch.Tensor,
        reference_features: torch.Tensor,
        reference_masks: torch.Tensor,
        *,
        target_boxes: torch.Tensor | None = None,
        meta_embeddings: torch.Tensor | None = None,
        negative_prototypes: Sequence[torch.Tensor | None] | None = None,
        novel_class_eval: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Segment each target given its k reference shots.

        Args:
            target_features: B x C x h x w frozen-encoder features of the targets.
            reference_features: B x k x C x h x w features of the reference shots.
            reference_masks: B x k x H x W reference masks in {0, 1}, in the model input frame
                (H = W = ``input_size`` for the geometry to be right; any size works for pooling).
            target_boxes: B x 4 (x0, y0, x1, y1) GT boxes in input pixels; used only in training,
                each with probability ``box_prob`` (never alongside negatives, as the authors do).
            meta_embeddings: B x text_dim text embeddings (only with ``use_meta_instruction``).
            negative_prototypes: per target, n_b x C instance features of entities absent from it
                (negative entity augmentation); their targets are empty masks.
            novel_class_eval: True when evaluating on novel classes: a meta instruction would leak
                the class name, so passing ``meta_embeddings`` then is refused.
            generator: RNG for the box-prompt coin flip.

        Returns:
            dict with ``mask_logits`` B x 1 x 4s x 4s (s = ``feature_size``; 256 x 256 at the
            default, in the padded input frame), ``iou_predictions`` B x 1, ``dense_prompt``
            B x 1 x input x input (cosine map), ``points`` B x num_points x 2 (input pixels),
            ``prototypes`` B x k x C and ``negative_mask_logits``: a list of B tensors
            n_b x 1 x 4s x 4s (n_b = 0 when a target has no negatives).
        """
        if target_features.dim() != 4 or reference_features.dim() != 5 or reference_masks.dim() != 4:
            raise ModelError(
                "SegIC expects target_features B x C x h x w, reference_features B x k x C x h x w and "
                f"reference_masks B x k x H x W; got {tuple(target_features.shape)}, "
                f"{tuple(reference_features.shape)}, {tuple(reference_masks.shape)}"
            )
        b, k = reference_features.shape[:2]
        if target_features.shape[0] != b or reference_masks.shape[:2] != (b, k):
            raise ModelError("batch size / shot count of targets, references and masks differ")
        if target_features.shape[1] != self.in_channels or reference_features.shape[2] != self.in_channels:
            raise ModelError(
                f"SegIC was built for {self.in_channels}-channel features, got "
                f"{target_features.shape[1]} (target) / {reference_features.shape[2]} (reference)"
            )
        if meta_embeddings is not None:
            if not self.use_meta_instruction:
                raise ModelError("meta_embeddings given but the model has use_meta_instruction=False")
            if novel_class_eval:
                raise ModelError(
                    "meta (text) instructions are refused for novel-class evaluation: the class name "
                    "would turn one-shot segmentation into text-prompted segmentation"
                )
        elif self.use_meta_instruction:
            raise ModelError(
                "this SegIC model uses the meta (text) instruction but got no text embedding: pass "
                "EpisodeFeatures.meta_embeddings from a real text encoder (no zero vector stands in for it), "
                "or use a model built with use_meta_instruction=False"
            )
        if negative_prototypes is not None and len(negative_prototypes) != b:
            raise ModelError(f"negative_prototypes must have one entry per target ({b})")

        target = self._to_grid(target_features)
        reference = self._to_grid(reference_features.flatten(0, 1))
        prototypes = instance_features(reference, reference_masks.flatten(0, 1)).view(b, k, -1)
        embeddings = self.neck(target)

        meta_tokens = None
        if self.meta_instruction is not None:
            meta_tokens = self.meta_instruction(meta_embeddings.to(target.dtype))[:, None]  # B x 1 x 256

        outputs: dict[str, list[torch.Tensor]] = {
            key: [] for key in ("mask_logits", "iou_predictions", "dense_prompt", "points")
        }
        negatives_out: list[torch.Tensor] = []
        low_res = 4 * self.feature_size
        for i in range(b):
            negatives = None if negative_prototypes is None else negative_prototypes[i]
            has_negatives = negatives is not None and negatives.shape[0] > 0
            box = None
            if self.training and target_boxes is not None and not has_negatives:
                if torch.rand((), generator=generator).item() < self.box_prob:
                    box = target_boxes[i : i + 1].to(target.dtype)
            meta = None if meta_tokens is None else meta_tokens[i : i + 1]
            result = self._decode(embeddings[i : i + 1], prototypes[i : i + 1], target[i], box, meta)
            for key in outputs:
                outputs[key].append(result[key])
            if has_negatives:
                n = negatives.shape[0]
                # A negative instruction carries no class name, so no meta token (the authors feed CLIP's
                # empty prompt there; without a text encoder we leave the token out).
                neg_meta = None
                neg = self._decode(embeddings[i : i + 1], negatives[:, None].to(target.dtype), target[i], None, neg_meta)
                negatives_out.append(neg["mask_logits"])
            else:
                negatives_out.append(target.new_zeros(0, 1, low_res, low_res))
        result = {key: torch.cat(value) for key, value in outputs.items()}
        result["prototypes"] = prototypes
        result["negative_mask_logits"] = negatives_out
        return result
