"""The method registry: name -> method class, imported on first use, and ``build_model``.

A method's name is written once, here: ``RefSegMethod.name`` reads it back from this table. Every
class implements the contract of :class:`refseg_models.method.RefSegMethod` and owns its config
class (defaults written once there). Adding a method: docs/methods.md, "Adding a method".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from refseg_models.config import MethodConfig
from refseg_models.errors import ModelError
from refseg_models.registry import Registry

METHODS = Registry("method", {
    "vrp_sam": "refseg_models.modeling.vrp_sam:VRPSam",
    "prosam": "refseg_models.modeling.prosam:ProSam",
    "fcp": "refseg_models.modeling.fcp:FCP",
    "segic": "refseg_models.modeling.segic:SegIC",
    "persam": "refseg_models.modeling.persam:PerSAM",
    "prototype_matching": "refseg_models.modeling.prototype_matching:PrototypeMatching",
})


def available_models() -> list[str]:
    return METHODS.names()


def method_class(method: str) -> type:
    """The :class:`~refseg_models.method.RefSegMethod` subclass registered as ``method``."""
    return METHODS.get(method)


def method_config(method: str, config: MethodConfig | Mapping[str, Any] | None = None, **overrides: Any) -> MethodConfig:
    """``method``'s config: its defaults, updated by ``config`` (a config or a dict) and ``overrides``."""
    cls = method_class(method).config_class
    if isinstance(config, MethodConfig):
        if not isinstance(config, cls):
            raise ModelError(f"{method} takes a {cls.__name__}, got a {type(config).__name__}")
        base = config.to_dict()
    else:
        base = dict(config or {})
    return cls.from_dict({**base, **overrides})


def build_model(
    method: str,
    config: MethodConfig | Mapping[str, Any] | None = None,
    *,
    sam_decoder: nn.Module | None = None,
    sam_checkpoint: str | Path | None = None,
    allow_random_init: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build ``method`` from its config (the paper's defaults unless overridden).

    SAM-prompt methods (VRP-SAM, ProSAM, FCP, PerSAM) decode through a frozen SAM prompt encoder +
    mask decoder: pass a built ``sam_decoder`` (shared between models), or ``sam_checkpoint`` (a SAM
    or proxy-SAM checkpoint), or ``allow_random_init=True`` for a random one (tests and parameter
    counts only: a random SAM decoder ignores prompts). Forgetting all three is an error, never a
    silent random SAM.
    """
    cls = method_class(method)
    cfg = method_config(method, config, **overrides)
    if cls.uses_sam_decoder:
        if sam_decoder is not None and sam_checkpoint is not None:
            raise ModelError("pass either sam_decoder or sam_checkpoint, not both")
        if sam_decoder is None:
            # segment-anything is imported by the SAM-prompt methods only (SegIC and prototype matching run without it)
            from refseg_models.modeling.sam_decoder import build_sam_decoder

            if sam_checkpoint is None and not allow_random_init:
                raise ModelError(
                    f"{method} decodes through a frozen, pretrained SAM: pass sam_checkpoint (a SAM or proxy-SAM "
                    "checkpoint) or a built sam_decoder; allow_random_init=True builds a random SAM decoder "
                    "(tests and parameter counts only: it ignores prompts)"
                )
            sam_decoder = build_sam_decoder(sam_checkpoint, image_embedding_size=cfg.feature_size)
    elif sam_decoder is not None or sam_checkpoint is not None:
        raise ModelError(f"{method} does not decode through SAM: it takes no sam_decoder / sam_checkpoint")
    return cls.from_config(cfg, sam_decoder)
