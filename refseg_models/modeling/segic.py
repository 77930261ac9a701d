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
  for novel-class evaluation, see ``forward``);
* ``instance_type_embed``: Embedding(2, 256) of the cross-instance prompt (``cross_instance_prompt``,
  on by default as in the authors' training script, not in the paper; :func:`cross_instance_prompt`).

Per target image and instruction the sparse prompt is, in the authors' order: the top-1 point of
the cosine map (+ SAM's padding token when no box), the target GT box (training only, p = 0.5),
the meta token, then the k visual tokens (one per reference shot); with the cross-instance prompt
(p = 0.5 per target in training, always at inference) the visual tokens of ALL the target's
instructions (positives, then negatives) plus a type embedding (own 1, others 0) instead. The dense
prompt is the cosine map itself. Decoding is SAM's, one target image against its instruction sets (as the authors do).

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

Training on mixed data (docs/segic_training.md): ``EpisodeFeatures.instructions`` carries up to
``max_instructions`` instructions per target (the instances of an instance-data sample), all decoded
against the ONE neck embedding of their target; in training mode the model draws negative
instructions for targets that list ``negative_classes`` from its own per-class queue of past
instance features (the authors' ``--add_neg_prompt``: p = 0.25 per semantic target, at most 40
absent classes considered, one queued feature each, up to ``max_instructions`` instruction sets per
target in all), and :meth:`SegIC.after_step` pushes the step's keyed instance features. The queue is
the model's :meth:`extra_state` (saved in and restored from the training checkpoint).
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
from refseg_models.feature_spec import FeatureSpec
from refseg_models.method import RefSegMethod
from refseg_models.modeling.inputs import EpisodeFeatures, InstructionSet
from refseg_models.modeling.segic_instructions import geometric_instruction, instance_features, masks_to_boxes
from refseg_models.modeling.segic_neck import SegICNeck
from refseg_models.modeling.segic_prompt_encoder import SegICPromptEncoder
from refseg_models.modeling.segic_training import InstanceFeatureQueue

# DINOv2 channel widths, for the documented parameter counts.
DINOV2_CHANNELS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024}


@dataclass(frozen=True)
class SegICConfig(MethodConfig):
    """SegIC's configuration; defaults are the paper's DINOv2-L setting (C = 1024, 896 input, 64 x 64
    grid, 1 point, box prompt p = 0.5 in training, loss on 12,544 importance-sampled points, negative
    instructions weighted 0.1 in the CE term, context reversion on).

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
    # Negative entity augmentation from the queue (authors' --add_neg_prompt, que_len 128; 0 = off).
    negative_queue_length: int = 128
    negative_prob: float = 0.25
    negative_candidates: int = 40
    # Instruction sets decoded per target in training, positives first (authors' num_inst = 10).
    max_instructions: int = 10
    # The authors' --use_cross_inst_prompt (set by their training script scripts/segic_dist.sh; not
    # in the paper): every instruction's prompt holds the visual tokens of ALL instructions of its
    # target, plus a learned type embedding (own / other); p = 0.5 per target in training, always
    # at inference. Adds an Embedding(2, 256): 512 trainable parameters.
    cross_instance_prompt: bool = True

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(backbone=(self.feature_key,), target_boxes=True)


class SegIC(RefSegMethod):
    config_class = SegICConfig
    uses_sam_decoder = False
    logits_frame = "backbone"
    frozen_modules = ()
    # The IoU head and the unused multimask tokens never get a gradient (the authors train with
    # --find_unused_params too).
    ddp_find_unused_parameters = True

    def __init__(
        self,
        config: SegICConfig,
        neck: SegICNeck,
        prompt_encoder: SegICPromptEncoder,
        mask_decoder: MaskDecoder,
        visual_instruction: nn.Linear,
        meta_instruction: nn.Linear | None = None,
        instance_type_embed: nn.Embedding | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.neck = neck
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.visual_instruction = visual_instruction
        self.meta_instruction = meta_instruction
        self.instance_type_embed = instance_type_embed
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
        if config.max_instructions < 1 or not 0.0 <= config.negative_prob <= 1.0 or config.negative_queue_length < 0:
            raise ModelError("SegIC needs max_instructions >= 1, 0 <= negative_prob <= 1, negative_queue_length >= 0")
        self.queue = InstanceFeatureQueue(config.negative_queue_length) if config.negative_queue_length > 0 else None

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
        # the authors' inst_type_embed = nn.Embedding(2, 256) (model/segic.py lines 209-210)
        types = nn.Embedding(2, config.embed_dim) if config.cross_instance_prompt else None
        return cls(config, neck, prompt_encoder, mask_decoder, nn.Linear(config.in_channels, config.embed_dim), meta, types)

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
        visual_tokens: torch.Tensor,
        target_features: torch.Tensor,
        box: torch.Tensor | None,
        meta_token: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Decode n instruction sets against one target.

        Args:
            image_embedding: 1 x 256 x s x s neck output of the target.
            prototypes: n x k x C instance features (k shots per instruction).
            visual_tokens: n x t x 256 visual instruction tokens (the projected prototypes, t = k,
                or the cross-instance prompt).
            target_features: C x s x s raw target features (for the cosine map).
            box: 1 x 4 (shared) or n x 4 (per instruction) target boxes in input pixels, or None.
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
        extra.append(visual_tokens)
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

        ``target_boxes`` / ``meta_embeddings`` come from ``features``; ``features.instructions``
        (several instructions per target) replaces ``reference_masks`` / ``target_boxes`` when given.
        ``negative_prototypes`` are explicit negative instructions; without them, in training mode,
        targets whose instructions list ``negative_classes`` get negatives from the model's queue.
        ``novel_class_eval`` refuses a meta instruction. In training mode with
        ``config.context_reversion`` the outputs hold a ``"reversed"`` pass (its own outputs plus
        ``targets`` / ``valid``) that the criterion averages in.
        """
        self.check_features(features)
        target = features.target_backbone[self.feature_key]
        reference = features.reference_backbone[self.feature_key]
        instructions = features.instructions
        if instructions is None:
            masks, counts, boxes = features.reference_masks, None, features.target_boxes
        else:
            masks, counts, boxes = instructions.masks.to(target.dtype), instructions.counts, instructions.boxes
            if negative_prototypes is None and self.training:
                negative_prototypes = self.queue_negatives(instructions, target.device, generator)
        outputs = self.forward_tensors(
            target,
            reference,
            masks,
            instruction_counts=counts,
            target_boxes=boxes,
            meta_embeddings=features.meta_embeddings,
            negative_prototypes=negative_prototypes,
            novel_class_eval=novel_class_eval,
            generator=generator,
        )
        if self.training and self.config.context_reversion:
            if instructions is None:
                outputs["reversed"] = self._reversed_single(outputs, features, target, reference, novel_class_eval, generator)
            else:
                outputs["reversed"] = self._reversed_instructions(
                    outputs, features, instructions, masks, target, reference, novel_class_eval, generator
                )
        return outputs

    def _reversed_single(self, outputs, features, target, reference, novel_class_eval, generator) -> dict[str, Any]:
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
        return second

    def _reversed_instructions(
        self, outputs, features, instructions: InstructionSet, masks, target, reference, novel_class_eval, generator
    ) -> dict[str, Any]:
        """Context reversion with several instructions per target: the reference (shot 0) becomes the
        target, each instruction's detached prediction its reference mask, each instruction's
        reference mask its ground truth (invalid where the reference has no image content, and for
        padding instructions). Negatives are not redrawn for the reversed pass (the authors' code
        draws them there against the ORIGINAL target's absent classes)."""
        b, n = masks.shape[:2]
        size = masks.shape[-2:]
        first = F.interpolate(outputs["instruction_logits"].detach(), size, mode="bilinear", align_corners=False) > 0
        new_ground_truth = masks[:, :, 0]  # B x n x H x W
        boxes = masks_to_boxes(new_ground_truth.flatten(0, 1)).view(b, n, 4).to(target.dtype)
        second = self.forward_tensors(
            reference[:, 0],
            target[:, None],
            first[:, :, None].to(masks.dtype),
            instruction_counts=instructions.counts,
            target_boxes=boxes,
            meta_embeddings=features.meta_embeddings,
            novel_class_eval=novel_class_eval,
            generator=generator,
        )
        valid = torch.ones_like(new_ground_truth, dtype=target.dtype)
        if instructions.reference_valid is not None:
            valid = valid * instructions.reference_valid[:, 0][:, None].to(target.dtype)
        slots = torch.arange(n, device=valid.device)[None, :]
        real = slots < torch.as_tensor(instructions.counts, device=valid.device)[:, None]
        second["targets"] = (new_ground_truth > 0.5).to(target.dtype)
        second["valid"] = valid * real[..., None, None].to(valid.dtype)
        return second

    def queue_negatives(
        self, instructions: InstructionSet, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> list[torch.Tensor | None] | None:
        """Negative instructions from the queue, per target (None where it gets none): with
        probability ``negative_prob`` a target that lists ``negative_classes`` gets one queued feature
        of each of up to ``max_instructions - count`` random absent classes (among at most
        ``negative_candidates`` of them, as the authors)."""
        if self.queue is None or instructions.negative_classes is None or len(self.queue) == 0:
            return None
        out: list[torch.Tensor | None] = []
        for count, candidates in zip(instructions.counts, instructions.negative_classes):
            room = self.config.max_instructions - int(count)
            if not candidates or room <= 0 or torch.rand((), generator=generator).item() >= self.config.negative_prob:
                out.append(None)
                continue
            candidates = list(candidates)
            if len(candidates) > self.config.negative_candidates:
                keep = torch.randperm(len(candidates), generator=generator)[: self.config.negative_candidates].tolist()
                candidates = [candidates[i] for i in keep]
            picked = self.queue.sample_from(candidates, room, generator)
            out.append(picked.to(device) if picked.shape[0] else None)
        return out

    def after_step(self, outputs: Mapping[str, Any], features: EpisodeFeatures) -> None:
        """Push the step's keyed instance features (first pass, shots averaged) into the queue."""
        instructions = features.instructions
        if self.queue is None or instructions is None or instructions.classes is None:
            return
        prototypes = outputs["instruction_prototypes"].detach()
        classes = instructions.classes.tolist()
        keys, feats = [], []
        for b, count in enumerate(instructions.counts):
            for j in range(int(count)):
                if classes[b][j] >= 0:
                    keys.append(int(classes[b][j]))
                    feats.append(prototypes[b, j].mean(0))
        if keys:
            self.queue.push(keys, torch.stack(feats).float())

    def extra_state(self) -> dict[str, Any] | None:
        return None if self.queue is None else {"negative_queue": self.queue.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any] | None) -> None:
        if self.queue is None:
            return super().load_extra_state(state)
        if state is None or "negative_queue" not in state:
            raise ModelError("segic: the training checkpoint holds no negative queue to restore")
        self.queue.load_state_dict(state["negative_queue"])

    def loss(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point-sampled sigmoid-CE (positives 1, negatives 0.1) + Dice (every mask 1), both divided
        by the summed weights as the authors' code does; the mean of both passes."""
        return self.criterion(outputs, targets, valid)

    def forward_tensors(
        self,
        target_features: torch.Tensor,
        reference_features: torch.Tensor,
        reference_masks: torch.Tensor,
        *,
        instruction_counts: Sequence[int] | None = None,
        target_boxes: torch.Tensor | None = None,
        meta_embeddings: torch.Tensor | None = None,
        negative_prototypes: Sequence[torch.Tensor | None] | None = None,
        novel_class_eval: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Segment each target given its k reference shots (and, optionally, n instructions over them).

        Args:
            target_features: B x C x h x w frozen-encoder features of the targets.
            reference_features: B x k x C x h x w features of the reference shots.
            reference_masks: B x k x H x W reference masks in {0, 1}, in the model input frame
                (H = W = ``input_size`` for the geometry to be right; any size works for pooling);
                or B x n x k x H x W: n instructions per target over the same references, of which
                the first ``instruction_counts[b]`` are real (the rest padding). The neck runs once
                per target; its n instructions are decoded together.
            instruction_counts: real instructions per target (default: all n).
            target_boxes: B x 4 (or B x n x 4 with n instructions) GT boxes in input pixels; used only
                in training, per target with probability ``box_prob`` (never alongside negatives, as
                the authors do).
            meta_embeddings: B x text_dim text embeddings (only with ``use_meta_instruction``).
            negative_prototypes: per target, n_b x C instance features of entities absent from it
                (negative entity augmentation); their targets are empty masks.
            novel_class_eval: True when evaluating on novel classes: a meta instruction would leak
                the class name, so passing ``meta_embeddings`` then is refused.
            generator: RNG for the box-prompt coin flip.

        Returns:
            dict with ``mask_logits`` B x 1 x 4s x 4s (s = ``feature_size``; 256 x 256 at the
            default, in the padded input frame) of instruction 0, ``instruction_logits`` B x n x 4s x 4s
            (padding instructions are zero), ``iou_predictions`` B x 1, ``dense_prompt``
            B x 1 x input x input (cosine map), ``points`` B x num_points x 2 (input pixels) and
            ``prototypes`` B x k x C of instruction 0, ``instruction_prototypes`` B x n x k x C, and
            ``negative_mask_logits``: a list of B tensors n_b x 1 x 4s x 4s (n_b = 0 when a target
            has no negatives).
        """
        multi = reference_masks.dim() == 5
        if target_features.dim() != 4 or reference_features.dim() != 5 or reference_masks.dim() not in (4, 5):
            raise ModelError(
                "SegIC expects target_features B x C x h x w, reference_features B x k x C x h x w and "
                f"reference_masks B x k x H x W (or B x n x k x H x W); got {tuple(target_features.shape)}, "
                f"{tuple(reference_features.shape)}, {tuple(reference_masks.shape)}"
            )
        b, k = reference_features.shape[:2]
        masks = reference_masks if multi else reference_masks[:, None]
        n = masks.shape[1]
        if target_features.shape[0] != b or masks.shape[0] != b or masks.shape[2] != k:
            raise ModelError("batch size / shot count of targets, references and masks differ")
        if target_features.shape[1] != self.in_channels or reference_features.shape[2] != self.in_channels:
            raise ModelError(
                f"SegIC was built for {self.in_channels}-channel features, got "
                f"{target_features.shape[1]} (target) / {reference_features.shape[2]} (reference)"
            )
        counts = [n] * b if instruction_counts is None else [int(c) for c in instruction_counts]
        if len(counts) != b or any(not 1 <= c <= n for c in counts):
            raise ModelError(f"instruction_counts must give 1..{n} instructions for each of the {b} targets, got {counts}")
        if target_boxes is not None and not multi:
            target_boxes = target_boxes[:, None]
        if target_boxes is not None and tuple(target_boxes.shape) != (b, n, 4):
            raise ModelError(f"target_boxes must be B x 4 (or B x n x 4), got {tuple(target_boxes.shape)}")
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
        if multi:
            prototypes = _instruction_features(reference.view(b, k, *reference.shape[1:]), masks)  # B x n x k x C
        else:
            prototypes = instance_features(reference, reference_masks.flatten(0, 1)).view(b, 1, k, -1)
        embeddings = self.neck(target)  # once per target, whatever the number of its instructions

        meta_tokens = None
        if self.meta_instruction is not None:
            meta_tokens = self.meta_instruction(meta_embeddings.to(target.dtype))[:, None]  # B x 1 x 256

        outputs: dict[str, list[torch.Tensor]] = {
            key: [] for key in ("mask_logits", "iou_predictions", "dense_prompt", "points")
        }
        instruction_logits: list[torch.Tensor] = []
        negatives_out: list[torch.Tensor] = []
        low_res = 4 * self.feature_size
        for i in range(b):
            count = counts[i]
            negatives = None if negative_prototypes is None else negative_prototypes[i]
            has_negatives = negatives is not None and negatives.shape[0] > 0
            box = None
            if self.training and target_boxes is not None and not has_negatives:
                if torch.rand((), generator=generator).item() < self.box_prob:
                    box = target_boxes[i, :count].to(target.dtype)
            meta = None if meta_tokens is None else meta_tokens[i : i + 1]
            visual = [self.visual_instruction(prototypes[i, :count])]  # count x k x 256
            if has_negatives:
                visual.append(self.visual_instruction(negatives[:, None].to(target.dtype)))  # n_b x 1 x 256
            # the authors' `inference or random.random() > 0.5` (model/segic.py line 677)
            cross = self.instance_type_embed is not None and (
                not self.training or torch.rand((), generator=generator).item() >= 0.5
            )
            if cross:
                visual = cross_instance_prompt(visual, self.instance_type_embed)
            result = self._decode(embeddings[i : i + 1], prototypes[i, :count], visual[0], target[i], box, meta)
            for key in outputs:
                outputs[key].append(result[key][:1])
            logits = result["mask_logits"][:, 0]  # count x 4s x 4s
            if count < n:
                logits = torch.cat([logits, logits.new_zeros(n - count, *logits.shape[1:])])
            instruction_logits.append(logits)
            if has_negatives:
                # A negative instruction carries no class name, so no meta token (the authors feed CLIP's
                # empty prompt there; without a text encoder we leave the token out).
                neg_meta = None
                neg = self._decode(
                    embeddings[i : i + 1], negatives[:, None].to(target.dtype), visual[1], target[i], None, neg_meta
                )
                negatives_out.append(neg["mask_logits"])
            else:
                negatives_out.append(target.new_zeros(0, 1, low_res, low_res))
        result = {key: torch.cat(value) for key, value in outputs.items()}
        result["instruction_logits"] = torch.stack(instruction_logits)
        result["prototypes"] = prototypes[:, 0]
        result["instruction_prototypes"] = prototypes
        result["negative_mask_logits"] = negatives_out
        return result


def cross_instance_prompt(groups: Sequence[torch.Tensor], type_embed: nn.Embedding) -> list[torch.Tensor]:
    """SegIC's cross-instance prompt (the authors' ``--use_cross_inst_prompt``:
    ``process_cross_inst_prompt``, model/segic.py lines 1029-1039, applied at lines 677 and 692-695).

    Args:
        groups: the visual tokens of one target's instructions, in decoding order (positives, then
            negatives): tensors n_g x t_g x D (t_g tokens per instruction: k shots, or 1).
        type_embed: Embedding(2, D): index 1 for an instruction's own tokens, 0 for the others'.
    Returns:
        the same groups, each instruction's tokens replaced by ALL T = sum n_g t_g tokens of the
        target (instruction-major, as the authors' ``prompt.flatten(0, 1)``) plus the type
        embedding: n_g x T x D per group.
    """
    tokens = torch.cat([group.flatten(0, 1) for group in groups])  # T x D
    per_instruction = torch.cat([torch.full((group.shape[0],), group.shape[1]) for group in groups])
    owner = torch.arange(len(per_instruction)).repeat_interleave(per_instruction).to(tokens.device)  # T
    types = (owner[None, :] == torch.arange(len(per_instruction), device=tokens.device)[:, None]).long()  # N x T
    prompts = tokens[None] + type_embed(types)
    return list(prompts.split([group.shape[0] for group in groups]))


def _instruction_features(reference: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """B x k x C x h x w reference features, B x n x k x H x W masks -> B x n x k x C masked means:
    :func:`instance_features` of every (instruction, shot) without copying the features n times."""
    b, n, k, height, width = masks.shape
    h, w = reference.shape[-2:]
    small = F.interpolate(masks.reshape(b * n * k, 1, height, width).float(), (h, w), mode="bilinear", align_corners=False)
    small = (small > 0.5).to(reference.dtype).view(b, n, k, h, w)
    area = small.sum(dim=(-1, -2)).clamp(min=1.0)
    return torch.einsum("bkchw,bnkhw->bnkc", reference, small) / area[..., None]
