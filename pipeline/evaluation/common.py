"""What every evaluation job shares: the predictor (a trained method's inference checkpoint or a
training-free method, with live frozen encoders), the checks of its options, the per-split result
record and ``results.json`` writing.

The COCO-20i job (:mod:`pipeline.evaluation.job`) and the FSS-1000 job
(:mod:`pipeline.evaluation.fss1000`) differ only in their data, episodes and class names; both
evaluate a seeded episode manifest with :func:`pipeline.evaluation.runner.evaluate_manifest_with_ray`
and HSNet's meter. Features are computed live by the frozen encoders in the Ray workers (no feature
store is read), in both jobs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.evaluation.meter import FewShotMeter
from pipeline.evaluation.runner import Episode, Predictor
from pipeline.report import SkipReport
from pipeline.store.fs import io_errors


DEFAULT_METHOD = "prototype_matching"  # the training-free method evaluated when neither is given


def check_method(config) -> str:
    """The method that predicts, checked: ``config.checkpoint``'s (loaded and validated; a
    ``config.method`` other than the one it holds, or ``config.method_options``, are refused: the
    checkpoint decides both), or a known training-free ``config.method`` (default
    :data:`DEFAULT_METHOD`; a trained method is only evaluated from its inference checkpoint)."""
    from refseg_models.build import available_models, method_class

    if config.checkpoint is not None:
        from refseg_models.checkpoint import load_inference_checkpoint

        held = load_inference_checkpoint(config.checkpoint).method
        if config.method is not None and config.method != held:
            raise ConfigError(
                f"--method {config.method} does not match --checkpoint {config.checkpoint}, which holds a {held} "
                f"model: leave --method out (the checkpoint decides) or evaluate a {config.method} checkpoint"
            )
        if config.method_options:
            raise ConfigError(
                f"--method-options configure a training-free method; --checkpoint {config.checkpoint} holds its "
                f"{held} model's own configuration"
            )
        return held
    method = config.method or DEFAULT_METHOD
    if method not in available_models():
        raise ConfigError(f"unknown method {method!r}; available: {', '.join(available_models())}")
    if method_class(method).trainable:
        raise ConfigError(f"{method} is trained: evaluate its inference checkpoint (--checkpoint)")
    return method


def check_backbone(name: str) -> None:
    from refseg_models.encoders import available_encoders

    if name not in available_encoders():
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(available_encoders())}")


def check_paths(paths: Sequence[tuple[str | None, str]]) -> None:
    """Each ``(path, "file" | "dir")`` that is given must exist as that kind."""
    for path, kind in paths:
        if path is not None and not (Path(path).is_file() if kind == "file" else Path(path).is_dir()):
            raise ConfigError(f"path not found: {path} (expected a {'folder' if kind == 'dir' else 'file'})")


def sam_checkpoint_for(config) -> str | None:
    """The SAM weights the predictor reads: the given file, or, for the proxy SAM encoder (the CPU
    default) when the predictor reads SAM features at all, the shipped, sha256-verified proxy file."""
    from refseg_models.encoders.sam_proxy import PROXY_ENCODER, default_proxy_sam_checkpoint

    if config.sam_checkpoint is not None or config.sam_encoder != PROXY_ENCODER:
        return config.sam_checkpoint
    if config.checkpoint is not None:
        from refseg_models.checkpoint import load_inference_checkpoint

        uses_sam = "sam" in load_inference_checkpoint(config.checkpoint).encoders
    else:
        from refseg_models.build import method_config

        uses_sam = "sam" in method_config(config.method, config.method_options).feature_spec().encoders
    return str(default_proxy_sam_checkpoint()) if uses_sam else None


@dataclass(frozen=True)
class PredictorFactory:
    """Builds, inside each worker, a :class:`refseg_models.predictor.RefSegPredictor` (live frozen
    encoders + the method through its contract): from an inference checkpoint, or a training-free
    method by name. The predictor returns the logits over the method's frame and that frame.

    ``backbone_options``: extra builder options of the backbone (e.g. ``{"input_size": 224}``);
    empty (the COCO-20i job) = the builder's defaults."""

    checkpoint: str | None
    method: str
    method_options: dict
    sam_encoder: str
    sam_checkpoint: str | None
    backbone: str
    backbone_checkpoint: str | None
    backbone_options: dict = field(default_factory=dict)

    def encoder_options(self) -> dict:
        # Builder options that are paths: the proxy SAM's MobileNetV2 weights are the backbone's file.
        from refseg_models.encoders import available_encoders, encoder_options

        options: dict = {}
        if (self.sam_encoder in available_encoders() and self.backbone_checkpoint
                and "backbone_checkpoint" in encoder_options(self.sam_encoder)):
            options["sam"] = {"backbone_checkpoint": self.backbone_checkpoint}
        if self.backbone_options:
            options["backbone"] = dict(self.backbone_options)
        return options

    def build(self):
        from refseg_models.predictor import RefSegPredictor

        if self.checkpoint is not None:
            return RefSegPredictor.from_checkpoint(
                self.checkpoint, sam_checkpoint=self.sam_checkpoint, backbone_checkpoint=self.backbone_checkpoint,
                encoder_options=self.encoder_options(),
            )
        return RefSegPredictor.training_free(
            self.method, sam_checkpoint=self.sam_checkpoint, backbone_checkpoint=self.backbone_checkpoint,
            sam_encoder=self.sam_encoder, backbone=self.backbone, config=self.method_options,
            encoder_options=self.encoder_options(),
        )

    def __call__(self) -> Predictor:
        predictor = self.build()

        def predict(episode: Episode):
            masks = [annotation > 0 for annotation in episode.support_annotations]
            logits, frame = predictor.predict_logits(list(episode.support_images), masks, episode.query_image)
            return logits[0, 0], frame

        return predict


def predictor_factory_for(config, backbone_options: Mapping | None = None) -> PredictorFactory:
    """The job config's predictor (``config`` has the predictor fields of the evaluation configs)."""
    return PredictorFactory(
        config.checkpoint, config.method, dict(config.method_options), config.sam_encoder, sam_checkpoint_for(config),
        config.backbone, config.backbone_checkpoint, dict(backbone_options or {}),
    )


def split_result(meter: FewShotMeter, class_names: Mapping[int, str], sampling_report: SkipReport,
                 eval_report: SkipReport) -> dict:
    """One evaluated split (a COCO-20i fold, FSS-1000's test split) as ``results.json`` records it."""
    metrics = meter.compute()
    return {
        "miou": metrics["miou"],
        "fbiou": metrics["fbiou"],
        "episodes": metrics["episodes"],
        "per_class_iou": {class_names[c]: v for c, v in metrics["per_class_iou"].items()},
        "skipped_sampling": sampling_report.as_dict(),
        "skipped_evaluation": eval_report.as_dict(),
    }


def _finite(value):
    """JSON has no NaN: undefined numbers (e.g. FB-IoU without valid pixels) are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, payload: dict) -> None:
    """Atomically (temp + rename), strict JSON."""
    temp = path.with_suffix(path.suffix + ".tmp")
    with io_errors(f"cannot write {path}"):
        temp.write_text(json.dumps(_finite(payload), indent=1, allow_nan=False))
        os.replace(temp, path)

