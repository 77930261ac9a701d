"""Inference for users: reference image + annotation + target image -> target mask.

``RefSegPredictor.from_checkpoint(path, sam_checkpoint=..., backbone_checkpoint=...)`` rebuilds a
trained method from its inference checkpoint (:mod:`refseg_models.checkpoint`), builds the frozen
encoders it was trained on (refusing other weights or preprocessing), runs them live on raw images
and the method's forward through the method contract (:mod:`refseg_models.method`): no per-method
code here. ``RefSegPredictor.training_free(method, ...)`` does the same for PerSAM and prototype
matching, which have no checkpoint. ``predict(reference_image, reference_annotation, target_image)``
returns a bool mask at the target's original size.

Geometry (:mod:`refseg_models.frames`): a user's reference annotation is rasterised at the
reference's original size (:mod:`refseg_models.annotations`; generated episode annotations may come
in the authors' 512 x 512 frame: any mask that covers the whole reference works), mapped into the
input frame the method reads it in, and the predicted logits are mapped back (crop of the valid
region for padded frames, bilinear resize) before thresholding at 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from refseg_models.annotations import draw_box, draw_points
from refseg_models.build import build_model
from refseg_models.checkpoint import (
    EncoderIdentity,
    check_encoders,
    load_inference_checkpoint,
    model_from_checkpoint,
)
from refseg_models.encoders import build_encoder
from refseg_models.encoders import encoder_options as builder_options
from refseg_models.errors import ModelError
from refseg_models.frames import Frame, frame_of, is_padded
from refseg_models.method import RefSegMethod
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.pseudo_mask import masked_reference_layer4

# ----------------------------------------------------------------------------------------------
# Reference annotations given by users
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """(x0, y0, x1, y1) in pixels of the reference image, inclusive corners."""

    x0: float
    y0: float
    x1: float
    y1: float


@dataclass(frozen=True)
class Points:
    """Clicked object pixels as (x, y)."""

    xy: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Scribble:
    """An H x W stroke mask (nonzero = scribbled object pixels)."""

    mask: np.ndarray


ReferenceAnnotation = Union[np.ndarray, Box, Points, Scribble, Sequence[float], Sequence[Sequence[float]]]


def annotation_to_mask(annotation: Any, image_shape: tuple[int, ...], point_style: str = "disc") -> np.ndarray:
    """Rasterise a user's reference annotation to an H x W bool mask of the reference image.

    Accepted: an H x W array (mask; nonzero = object), :class:`Scribble`, :class:`Box` or a flat
    sequence of 4 numbers (x0, y0, x1, y1) -> filled box, :class:`Points` or a sequence of (x, y)
    pairs -> points drawn with ``point_style`` (``"disc"`` by default for clicks: single pixels
    mostly vanish on a 64 x 64 feature grid; ``"pixel"`` is the authors' encoding). Raises
    ModelError with what was wrong.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    if isinstance(annotation, Scribble):
        annotation = annotation.mask
    if isinstance(annotation, np.ndarray):
        if annotation.ndim == 3 and annotation.shape[2] in (1, 3, 4):
            annotation = annotation[..., 0]
        if annotation.shape != (h, w):
            raise ModelError(f"reference mask has shape {annotation.shape}, the reference image is {h} x {w}")
        mask = annotation > 0
    elif isinstance(annotation, Box) or (
        isinstance(annotation, (list, tuple)) and len(annotation) == 4 and all(np.isscalar(v) for v in annotation)
    ):
        box = annotation if isinstance(annotation, Box) else Box(*map(float, annotation))
        mask = draw_box((h, w), (box.x0, box.y0, box.x1, box.y1))
    elif isinstance(annotation, (Points, list, tuple)):
        mask = draw_points((h, w), annotation.xy if isinstance(annotation, Points) else annotation, point_style)
    else:
        raise ModelError(f"unsupported reference annotation of type {type(annotation).__name__}")
    if not mask.any():
        raise ModelError("the reference annotation covers no pixel of the reference image")
    return mask


# ----------------------------------------------------------------------------------------------
# Predictor
# ----------------------------------------------------------------------------------------------


def _check_frames(encoders: Mapping[str, Any]) -> None:
    """Methods that read SAM and backbone features together need both in one frame geometry."""
    if "sam" in encoders and "backbone" in encoders:
        sam, backbone = encoders["sam"], encoders["backbone"]
        if is_padded(sam.preprocessing_id) != is_padded(backbone.preprocessing_id) or (
            is_padded(sam.preprocessing_id) and sam.input_size != backbone.input_size
        ):
            raise ModelError(
                f"the SAM encoder ({sam.preprocessing_id}) and the backbone ({backbone.preprocessing_id}) put "
                "images in different frames, so their feature grids would not align; use the same geometry "
                "(VRP-SAM / ProSAM / FCP: SAM preprocessing 'vrp512_to1024_imagenet' with a 512 squash backbone)"
            )


class RefSegPredictor:
    """Runs a method end to end on raw images: live frozen encoders + the method's forward."""

    def __init__(self, model: RefSegMethod, encoders: Mapping[str, nn.Module], device: str | torch.device = "cpu") -> None:
        needed = model.feature_spec().encoders
        missing = [role for role in needed if encoders.get(role) is None]
        if missing:
            raise ModelError(f"{model.name} needs the frozen encoders {list(needed)}; missing {missing}")
        _check_frames(encoders)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.encoders = {role: encoders[role].to(self.device).eval() for role in needed}

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        sam_checkpoint: str | Path | None = None,
        backbone_checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        allow_random_init: bool = False,
        encoder_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> "RefSegPredictor":
        """Rebuild the method of ``checkpoint`` and the frozen encoders it was trained on.

        ``sam_checkpoint`` / ``backbone_checkpoint``: weights of those encoders (their sha256 must be
        the recorded one; a missing one is an error unless ``allow_random_init``, tests only).
        ``encoder_options``: extra builder options per role that hold paths (e.g. the proxy SAM's
        ``{"sam": {"backbone_checkpoint": ...}}``); never recorded in checkpoints.
        """
        ckpt = load_inference_checkpoint(checkpoint)
        weights = {"sam": sam_checkpoint, "backbone": backbone_checkpoint}
        encoders, identities = {}, {}
        for role, identity in ckpt.encoders.items():
            options = {**identity.options, **dict((encoder_options or {}).get(role, {}))}
            encoders[role] = build_encoder(identity.encoder_id, weights[role], allow_random_init=allow_random_init, **options)
            identities[role] = EncoderIdentity.of(encoders[role], weights[role], identity.options)
        check_encoders(ckpt, identities)
        sam_decoder = _sam_decoder_for(ckpt.method, encoders.get("sam"), sam_checkpoint, allow_random_init)
        model = model_from_checkpoint(ckpt, sam_decoder=sam_decoder)
        return cls(model, encoders, device)

    @classmethod
    def training_free(
        cls,
        method: str,
        *,
        sam_checkpoint: str | Path | None = None,
        backbone_checkpoint: str | Path | None = None,
        sam_encoder: str = "sam_vit_b",
        backbone: str = "mobilenet_v2",
        config: Mapping[str, Any] | None = None,
        encoder_options: Mapping[str, Mapping[str, Any]] | None = None,
        device: str | torch.device = "cpu",
        allow_random_init: bool = False,
    ) -> "RefSegPredictor":
        """A training-free method (``persam``, ``prototype_matching``) straight from encoder weights.

        PerSAM uses SAM's standard longest-side-1024 preprocessing unless ``encoder_options``
        says otherwise; its decoder weights come from the same SAM checkpoint."""
        probe = build_model(method, config, allow_random_init=True)
        if probe.trainable_parameters():
            raise ModelError(f"{method} is trained: load it with RefSegPredictor.from_checkpoint")
        roles = probe.feature_spec().encoders
        # SAM's own preprocessing where the SAM encoder has one to choose (the proxy SAM has its 512 squash)
        sam_options = {"preprocessing": "sam_longest1024_pad"} if "preprocessing" in builder_options(sam_encoder) else {}
        options = {"sam": sam_options, "backbone": {}}
        for role, extra in (encoder_options or {}).items():
            options[role] = {**options.get(role, {}), **dict(extra)}
        names = {"sam": sam_encoder, "backbone": backbone}
        weights = {"sam": sam_checkpoint, "backbone": backbone_checkpoint}
        encoders = {
            role: build_encoder(names[role], weights[role], allow_random_init=allow_random_init, **options[role])
            for role in roles
        }
        sam_decoder = _sam_decoder_for(method, encoders.get("sam"), sam_checkpoint, allow_random_init)
        model = build_model(method, config, sam_decoder=sam_decoder, **_grid_override(method, encoders.get("sam")))
        return cls(model, encoders, device)

    # -- features --------------------------------------------------------------------------------

    def _frame(self, image: np.ndarray) -> Frame:
        """The frame the method reads masks in and predicts logits in, for ``image``."""
        frame = frame_of(self.encoders[self.model.logits_frame], image.shape[:2])
        size = self.model.frame_size()
        return frame if size is None else frame.scaled(size)

    def _encode(self, role: str, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        encoder = self.encoders[role]
        batch = torch.stack([encoder.preprocess(image) for image in images]).to(self.device)
        return encoder(batch)

    @torch.no_grad()
    def features(self, references: Sequence[np.ndarray], masks: Sequence[np.ndarray], target: np.ndarray) -> tuple[EpisodeFeatures, Frame]:
        """One episode (k references with their annotation masks) -> features + target frame.

        Each mask covers its whole reference image at any resolution (the reference's own size, or
        the 512 x 512 frame generated points / scribbles are drawn in): it is mapped into the
        method's frame of that reference."""
        spec = self.model.feature_spec()
        reference_masks = torch.stack([self._frame(r).mask_to_frame(m) for r, m in zip(references, masks)])[None]
        reference_masks = (reference_masks > 0.5).float().to(self.device)
        fields: dict[str, Any] = {"reference_masks": reference_masks}
        if "sam" in spec.encoders:
            fields["target_sam"] = self._encode("sam", [target])["image_embedding"]
            if spec.reference_sam:
                fields["reference_sam"] = self._encode("sam", references)["image_embedding"][None]
        if "backbone" in spec.encoders:
            tgt, ref = self._encode("backbone", [target]), self._encode("backbone", references)
            fields["target_backbone"] = tgt
            fields["reference_backbone"] = {k: v[None] for k, v in ref.items()}
            if spec.masked_reference_layer4:
                # The annotation in the backbone's own frame (it may differ from the logits frame's size).
                bb_masks = torch.stack(
                    [frame_of(self.encoders["backbone"], r.shape[:2]).mask_to_frame(m) for r, m in zip(references, masks)]
                ).to(self.device)
                fields["reference_masked_layer4"] = masked_reference_layer4(
                    self.encoders["backbone"], ref["layer3"], (bb_masks > 0.5).float()
                )[None]
        frame = self._frame(target)
        if frame.padded:
            fields["valid_sizes"] = (frame.valid,)
        return EpisodeFeatures(**fields), frame

    @torch.no_grad()
    def predict_logits(self, references: Sequence[np.ndarray], masks: Sequence[np.ndarray], target: np.ndarray) -> tuple[torch.Tensor, Frame]:
        """1 x 1 x h x w mask logits over the target's frame, and that frame."""
        features, frame = self.features(references, masks, target)
        return self.model.mask_logits(self.model(features)), frame

    @torch.no_grad()
    def predict(
        self,
        reference_image: np.ndarray | Sequence[np.ndarray],
        reference_annotation: Any,
        target_image: np.ndarray,
        point_style: str = "disc",
    ) -> np.ndarray:
        """Segment in ``target_image`` what the annotation marks in ``reference_image``.

        Args:
            reference_image: H x W x 3 uint8 RGB, or a list of k such images (k-shot).
            reference_annotation: one annotation (see :func:`annotation_to_mask`), or a list of k
                annotations matching the k reference images.
            target_image: H' x W' x 3 uint8 RGB.

        Returns:
            H' x W' bool mask.
        """
        if isinstance(reference_image, np.ndarray):
            references, annotations = [reference_image], [reference_annotation]
        else:
            references, annotations = list(reference_image), list(reference_annotation)
            if len(references) != len(annotations) or not references:
                raise ModelError(f"k-shot: {len(references)} reference images but {len(annotations)} annotations")
        for what, image in [("target image", target_image)] + [(f"reference image {i}", r) for i, r in enumerate(references)]:
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ModelError(f"{what} must be an H x W x 3 uint8 RGB array")
        masks = [annotation_to_mask(a, r.shape, point_style) for a, r in zip(annotations, references)]
        logits, frame = self.predict_logits(references, masks, target_image)
        return frame.logits_to_image(logits)


def _grid_override(method: str, sam_encoder: Any) -> dict[str, int]:
    """SAM-prompt methods run on the SAM encoder's embedding grid (64 for SAM, smaller for a proxy)."""
    if sam_encoder is None:
        return {}
    return {"feature_size": int(sam_encoder.output_shapes()["image_embedding"][-1])}


def _sam_decoder_for(method: str, sam_encoder: Any, sam_checkpoint: str | Path | None, allow_random_init: bool) -> nn.Module | None:
    from refseg_models.build import method_class

    if not method_class(method).uses_sam_decoder:
        return None
    from refseg_models.modeling.sam_decoder import build_sam_decoder

    if sam_checkpoint is None and not allow_random_init:
        raise ModelError(f"{method} decodes through SAM: pass the SAM (or proxy-SAM) checkpoint")
    grid = _grid_override(method, sam_encoder).get("feature_size", 64)
    return build_sam_decoder(sam_checkpoint, image_embedding_size=grid)
