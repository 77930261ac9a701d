"""The inference checkpoint of a method (format ``refseg-model/2``), and atomic saving.

A ``torch.save`` dict loadable with ``torch.load(weights_only=True)`` (tensors and plain values
only; nothing is unpickled)::

    {
      "format": "refseg-model/2",
      "method": "vrp_sam" | "prosam" | "fcp" | "segic" | "persam" | "prototype_matching",
      "config": {...},            # the method config's to_dict(): rebuilds the model
      "state_dict": {...},        # model.trainable_state_dict(): the learnable part only
      "encoders": {               # the frozen encoders whose features it was trained on
        "sam": {"encoder_id": "sam_vit_h", "weights_sha256": "...", "preprocessing_id": "...",
                "options": {...}},                         # builder options (no paths)
        "backbone": {...},
      },
      "meta": {...},              # provenance: run name, fold, step, metrics (plain values)
    }

The frozen SAM prompt encoder / mask decoder is NOT inside: it comes from the SAM (or proxy-SAM)
checkpoint whose sha256 is recorded under ``encoders["sam"]``, and a checkpoint used with other
encoders, weights or preprocessing is refused with every difference named
(:func:`check_encoders`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refseg_models.errors import ModelError, WeightsNotFoundError

CHECKPOINT_FORMAT = "refseg-model/2"
# Weights marker for encoders built without a checkpoint (tests): never matches real weights.
RANDOM_INIT = "random-init"


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a reader
    (or a resumed run after a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(path: str | Path) -> str:
    """Hex sha256 of a weights file (cached per path, size and mtime within the process)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


@dataclass(frozen=True)
class EncoderIdentity:
    """What a frozen encoder's features are a function of (the feature store's key, minus the dataset
    and the storage dtype): architecture, weights (sha256), preprocessing, builder options."""

    encoder_id: str
    weights_sha256: str
    preprocessing_id: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, encoder: Any, weights: str | Path | None, options: Mapping[str, Any] | None = None) -> "EncoderIdentity":
        """The identity of a built encoder and the weights file it was built from (None: random)."""
        sha = RANDOM_INIT if weights is None else weights_sha256(weights)
        return cls(str(encoder.encoder_id), sha, str(encoder.preprocessing_id), dict(options or {}))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self, sha_chars: int = 64) -> str:
        """``<encoder id> (weights sha256 <sha>, <preprocessing id>)``, the sha cut to ``sha_chars``."""
        return f"{self.encoder_id} (weights sha256 {self.weights_sha256[:sha_chars]}, {self.preprocessing_id})"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> "EncoderIdentity":
        try:
            return cls(str(data["encoder_id"]), str(data["weights_sha256"]), str(data["preprocessing_id"]), dict(data.get("options", {})))
        except (KeyError, TypeError) as error:
            raise ModelError(f"{source}: malformed encoder entry {dict(data)!r} ({error})") from error

    def differences(self, other: "EncoderIdentity") -> list[str]:
        return [
            f"{name}: checkpoint has {getattr(self, name)!r}, given {getattr(other, name)!r}"
            for name in ("encoder_id", "weights_sha256", "preprocessing_id")
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass(frozen=True)
class InferenceCheckpoint:
    method: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    encoders: dict[str, EncoderIdentity]
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "checkpoint"


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
                raise ModelError(f"{where}: keys must be str, got {k!r}")
            _check_plain(v, f"{where}.{k}")
        return
    raise ModelError(f"{where} holds a {type(value).__name__}; only plain values load with weights_only=True")


def save_inference_checkpoint(
    path: str | Path,
    model: nn.Module,
    encoders: Mapping[str, EncoderIdentity],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a :class:`~refseg_models.method.RefSegMethod`) as ``refseg-model/2``, atomically."""
    needed = model.feature_spec().encoders
    missing = [role for role in needed if role not in encoders]
    if missing:
        raise ModelError(f"{model.name} reads features of encoders {list(needed)}; identities missing for {missing}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "method": model.name,
        "config": model.config.to_dict(),
        "state_dict": model.trainable_state_dict(),
        "encoders": {role: encoders[role].to_dict() for role in needed},
        "meta": dict(meta or {}),
    }
    _check_plain(payload["config"], "config")
    _check_plain(payload["encoders"], "encoders")
    _check_plain(payload["meta"], "meta")
    return atomic_torch_save(payload, path)


def load_inference_checkpoint(path: str | Path) -> InferenceCheckpoint:
    """Read and validate a method checkpoint (``weights_only=True``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"method checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or pickled objects refused by weights_only
        raise ModelError(f"{path}: not a loadable refseg method checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelError(f"{path}: expected format {CHECKPOINT_FORMAT!r}, found {found!r}")
    for key, kind in (("method", str), ("config", dict), ("state_dict", dict), ("encoders", dict), ("meta", dict)):
        if not isinstance(payload.get(key), kind):
            raise ModelError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    from refseg_models.build import method_class

    method_class(payload["method"])  # unknown method -> ModelError naming the known ones
    encoders = {role: EncoderIdentity.from_dict(entry, str(path)) for role, entry in payload["encoders"].items()}
    return InferenceCheckpoint(payload["method"], payload["config"], payload["state_dict"], encoders, payload["meta"], str(path))


def check_encoders(checkpoint: InferenceCheckpoint, given: Mapping[str, EncoderIdentity]) -> None:
    """Refuse encoders other than the ones the checkpoint was trained with, naming every difference."""
    problems = []
    for role, expected in checkpoint.encoders.items():
        if role not in given:
            problems.append(f"{role}: no encoder given")
            continue
        problems += [f"{role} {d}" for d in expected.differences(given[role])]
    if problems:
        raise ModelError(
            f"{checkpoint.source} ({checkpoint.method}) was trained on other frozen features than given: "
            + "; ".join(problems)
        )


def model_from_checkpoint(
    checkpoint: InferenceCheckpoint,
    sam_decoder: nn.Module | None = None,
    sam_checkpoint: str | Path | None = None,
    allow_random_init: bool = False,
) -> nn.Module:
    """Rebuild the method from its config and load its trainable weights strictly (eval mode).

    SAM-prompt methods take the frozen decoder from ``sam_decoder`` / ``sam_checkpoint`` (the file
    whose sha256 the checkpoint records; check it with :func:`check_encoders`)."""
    from refseg_models.build import build_model

    model = build_model(
        checkpoint.method,
        checkpoint.config,
        sam_decoder=sam_decoder,
        sam_checkpoint=sam_checkpoint,
        allow_random_init=allow_random_init,
    )
    model.load_trainable_state_dict(checkpoint.state_dict, checkpoint.source)
    return model.eval()
