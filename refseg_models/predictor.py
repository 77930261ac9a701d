"""Inference for users: reference image + annotation + target image -> target mask.

``RefSegPredictor.from_checkpoint(path, sam_checkpoint=..., backbone_checkpoint=...)`` rebuilds a
trained method from a method checkpoint and runs the live frozen encoders on raw images;
``predict(reference_image, reference_annotation, target_image)`` returns a bool mask at the target's
original size. Pure PyTorch (no Ray, MLflow or pipeline imports).

Method checkpoint format ``refseg-model/1`` (a ``torch.save`` dict, loadable with
``torch.load(weights_only=True)``: only tensors, str, int, float, bool, None, lists, tuples, dicts)::

    {
      "format": "refseg-model/1",
      "method": "vrp_sam" | "prosam" | "fcp" | "segic" | "persam",
      "config": {...},           # keyword arguments of refseg_models.build_model(method, **config)
      "state_dict": {...},       # model.state_dict(): the trained part AND any frozen SAM prompt
                                 # encoder / mask decoder the method holds (so the checkpoint
                                 # reproduces the decoder it was trained with)
      "encoders": {"sam": "sam_vit_b", "backbone": "resnet50_v2"},
                                 # which frozen encoders produce the features: a registry name of
                                 # refseg_models.encoders, or {"name": ..., **builder options}
                                 # (e.g. {"name": "sam_vit_b", "preprocessing": "sam_longest1024_pad"});
                                 # a method lists only the encoders it uses (SegIC: "backbone" only,
                                 # PerSAM: "sam" only)
    }

The encoder WEIGHTS are not in the method checkpoint: they come from ``sam_checkpoint`` /
``backbone_checkpoint`` (the files users download), or random init with ``allow_random_init=True``
(tests and demos only).

Geometry: every encoder's preprocessing defines an input frame: "squash" (resize to S x S without
keeping the aspect ratio: VRP-SAM's 512 frame) or "longest-side pad" (SAM's 1024 / SegIC's 896 frame,
image at the top-left, padding bottom/right). The reference annotation is rasterised at the
reference's original size, mapped into the frame the method expects, and the predicted logits are
mapped back (crop of the valid region, bilinear resize) before thresholding at 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from refseg_models.build import MODEL_BUILDERS, build_model
from refseg_models.encoders import build_encoder
from refseg_models.encoders.checkpoint import load_state_dict_strict
from refseg_models.modeling.inputs import EpisodeFeatures
from refseg_models.modeling.pseudo_mask import masked_reference_layer4

CHECKPOINT_FORMAT = "refseg-model/1"

# Which frozen encoders each method consumes.
METHOD_ENCODERS: dict[str, tuple[str, ...]] = {
    "vrp_sam": ("sam", "backbone"),
    "prosam": ("sam", "backbone"),
    "fcp": ("sam", "backbone"),
    "segic": ("backbone",),
    "persam": ("sam",),
}


# ----------------------------------------------------------------------------------------------
# Reference annotations
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
    """Clicked object pixels as (x, y); rasterised as small discs (radius ~1% of the shorter side,
    as the data layer draws point annotations, so they survive the 64 x 64 feature grid)."""

    xy: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Scribble:
    """An H x W stroke mask (nonzero = scribbled object pixels)."""

    mask: np.ndarray


ReferenceAnnotation = Union[np.ndarray, Box, Points, Scribble, Sequence[float], Sequence[Sequence[float]]]


def annotation_to_mask(annotation: Any, image_shape: tuple[int, ...]) -> np.ndarray:
    """Rasterise a reference annotation to an H x W bool mask of the reference image.

    Accepted: an H x W array (mask; nonzero = object), :class:`Scribble`, :class:`Box` or a flat
    sequence of 4 numbers (x0, y0, x1, y1) -> filled box, :class:`Points` or a sequence of (x, y)
    pairs -> discs. Raises ValueError with what was wrong.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    if isinstance(annotation, Scribble):
        annotation = annotation.mask
    if isinstance(annotation, np.ndarray):
        if annotation.ndim == 3 and annotation.shape[2] in (1, 3, 4):
            annotation = annotation[..., 0]
        if annotation.shape != (h, w):
            raise ValueError(f"reference mask has shape {annotation.shape}, the reference image is {h} x {w}")
        mask = annotation > 0
    elif isinstance(annotation, Box) or (
        isinstance(annotation, (list, tuple)) and len(annotation) == 4 and all(np.isscalar(v) for v in annotation)
    ):
        box = annotation if isinstance(annotation, Box) else Box(*map(float, annotation))
        if not (box.x0 <= box.x1 and box.y0 <= box.y1):
            raise ValueError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {box}")
        x0, y0 = max(int(round(box.x0)), 0), max(int(round(box.y0)), 0)
        x1, y1 = min(int(round(box.x1)), w - 1), min(int(round(box.y1)), h - 1)
        mask = np.zeros((h, w), dtype=bool)
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
    elif isinstance(annotation, Points) or isinstance(annotation, (list, tuple)):
        xy = annotation.xy if isinstance(annotation, Points) else annotation
        try:
            pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        except ValueError as exc:
            raise ValueError(f"points must be (x, y) pairs, got {annotation!r}") from exc
        if len(pts) == 0:
            raise ValueError("no reference points given")
        radius = max(1, int(round(0.01 * min(h, w))))
        ys, xs = np.mgrid[0:h, 0:w]
        mask = np.zeros((h, w), dtype=bool)
        for x, y in pts:
            if not (0 <= x < w and 0 <= y < h):
                raise ValueError(f"point ({x}, {y}) lies outside the {w} x {h} reference image")
            mask |= (xs - x) ** 2 + (ys - y) ** 2 <= radius**2
    else:
        raise ValueError(f"unsupported reference annotation of type {type(annotation).__name__}")
    if not mask.any():
        raise ValueError("the reference annotation covers no pixel of the reference image")
    return mask


