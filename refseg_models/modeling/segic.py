"""SegIC (Meng et al., ECCV 2024): an in-context decoder trained from scratch on frozen DINOv2 features.

Trainable parts (METHODS.md, authors' ``model/segic.py`` + ``model/backbone/__init__.py``):

* ``neck``: 1x1 conv C->256 + LayerNorm2d + 3x3 conv + LayerNorm2d (:class:`SegICNeck`);
* ``prompt_encoder``: SAM's PromptEncoder whose dense-mask path downscales the input-resolution
  cosine map to the 64x64 grid with strides (7, 2) (:class:`SegICPromptEncoder`);
* ``mask_decoder``: SAM's MaskDecoder (two-way transformer depth 2, 8 heads, MLP 2048, 3 + 1 mask
  tokens, IoU head), instantiated fresh from segment_anything's classes and trained from scratch;
* ``visual_instruction``: Linear(C->256) on the masked mean of the reference features;
* ``meta_instruction``: Linear(text_dim->256) on a text embedding, only with
  ``use_meta_instruction=True`` (default off; refused for novel-class evaluation, see ``forward``).

Per target image and instruction the sparse prompt is, in the authors' order: the top-1 point of
the cosine map (+ SAM's padding token when no box), the target GT box (training only, p = 0.5),
the meta token, then the k visual tokens (one per reference shot). The dense prompt is the cosine
map itself. Decoding is SAM's, one target image against its instruction sets (as the authors do).

Deliberate deviations (stated in docs/methods_segic_persam.md):
* k-shot (the paper is 1-shot): k visual tokens and the mean of the k per-shot cosine maps;
* features whose grid differs from ``feature_size`` are resized bilinearly to it (only needed for
  non-ViT backbones such as the MobileNetV2 used in the tests; DINOv2 at 896 already gives 64x64);
* there is no CLIP here: meta embeddings are passed in by the caller (precomputed text features).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from torch import nn

from refseg_models.modeling.segic_instructions import geometric_instruction, instance_features
from refseg_models.modeling.segic_neck import SegICNeck
from refseg_models.modeling.segic_prompt_encoder import SegICPromptEncoder

# DINOv2 channel widths, for the documented parameter counts.
DINOV2_CHANNELS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024}


class SegIC(nn.Module):
    def __init__(
        self,
        neck: SegICNeck,
        prompt_encoder: SegICPromptEncoder,
        mask_decoder: MaskDecoder,
        visual_instruction: nn.Linear,
        meta_instruction: nn.Linear | None = None,
        *,
        input_size: int = 896,
        feature_size: int = 64,
        similarity_size: int | None = 224,
        num_points: int = 1,
        box_prob: float = 0.5,
        tau: float = 1.0,
        feature_key: str = "patch_tokens",
    ) -> None:
        super().__init__()
        self.neck = neck
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.visual_instruction = visual_instruction
        self.meta_instruction = meta_instruction
        self.input_size = input_size
        self.feature_size = feature_size
        self.similarity_size = similarity_size
        self.num_points = num_points
        self.box_prob = box_prob
        self.tau = tau
        self.feature_key = feature_key

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
            raise ValueError(
                "SegIC expects target_features B x C x h x w, reference_features B x k x C x h x w and "
                f"reference_masks B x k x H x W; got {tuple(target_features.shape)}, "
                f"{tuple(reference_features.shape)}, {tuple(reference_masks.shape)}"
            )
        b, k = reference_features.shape[:2]
        if target_features.shape[0] != b or reference_masks.shape[:2] != (b, k):
            raise ValueError("batch size / shot count of targets, references and masks differ")
        if target_features.shape[1] != self.in_channels or reference_features.shape[2] != self.in_channels:
            raise ValueError(
                f"SegIC was built for {self.in_channels}-channel features, got "
                f"{target_features.shape[1]} (target) / {reference_features.shape[2]} (reference)"
            )
        if meta_embeddings is not None:
            if not self.use_meta_instruction:
                raise ValueError("meta_embeddings given but the model has use_meta_instruction=False")
            if novel_class_eval:
                raise ValueError(
                    "meta (text) instructions are refused for novel-class evaluation: the class name "
                    "would turn one-shot segmentation into text-prompted segmentation"
                )
        if negative_prototypes is not None and len(negative_prototypes) != b:
            raise ValueError(f"negative_prototypes must have one entry per target ({b})")

        target = self._to_grid(target_features)
        reference = self._to_grid(reference_features.flatten(0, 1))
        prototypes = instance_features(reference, reference_masks.flatten(0, 1)).view(b, k, -1)
        embeddings = self.neck(target)

        meta_tokens = None
        if self.meta_instruction is not None:
            if meta_embeddings is None:
                # No text: a zero text embedding (the authors feed CLIP's empty prompt).
                meta_embeddings = target.new_zeros(b, self.meta_instruction.in_features)
            meta_tokens = self.meta_instruction(meta_embeddings)[:, None]  # B x 1 x 256

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
                neg_meta = None
                if self.meta_instruction is not None:
                    # The authors fall back to an empty text for negatives without a known name.
                    neg_meta = self.meta_instruction(target.new_zeros(n, self.meta_instruction.in_features))[:, None]
                neg = self._decode(embeddings[i : i + 1], negatives[:, None].to(target.dtype), target[i], None, neg_meta)
                negatives_out.append(neg["mask_logits"])
            else:
                negatives_out.append(target.new_zeros(0, 1, low_res, low_res))
        result = {key: torch.cat(value) for key, value in outputs.items()}
        result["prototypes"] = prototypes
        result["negative_mask_logits"] = negatives_out
        return result


def build_segic(
    in_channels: int = 1024,
    embed_dim: int = 256,
    input_size: int = 896,
    feature_size: int = 64,
    mask_in_chans: int = 16,
    mask_down_strides: Sequence[int] = (7, 2),
    similarity_size: int | None = None,
    num_points: int = 1,
    box_prob: float = 0.5,
    tau: float = 1.0,
    use_meta_instruction: bool = False,
    text_dim: int = 768,
    feature_key: str = "patch_tokens",
    encoder: str | None = None,
) -> SegIC:
    """SegIC with the paper's DINOv2-L configuration (C = 1024, 896 input, 64x64 grid) by default.

    ``encoder`` may name a DINOv2 variant (``dinov2_vitb14`` ...) to take ``in_channels`` from it.
    ``similarity_size`` defaults to input_size // 4 (224), where the authors compute the cosine map.
    The SAM-style decoder is SAM's exact configuration: TwoWayTransformer(depth=2, 256, mlp 2048,
    8 heads), 3 multimask outputs + 1, IoU head depth 3 / hidden 256, all randomly initialised.
    """
    if encoder is not None:
        if encoder not in DINOV2_CHANNELS:
            raise ValueError(f"unknown SegIC encoder {encoder!r}; known: {sorted(DINOV2_CHANNELS)}")
        in_channels = DINOV2_CHANNELS[encoder]
    strides = tuple(int(s) for s in mask_down_strides)
    if len(strides) != 2:
        raise ValueError(f"mask_down_strides must have two entries, got {mask_down_strides}")
    neck = SegICNeck(in_channels, embed_dim)
    prompt_encoder = SegICPromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(feature_size, feature_size),
        input_image_size=(input_size, input_size),
        mask_in_chans=mask_in_chans,
        mask_down_strides=strides,  # type: ignore[arg-type]
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=2048, num_heads=8),
        transformer_dim=embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return SegIC(
        neck,
        prompt_encoder,
        mask_decoder,
        nn.Linear(in_channels, embed_dim),
        nn.Linear(text_dim, embed_dim) if use_meta_instruction else None,
        input_size=input_size,
        feature_size=feature_size,
        similarity_size=input_size // 4 if similarity_size is None else similarity_size,
        num_points=num_points,
        box_prob=box_prob,
        tau=tau,
        feature_key=feature_key,
    )
