"""One batch of episodes in feature space, shared by every method.

Models consume features, not images: the frozen encoders run once (feature store, or live encoders
at inference) and the trainable part takes this container. Shapes (B episodes, k shots):

* ``target_sam``: B x 256 x 64 x 64 SAM image embedding of the target (512 input resized to 1024).
* ``target_backbone``: {"layer2", "layer3", "layer4"} -> B x C x h x w class-consistent backbone
  maps of the target (ResNet-50 v2: 512 / 1024 / 2048 ch at 64 x 64 for a 512 input).
* ``reference_backbone``: same names -> B x k x C x h x w for the k references.
* ``reference_masks``: B x k x H x W float in {0, 1}: the reference annotation as a binary mask (box =
  filled bbox, scribble = strokes, points = dots; produced by the data layer). H x W is the model's
  input size (512) or any size; models resize it themselves.
* ``reference_sam``: optional B x k x 256 x 64 x 64 SAM embeddings of the references (FCP needs them).
* ``reference_masked_layer4``: optional B x k x C4 x h4 x w4: the frozen backbone's layer4 applied to
  (reference layer3 x mask), VRP-SAM's support feature for the pseudo mask
  (see ``pseudo_mask.masked_reference_layer4``). Required by VRP-SAM, ProSAM and FCP.

The container is immutable; ``to`` and ``select`` return new instances.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

BACKBONE_LAYERS = ("layer2", "layer3", "layer4")


@dataclass(frozen=True)
class EpisodeFeatures:
    target_sam: torch.Tensor
    target_backbone: dict[str, torch.Tensor]
    reference_backbone: dict[str, torch.Tensor]
    reference_masks: torch.Tensor
    reference_sam: torch.Tensor | None = None
    reference_masked_layer4: torch.Tensor | None = None
    # Free-form per-episode metadata (ids, class indices); never read by models.
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def batch_size(self) -> int:
        return int(self.target_sam.shape[0])

    @property
    def shots(self) -> int:
        return int(self.reference_masks.shape[1])

    def validate(self) -> None:
        """Raise ValueError naming the offending field when shapes are inconsistent."""
        if self.target_sam.dim() != 4 or self.target_sam.shape[1] != 256:
            raise ValueError(f"EpisodeFeatures.target_sam must be B x 256 x h x w, got {tuple(self.target_sam.shape)}")
        batch = self.target_sam.shape[0]
        if self.reference_masks.dim() != 4 or self.reference_masks.shape[0] != batch:
            raise ValueError(
                f"EpisodeFeatures.reference_masks must be B x k x H x W with B={batch}, "
                f"got {tuple(self.reference_masks.shape)}"
            )
        shots = self.reference_masks.shape[1]
        if shots < 1:
            raise ValueError("EpisodeFeatures.reference_masks has k = 0 shots")
        for name in BACKBONE_LAYERS:
            if name not in self.target_backbone:
                raise ValueError(f"EpisodeFeatures.target_backbone lacks {name!r} (has {sorted(self.target_backbone)})")
            if name not in self.reference_backbone:
                raise ValueError(
                    f"EpisodeFeatures.reference_backbone lacks {name!r} (has {sorted(self.reference_backbone)})"
                )
            tgt, ref = self.target_backbone[name], self.reference_backbone[name]
            if tgt.dim() != 4 or tgt.shape[0] != batch:
                raise ValueError(f"EpisodeFeatures.target_backbone[{name!r}] must be B x C x h x w, got {tuple(tgt.shape)}")
            if ref.dim() != 5 or tuple(ref.shape[:2]) != (batch, shots) or ref.shape[2:] != tgt.shape[1:]:
                raise ValueError(
                    f"EpisodeFeatures.reference_backbone[{name!r}] must be B x k x C x h x w = "
                    f"{(batch, shots, *tgt.shape[1:])}, got {tuple(ref.shape)}"
                )
        if self.reference_sam is not None:
            expected = (batch, shots, *self.target_sam.shape[1:])
            if tuple(self.reference_sam.shape) != expected:
                raise ValueError(f"EpisodeFeatures.reference_sam must be {expected}, got {tuple(self.reference_sam.shape)}")
        if self.reference_masked_layer4 is not None:
            layer4 = self.target_backbone["layer4"]
            expected = (batch, shots, *layer4.shape[1:])
            if tuple(self.reference_masked_layer4.shape) != expected:
                raise ValueError(
                    f"EpisodeFeatures.reference_masked_layer4 must be {expected} (B x k x layer4 shape), "
                    f"got {tuple(self.reference_masked_layer4.shape)}"
                )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EpisodeFeatures":
        """Move every tensor (optionally casting floating tensors to ``dtype``)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return replace(
            self,
            target_sam=move(self.target_sam),
            target_backbone={k: move(v) for k, v in self.target_backbone.items()},
            reference_backbone={k: move(v) for k, v in self.reference_backbone.items()},
            reference_masks=move(self.reference_masks),
            reference_sam=move(self.reference_sam),
            reference_masked_layer4=move(self.reference_masked_layer4),
        )

    def select(self, index: torch.Tensor | slice | list[int]) -> "EpisodeFeatures":
        """A sub-batch of episodes (index along B)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return replace(
            self,
            target_sam=pick(self.target_sam),
            target_backbone={k: pick(v) for k, v in self.target_backbone.items()},
            reference_backbone={k: pick(v) for k, v in self.reference_backbone.items()},
            reference_masks=pick(self.reference_masks),
            reference_sam=pick(self.reference_sam),
            reference_masked_layer4=pick(self.reference_masked_layer4),
        )

    def shot(self, index: int) -> "EpisodeFeatures":
        """The 1-shot episodes formed by reference ``index`` of every episode."""
        sl = slice(index, index + 1)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, sl]

        return replace(
            self,
            reference_backbone={k: pick(v) for k, v in self.reference_backbone.items()},
            reference_masks=pick(self.reference_masks),
            reference_sam=pick(self.reference_sam),
            reference_masked_layer4=pick(self.reference_masked_layer4),
        )