# ----------------------------------------------------------------------------------------------
# Input frames
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """Where an image of size ``original`` lies in an encoder's square input of side ``size``."""

    original: tuple[int, int]
    size: int
    padded: bool

    @property
    def valid(self) -> tuple[int, int]:
        """(h, w) of the image inside the frame (the whole frame for squash)."""
        if not self.padded:
            return (self.size, self.size)
        return ResizeLongestSide.get_preprocess_shape(self.original[0], self.original[1], self.size)

    def scaled(self, size: int) -> "Frame":
        return Frame(self.original, size, self.padded)

    def mask_to_frame(self, mask: np.ndarray) -> torch.Tensor:
        """H x W bool (original size) -> size x size float {0, 1} (nearest resize, zero padding)."""
        vh, vw = self.valid
        t = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
        t = F.interpolate(t, (vh, vw), mode="nearest")
        return F.pad(t, (0, self.size - vw, 0, self.size - vh))[0, 0]

    def logits_to_image(self, logits: torch.Tensor) -> np.ndarray:
        """1 x 1 x h x w logits over the frame -> bool mask at the original size (> 0)."""
        full = F.interpolate(logits.float(), (self.size, self.size), mode="bilinear", align_corners=False)
        vh, vw = self.valid
        full = full[..., :vh, :vw]
        out = F.interpolate(full, self.original, mode="bilinear", align_corners=False)
        return (out[0, 0] > 0).cpu().numpy()


def frame_of(encoder: nn.Module, image: np.ndarray) -> Frame:
    """The input frame ``encoder.preprocess`` puts ``image`` in (longest-side pad or squash)."""
    preprocessing = str(getattr(encoder, "preprocessing_id", ""))
    size = int(getattr(encoder, "input_size"))
    return Frame((int(image.shape[0]), int(image.shape[1])), size, padded="longest" in preprocessing)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be str, got {k!r}")
            _check_plain(v, f"{where}.{k}")
        return
    raise ValueError(f"{where} holds a {type(value).__name__}; only plain values load with weights_only=True")


