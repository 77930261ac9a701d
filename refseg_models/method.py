"""The method contract: one interface every method implements (VRP-SAM, ProSAM, FCP, SegIC, PerSAM,
prototype matching), so the predictor, the evaluation runner and the training loop need no
per-method branches.

A method is an ``nn.Module`` subclass of :class:`RefSegMethod` with

* ``config``: its frozen :class:`~refseg_models.config.MethodConfig` (defaults written once there);
* :meth:`feature_spec`: which frozen features it consumes (:class:`FeatureSpec`: target / reference
  SAM embeddings, named backbone maps, the masked-reference layer4), so data paths build exactly that;
  answered by its config (``config.feature_spec()``), so nothing builds a model to ask;
* ``forward(features: EpisodeFeatures) -> dict`` of outputs;
* ``loss(outputs, targets, valid) -> {"loss": total, <named terms>...}`` (Mask2Former's criterion
  style: the method's criterion names every term, the weights live in one place, pixels with
  ``valid == 0`` contribute nothing);
* ``mask_logits(outputs) -> B x 1 x H x W``: the prediction (> 0 = foreground) in the input frame of
  the encoder named by :attr:`logits_frame` (``"backbone"``: the backbone's preprocessing frame,
  e.g. VRP-SAM's 512 squash; ``"sam"``: the SAM encoder's frame, e.g. SAM's longest-side-1024 pad);
* ``trainable_parameters()`` / ``trainable_state_dict()`` / ``load_trainable_state_dict()``: exactly
  the learnable part; frozen submodules (the SAM prompt encoder / mask decoder) are never in them.

Training-side hooks (defaults do nothing, so the loop calls them for every method):

* ``after_step(outputs, features)``: called by the training loop after each optimizer step, in
  training mode (SegIC pushes the step's instance features into its negative queue);
* ``extra_state()`` / ``load_extra_state(state)``: model-side training state that is not a weight
  (SegIC's negative queue): saved in and restored from the training checkpoint, per rank, so a
  resumed run continues with the same contents; ``None`` = nothing to save;
* ``ddp_find_unused_parameters``: whether DistributedDataParallel must look for parameters without a
  gradient in a step (SegIC's SAM-style decoder has outputs the loss never reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from refseg_models.build import METHODS
from refseg_models.config import MethodConfig
from refseg_models.errors import ModelError
from refseg_models.feature_spec import FeatureSpec
from refseg_models.modeling.inputs import EpisodeFeatures

LOGITS_FRAMES = ("sam", "backbone")


def split_target(mask: torch.Tensor, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """A {0, 1, ignore} label mask -> (targets, valid), both float {0, 1} of the same shape."""
    valid = mask != ignore_index
    return (mask == 1).float(), valid.float()


class _RegisteredName:
    """A method's name: its key in the method registry (:data:`refseg_models.build.METHODS`), where
    it is written once; a subclass of a registered method answers with that method's name."""

    def __get__(self, instance: object, owner: type) -> str:
        return METHODS.name_of(owner)


class RefSegMethod(nn.Module):
    """Base class of every method (see the module docstring for the contract)."""

    name: ClassVar[str] = _RegisteredName()  # type: ignore[assignment]
    config_class: ClassVar[type[MethodConfig]]
    # Whether the method decodes through a frozen SAM prompt encoder + mask decoder.
    uses_sam_decoder: ClassVar[bool] = False
    # Whose input frame ``mask_logits`` lives in: "sam" or "backbone".
    logits_frame: ClassVar[str] = "backbone"
    # Frozen submodules: never trained, never in ``trainable_state_dict``.
    frozen_modules: ClassVar[tuple[str, ...]] = ("sam_decoder",)
    # Training-free methods (PerSAM, prototype matching) have nothing to train.
    trainable: ClassVar[bool] = True
    # DistributedDataParallel(find_unused_parameters=...): True when some parameters get no gradient.
    ddp_find_unused_parameters: ClassVar[bool] = False

    config: MethodConfig

    @classmethod
    def from_config(cls, config: MethodConfig, sam_decoder: nn.Module | None = None) -> "RefSegMethod":
        raise NotImplementedError

    def feature_spec(self) -> FeatureSpec:
        """What this method reads: its config's answer (:meth:`MethodConfig.feature_spec`)."""
        return self.config.feature_spec()

    @classmethod
    def config_for_features(
        cls, config: MethodConfig, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]
    ) -> MethodConfig:
        """``config`` adapted to the frozen features at hand: ``shapes[role][name] = (C, h, w)`` as
        the feature stores (or live encoders) give them, e.g. the SAM grid of a proxy SAM or the
        channels of the backbone. The default changes nothing."""
        return config

    def loss(self, outputs: Mapping[str, Any], targets: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """``targets``, ``valid``: B x H x W float {0, 1} in the logits frame (any resolution)."""
        raise NotImplementedError

    def mask_logits(self, outputs: Mapping[str, Any]) -> torch.Tensor:
        """B x 1 x H x W prediction logits over the :attr:`logits_frame` encoder's frame."""
        return outputs["mask_logits"]

    def frame_size(self) -> int | None:
        """Side of the square frame the method reads reference masks (and ``valid_sizes``) in, when it
        is not its ``logits_frame`` encoder's input size (SegIC: its input size; PerSAM: SAM's
        prompt frame); None = the encoder's input size."""
        return None

    # -- training-side hooks (module docstring) ------------------------------------------------
    def after_step(self, outputs: Mapping[str, Any], features: EpisodeFeatures) -> None:
        """Called by the training loop after each optimizer step (training mode); default: nothing."""

    def extra_state(self) -> dict[str, Any] | None:
        """Training state that is not a weight (``torch.load(weights_only=True)``-safe), or None."""
        return None

    def load_extra_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore :meth:`extra_state` output; the default accepts only None (nothing saved)."""
        if state is not None:
            raise ModelError(f"{self.name} keeps no extra training state, got {sorted(state)}")

    # -- the learnable part ---------------------------------------------------------------------
    def _is_frozen(self, name: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in self.frozen_modules)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not self._is_frozen(n)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights (and buffers) of everything but the frozen submodules, detached on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if not self._is_frozen(k)}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Strictly load ``trainable_state_dict()`` output; errors name missing / unexpected keys."""
        from refseg_models.encoders.checkpoint import load_state_dict_strict

        full = {k: v for k, v in self.state_dict().items() if self._is_frozen(k)}
        unexpected_frozen = sorted(k for k in state if self._is_frozen(k))
        if unexpected_frozen:
            raise ModelError(f"{source}: holds frozen weights {unexpected_frozen[:5]} (trainable part expected)")
        load_state_dict_strict(self, {**full, **state}, source=f"{source} ({self.name})")

    def check_features(self, features: EpisodeFeatures) -> None:
        self.feature_spec().check(features, self.name)


def check_sam_decoder_grid(sam_decoder: nn.Module, grid: int, method: str) -> None:
    """The frozen decoder's image-embedding grid must be the method's SAM grid."""
    size = tuple(sam_decoder.prompt_encoder.image_embedding_size)
    if size != (grid, grid):
        raise ModelError(
            f"{method}: the SAM decoder was built for a {size[0]} x {size[1]} embedding grid, the method "
            f"config for {grid} x {grid} (set feature_size to the SAM store's grid)"
        )
