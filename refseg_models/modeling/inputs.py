"""One batch of episodes in feature space, shared by every method.

Models consume features, not images: the frozen encoders run once (feature store, or live encoders
at inference) and the trainable part takes this container. Which fields a method needs is its
:class:`~refseg_models.method.FeatureSpec`; everything else may be absent. Shapes (B episodes, k
shots):

* ``reference_masks`` (always): B x k x H x W float {0, 1}: the reference annotation as a binary
  mask (box = filled box, scribble = strokes, points = pixels; see :mod:`refseg_models.annotations`)
  in the frame of the encoder that reads it; models resize it to their grid themselves.
* ``target_sam``: B x 256 x G x G SAM image embedding of the target (G = 64 for SAM).
* ``reference_sam``: B x k x 256 x G x G SAM embeddings of the references (FCP, PerSAM).
* ``target_backbone``: {name -> B x C x h x w} frozen backbone maps of the target: ``layer2/3/4``
  for ResNet-style backbones (ResNet-50 v2: 512 / 1024 / 2048 ch at 64 x 64 for a 512 input),
  ``patch_tokens`` for DINOv2 (SegIC).
* ``reference_backbone``: the same names -> B x k x C x h x w.
* ``reference_masked_layer4``: B x k x C4 x h4 x w4: the frozen backbone's layer4 applied to
  (reference layer3 x mask), VRP-SAM's support feature for the pseudo mask.
* ``target_boxes``: B x 4 (x0, y0, x1, y1) GT boxes of the targets in input pixels (SegIC's box
  prompt, training only).
* ``meta_embeddings``: B x D text embeddings (SegIC's optional meta instruction).
* ``valid_sizes``: per target (h, w) of the image inside a padded input frame (PerSAM picks its
  points there); None = the whole frame.
* ``instructions``: several instructions per target (:class:`InstructionSet`, SegIC's training on
  instance data: up to 10 instances of one image, each an instruction over the same references, all
  decoded against ONE target embedding); None = one instruction per target (``reference_masks``).
  Methods that do not read it ignore it.

The container is immutable; ``to``, ``select`` and ``shot`` return new instances.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from refseg_models.errors import ModelError

BACKBONE_LAYERS = ("layer2", "layer3", "layer4")


@dataclass(frozen=True)
class InstructionSet:
    """Up to ``n`` instructions per target over the same ``k`` references (B targets).

    * ``masks``: B x n x k x H x W {0, 1} (float, uint8 or bool): instruction ``j`` of target ``b`` is
      the reference region ``masks[b, j]`` (one per shot); instruction 0 is ``reference_masks``.
      Rows ``j >= counts[b]`` are padding (all zero) and are neither decoded nor in the loss.
    * ``counts``: real instructions per target, ``1 <= counts[b] <= n``.
    * ``boxes``: B x n x 4 (x0, y0, x1, y1) GT boxes of each instruction's target in input pixels
      (SegIC's training-time box prompt), or None.
    * ``classes``: B x n long class keys of the instructions (the keys of a method's class-keyed
      training state, e.g. SegIC's negative queue; -1 = not keyed), or None.
    * ``negative_classes``: per target, the class keys known to be ABSENT from it (candidates for
      negative instructions), or None.
    * ``reference_valid``: B x k x H x W {0, 1}: where the references show image content (0 on
      padding and on warped-out cells), or None = everywhere.
    """

    masks: torch.Tensor
    counts: tuple[int, ...]
    boxes: torch.Tensor | None = None
    classes: torch.Tensor | None = None
    negative_classes: tuple[tuple[int, ...], ...] | None = None
    reference_valid: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """``n``: instruction slots per target (the largest count)."""
        return int(self.masks.shape[1])

    def validate(self, batch: int, shots: int, height: int, width: int) -> None:
        if self.masks.dim() != 5 or tuple(self.masks.shape[:1] + self.masks.shape[2:]) != (batch, shots, height, width):
            raise ModelError(
                f"InstructionSet.masks must be B x n x k x H x W = ({batch}, n, {shots}, {height}, {width}), "
                f"got {tuple(self.masks.shape)}"
            )
        n = self.size
        if len(self.counts) != batch or any(not 1 <= int(c) <= n for c in self.counts):
            raise ModelError(f"InstructionSet.counts needs one count in 1..{n} per target ({batch}), got {self.counts}")
        if self.boxes is not None and tuple(self.boxes.shape) != (batch, n, 4):
            raise ModelError(f"InstructionSet.boxes must be B x n x 4 = ({batch}, {n}, 4), got {tuple(self.boxes.shape)}")
        if self.classes is not None and tuple(self.classes.shape) != (batch, n):
            raise ModelError(f"InstructionSet.classes must be B x n = ({batch}, {n}), got {tuple(self.classes.shape)}")
        if self.negative_classes is not None and len(self.negative_classes) != batch:
            raise ModelError(f"InstructionSet.negative_classes needs one tuple per target ({batch}), got {len(self.negative_classes)}")
        if self.reference_valid is not None and tuple(self.reference_valid.shape) != (batch, shots, height, width):
            raise ModelError(
                f"InstructionSet.reference_valid must be B x k x H x W = ({batch}, {shots}, {height}, {width}), "
                f"got {tuple(self.reference_valid.shape)}"
            )

    def map(self, fn) -> "InstructionSet":
        """Apply ``fn`` to every tensor (e.g. a device move)."""
        return replace(
            self,
            masks=fn(self.masks),
            boxes=None if self.boxes is None else fn(self.boxes),
            classes=None if self.classes is None else fn(self.classes),
            reference_valid=None if self.reference_valid is None else fn(self.reference_valid),
        )

    def select(self, keep: list[int]) -> "InstructionSet":
        index = torch.as_tensor(keep, dtype=torch.long)
        out = self.map(lambda t: t[index.to(t.device)])
        negatives = None if self.negative_classes is None else tuple(self.negative_classes[i] for i in keep)
        return replace(out, counts=tuple(self.counts[i] for i in keep), negative_classes=negatives)


@dataclass(frozen=True)
class EpisodeFeatures:
    reference_masks: torch.Tensor
    target_sam: torch.Tensor | None = None
    target_backbone: dict[str, torch.Tensor] = field(default_factory=dict)
    reference_backbone: dict[str, torch.Tensor] = field(default_factory=dict)
    reference_sam: torch.Tensor | None = None
    reference_masked_layer4: torch.Tensor | None = None
    target_boxes: torch.Tensor | None = None
    meta_embeddings: torch.Tensor | None = None
    valid_sizes: tuple[tuple[int, int], ...] | None = None
    instructions: InstructionSet | None = None
    # Free-form per-episode metadata (ids, class indices); never read by models.
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def batch_size(self) -> int:
        return int(self.reference_masks.shape[0])

    @property
    def shots(self) -> int:
        return int(self.reference_masks.shape[1])

    def validate(self) -> None:
        """Raise ModelError naming the offending field when shapes are inconsistent."""
        if self.reference_masks.dim() != 4:
            raise ModelError(f"EpisodeFeatures.reference_masks must be B x k x H x W, got {tuple(self.reference_masks.shape)}")
        batch, shots = self.batch_size, self.shots
        if shots < 1:
            raise ModelError("EpisodeFeatures.reference_masks has k = 0 shots")
        if self.target_sam is not None and (
            self.target_sam.dim() != 4 or self.target_sam.shape[0] != batch or self.target_sam.shape[1] != 256
        ):
            raise ModelError(f"EpisodeFeatures.target_sam must be B x 256 x G x G with B={batch}, got {tuple(self.target_sam.shape)}")
        if sorted(self.target_backbone) != sorted(self.reference_backbone):
            raise ModelError(
                f"EpisodeFeatures backbone maps differ: target has {sorted(self.target_backbone)}, "
                f"references have {sorted(self.reference_backbone)}"
            )
        for name, tgt in self.target_backbone.items():
            ref = self.reference_backbone[name]
            if tgt.dim() != 4 or tgt.shape[0] != batch:
                raise ModelError(f"EpisodeFeatures.target_backbone[{name!r}] must be B x C x h x w with B={batch}, got {tuple(tgt.shape)}")
            if ref.dim() != 5 or tuple(ref.shape[:2]) != (batch, shots) or ref.shape[2:] != tgt.shape[1:]:
                raise ModelError(
                    f"EpisodeFeatures.reference_backbone[{name!r}] must be B x k x C x h x w = "
                    f"{(batch, shots, *tgt.shape[1:])}, got {tuple(ref.shape)}"
                )
        if self.reference_sam is not None:
            if self.target_sam is None:
                raise ModelError("EpisodeFeatures.reference_sam is given without target_sam")
            expected = (batch, shots, *self.target_sam.shape[1:])
            if tuple(self.reference_sam.shape) != expected:
                raise ModelError(f"EpisodeFeatures.reference_sam must be {expected}, got {tuple(self.reference_sam.shape)}")
        if self.reference_masked_layer4 is not None:
            layer4 = self.target_backbone.get("layer4")
            if layer4 is None:
                raise ModelError("EpisodeFeatures.reference_masked_layer4 needs target_backbone['layer4']")
            expected = (batch, shots, *layer4.shape[1:])
            if tuple(self.reference_masked_layer4.shape) != expected:
                raise ModelError(
                    f"EpisodeFeatures.reference_masked_layer4 must be {expected} (B x k x layer4 shape), "
                    f"got {tuple(self.reference_masked_layer4.shape)}"
                )
        if self.target_boxes is not None and tuple(self.target_boxes.shape) != (batch, 4):
            raise ModelError(f"EpisodeFeatures.target_boxes must be B x 4, got {tuple(self.target_boxes.shape)}")
        if self.meta_embeddings is not None and (self.meta_embeddings.dim() != 2 or self.meta_embeddings.shape[0] != batch):
            raise ModelError(f"EpisodeFeatures.meta_embeddings must be B x D, got {tuple(self.meta_embeddings.shape)}")
        if self.valid_sizes is not None and len(self.valid_sizes) != batch:
            raise ModelError(f"EpisodeFeatures.valid_sizes needs one (h, w) per target ({batch}), got {len(self.valid_sizes)}")
        if self.instructions is not None:
            self.instructions.validate(batch, shots, *self.reference_masks.shape[-2:])

    def _map(self, fn, per_shot: bool = False) -> "EpisodeFeatures":
        """Apply ``fn`` to every tensor (``per_shot``: only to the per-reference tensors)."""

        def app(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        changes = dict(
            reference_backbone={k: fn(v) for k, v in self.reference_backbone.items()},
            reference_masks=fn(self.reference_masks),
            reference_sam=app(self.reference_sam),
            reference_masked_layer4=app(self.reference_masked_layer4),
        )
        if not per_shot:
            changes.update(
                target_sam=app(self.target_sam),
                target_backbone={k: fn(v) for k, v in self.target_backbone.items()},
                target_boxes=app(self.target_boxes),
                meta_embeddings=app(self.meta_embeddings),
                instructions=None if self.instructions is None else self.instructions.map(fn),
            )
        elif self.instructions is not None:
            raise ModelError("per-shot views of EpisodeFeatures with several instructions per target are not supported")
        return replace(self, **changes)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EpisodeFeatures":
        """Move every tensor (optionally casting floating tensors to ``dtype``)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return self._map(move)

    def select(self, index: torch.Tensor | slice | list[int]) -> "EpisodeFeatures":
        """A sub-batch of episodes (index along B)."""
        if self.valid_sizes is None and self.instructions is None:
            return self._map(lambda t: t[index])
        keep = list(range(self.batch_size)[index]) if isinstance(index, slice) else [int(i) for i in index]
        out = replace(self, instructions=None)._map(lambda t: t[index])
        if self.valid_sizes is not None:
            out = replace(out, valid_sizes=tuple(self.valid_sizes[i] for i in keep))
        if self.instructions is not None:
            out = replace(out, instructions=self.instructions.select(keep))
        return out

    def shot(self, index: int) -> "EpisodeFeatures":
        """The 1-shot episodes formed by reference ``index`` of every episode."""
        return self._map(lambda t: t[:, index : index + 1], per_shot=True)