def save_checkpoint(
    model: nn.Module,
    method: str,
    config: Mapping[str, Any],
    path: str | Path,
    encoders: Mapping[str, Any],
) -> Path:
    """Write a ``refseg-model/1`` checkpoint (see the module docstring) and return its path.

    ``config`` must rebuild ``model`` through ``build_model(method, **config)`` and hold plain
    values only (no paths to other checkpoints: the method's weights travel in ``state_dict``).
    """
    if method not in MODEL_BUILDERS:
        raise KeyError(f"unknown method {method!r}; available: {', '.join(sorted(MODEL_BUILDERS))}")
    needed = METHOD_ENCODERS.get(method, ())
    missing = [name for name in needed if name not in encoders]
    if missing:
        raise ValueError(f"method {method!r} needs encoders {list(needed)}; missing {missing}")
    _check_plain(dict(config), "config")
    _check_plain(dict(encoders), "encoders")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "method": method,
        "config": dict(config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "encoders": dict(encoders),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a method checkpoint (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"method checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects refused by weights_only
        raise ValueError(f"{path}: not a loadable refseg method checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: expected format {CHECKPOINT_FORMAT!r}, found {found!r}")
    for key, kind in (("method", str), ("config", dict), ("state_dict", dict), ("encoders", dict)):
        if not isinstance(payload.get(key), kind):
            raise ValueError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    if payload["method"] not in MODEL_BUILDERS:
        raise ValueError(
            f"{path}: unknown method {payload['method']!r}; available: {', '.join(sorted(MODEL_BUILDERS))}"
        )
    return payload


def model_from_checkpoint(payload: Mapping[str, Any], source: str = "checkpoint") -> nn.Module:
    """``build_model(method, **config)`` + strict ``load_state_dict`` with an error naming the keys."""
    model = build_model(payload["method"], **payload["config"])
    load_state_dict_strict(model, payload["state_dict"], source=f"{source} ({payload['method']} built from its config)")
    return model.eval()


def _encoder_spec(spec: Any, role: str) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return spec["name"], {k: v for k, v in spec.items() if k != "name"}
    raise ValueError(f"encoder spec for {role!r} must be a name or {{'name': ..., **options}}, got {spec!r}")


# ----------------------------------------------------------------------------------------------
# Predictor
# ----------------------------------------------------------------------------------------------


class RefSegPredictor:
    """Runs a method end to end on raw images: live frozen encoders + the method's forward."""

    def __init__(
        self,
        model: nn.Module,
        method: str,
        sam_encoder: nn.Module | None = None,
        backbone: nn.Module | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if method not in METHOD_ENCODERS:
            raise KeyError(f"no predictor adapter for method {method!r}; known: {sorted(METHOD_ENCODERS)}")
        needs = METHOD_ENCODERS[method]
        if "sam" in needs and sam_encoder is None:
            raise ValueError(f"method {method!r} needs a SAM image encoder")
        if "backbone" in needs and backbone is None:
            raise ValueError(f"method {method!r} needs a backbone encoder")
        if method in ("vrp_sam", "prosam", "fcp") and "vrp512" not in str(sam_encoder.preprocessing_id):
            raise ValueError(
                f"{method} was trained on VRP-SAM's 512 -> 1024 squash frame; its SAM encoder has "
                f"preprocessing {sam_encoder.preprocessing_id!r} (use 'vrp512_to1024_imagenet')"
            )
        self.device = torch.device(device)
        self.method = method
        self.model = model.to(self.device).eval()
        self.sam_encoder = None if sam_encoder is None else sam_encoder.to(self.device).eval()
        self.backbone = None if backbone is None else backbone.to(self.device).eval()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path,
        sam_checkpoint: str | Path | None = None,
        backbone_checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        allow_random_init: bool = False,
    ) -> "RefSegPredictor":
        """Rebuild the method of ``checkpoint`` and the frozen encoders it names.

        ``sam_checkpoint`` / ``backbone_checkpoint``: weights of the encoders named in the
        checkpoint's ``encoders`` field (a missing one is an error unless ``allow_random_init``).
        """
        payload = load_checkpoint(checkpoint)
        method = payload["method"]
        model = model_from_checkpoint(payload, str(checkpoint))
        needs = METHOD_ENCODERS.get(method, ())
        encoders: dict[str, nn.Module | None] = {"sam": None, "backbone": None}
        weights = {"sam": sam_checkpoint, "backbone": backbone_checkpoint}
        for role in needs:
            if role not in payload["encoders"]:
                raise ValueError(f"{checkpoint}: method {method!r} needs an encoders[{role!r}] entry")
            name, options = _encoder_spec(payload["encoders"][role], role)
            encoders[role] = build_encoder(name, weights[role], allow_random_init=allow_random_init, **options)
        return cls(model, method, encoders["sam"], encoders["backbone"], device)

    @classmethod
    def for_persam(
        cls,
        sam_checkpoint: str | Path | None,
        sam_encoder: str = "sam_vit_b",
        device: str | torch.device = "cpu",
        allow_random_init: bool = False,
        refinement_steps: int = 2,
    ) -> "RefSegPredictor":
        """The training-free PerSAM baseline straight from a SAM checkpoint (no method checkpoint):
        SAM's standard longest-side-1024 preprocessing, decoder weights from the same file."""
        if sam_checkpoint is None and not allow_random_init:
            raise ValueError("PerSAM needs sam_checkpoint (or allow_random_init=True for tests)")
        model = build_model("persam", sam_checkpoint=sam_checkpoint, refinement_steps=refinement_steps)
        encoder = build_encoder(
            sam_encoder, sam_checkpoint, allow_random_init=allow_random_init, preprocessing="sam_longest1024_pad"
        )
        return cls(model, "persam", sam_encoder=encoder, device=device)

    # -- encoders ------------------------------------------------------------------------------

    def _encode(self, encoder: nn.Module, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        batch = torch.stack([encoder.preprocess(image) for image in images]).to(self.device)
        with torch.no_grad():
            return encoder(batch)

    @torch.no_grad()
    def predict(
        self,
        reference_image: np.ndarray | Sequence[np.ndarray],
        reference_annotation: Any,
        target_image: np.ndarray,
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
                raise ValueError(
                    f"k-shot: {len(references)} reference images but {len(annotations)} annotations"
                )
        for what, image in [("target image", target_image)] + [(f"reference image {i}", r) for i, r in enumerate(references)]:
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"{what} must be an H x W x 3 uint8 RGB array")
        masks = [annotation_to_mask(a, r.shape) for a, r in zip(annotations, references)]
        runner = getattr(self, f"_predict_{self.method}" if self.method in ("segic", "persam") else "_predict_vrp_family")
        return runner(references, masks, target_image)

    def _predict_vrp_family(self, references: list[np.ndarray], masks: list[np.ndarray], target: np.ndarray) -> np.ndarray:
        # VRP-SAM / ProSAM / FCP: 512 squash frame for the backbone and SAM (SAM sees it at 1024).
        target_frame = frame_of(self.backbone, target)
        tgt_bb = self._encode(self.backbone, [target])
        ref_bb = self._encode(self.backbone, references)
        ref_masks = torch.stack(
            [frame_of(self.backbone, r).mask_to_frame(m) for r, m in zip(references, masks)]
        )[None].to(self.device)  # 1 x k x S x S
        target_sam = self._encode(self.sam_encoder, [target])["image_embedding"]
        reference_sam = None
        if self.method == "fcp":
            reference_sam = self._encode(self.sam_encoder, references)["image_embedding"][None]
        masked_l4 = masked_reference_layer4(self.backbone, ref_bb["layer3"], ref_masks[0])[None]
        features = EpisodeFeatures(
            target_sam=target_sam,
            target_backbone=tgt_bb,
            reference_backbone={k: v[None] for k, v in ref_bb.items()},
            reference_masks=ref_masks,
            reference_sam=reference_sam,
            reference_masked_layer4=masked_l4,
        )
        logits = self.model(features)["mask_logits"][:, :1]
        return target_frame.logits_to_image(logits)

    def _predict_segic(self, references: list[np.ndarray], masks: list[np.ndarray], target: np.ndarray) -> np.ndarray:
        key = self.model.feature_key
        size = self.model.input_size
        tgt = self._encode(self.backbone, [target])
        ref = self._encode(self.backbone, references)
        if key not in tgt:
            raise ValueError(f"SegIC reads backbone output {key!r}; the backbone gives {sorted(tgt)}")
        ref_masks = torch.stack(
            [frame_of(self.backbone, r).scaled(size).mask_to_frame(m) for r, m in zip(references, masks)]
        )[None].to(self.device)
        out = self.model(tgt[key], ref[key][None], ref_masks, novel_class_eval=True)
        return frame_of(self.backbone, target).scaled(size).logits_to_image(out["mask_logits"])

    def _predict_persam(self, references: list[np.ndarray], masks: list[np.ndarray], target: np.ndarray) -> np.ndarray:
        size = self.model.input_size
        target_frame = frame_of(self.sam_encoder, target).scaled(size)
        ref_masks = torch.stack(
            [frame_of(self.sam_encoder, r).scaled(size).mask_to_frame(m) for r, m in zip(references, masks)]
        )[None].to(self.device)
        target_sam = self._encode(self.sam_encoder, [target])["image_embedding"]
        reference_sam = self._encode(self.sam_encoder, references)["image_embedding"][None]
        out = self.model(target_sam, reference_sam, ref_masks, valid_sizes=[target_frame.valid])
        return target_frame.logits_to_image(out["mask_logits"])
