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

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.evaluation.meter import FewShotMeter
from pipeline.evaluation.resolution import EvalResolution
from pipeline.evaluation.runner import Episode, Predictor
from pipeline.locations import check_durable
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


@dataclass(kw_only=True)
class PredictorOptions:
    """What predicts and how it is scored: the fields every evaluation job's config shares (a trained
    method's inference checkpoint, or a training-free method by name with its options; the frozen
    encoders and their weights; the evaluation resolution; the Ray workers)."""

    checkpoint: str | None = None
    method: str | None = None  # with a checkpoint: must be the one it holds (None = the checkpoint's)
    method_options: dict = field(default_factory=dict)
    backbone: str = "mobilenet_v2"
    backbone_checkpoint: str | None = None
    backbone_options: dict = field(default_factory=dict)  # builder options, e.g. {"input_size": 224}
    sam_encoder: str = "sam_proxy_mobilenet_v2"  # the proxy SAM (docs/proxy_sam.md); its file is the shipped asset
    sam_checkpoint: str | None = None
    resolution_mode: str = "fixed"
    resolution_size: int = 512
    num_workers: int = 2
    ray_address: str | None = None  # None: an existing cluster if RAY_ADDRESS is set, else embedded local Ray

    def validate_predictor(self) -> None:
        """The predictor's options, without loading anything (ConfigError naming the bad value)."""
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        if not isinstance(self.backbone_options, dict):
            raise ConfigError(f"backbone_options must be a JSON object, got {self.backbone_options!r}")
        EvalResolution(self.resolution_mode, self.resolution_size)  # type: ignore[arg-type]
        check_backbone(self.backbone)
        check_paths(((self.backbone_checkpoint, "file"), (self.sam_checkpoint, "file"), (self.checkpoint, "file")))

    def predictor_factory(self) -> PredictorFactory:
        """The predictor each Ray worker builds (after :func:`check_method` settled ``method``)."""
        return PredictorFactory(
            self.checkpoint, self.method, dict(self.method_options), self.sam_encoder, sam_checkpoint_for(self),
            self.backbone, self.backbone_checkpoint, dict(self.backbone_options),
        )


def run_job(config: Any, run: Callable[[Any], dict]) -> int:
    """An evaluation job's entry: its output folder refused in one line when a Ray job's temporary
    working dir would hold it, then ``run(config)``."""
    check_durable({"the output folder (--output-dir)": config.output_dir}, hint="give --output-dir a shared absolute path")
    run(config)
    return 0


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of :class:`PredictorOptions` (every evaluation job has them)."""
    parser.add_argument("--checkpoint", help="inference checkpoint of a trained method (refseg-model/2)")
    parser.add_argument("--method", help="a training-free method (default: prototype_matching); with --checkpoint: "
                                         "omit it, or give the method the checkpoint holds")
    parser.add_argument("--method-options", type=json.loads, default={},
                        help='its config options (JSON), e.g. \'{"feature": "layer3"}\'')
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--backbone-checkpoint", help="backbone weights (e.g. MobileNetV2)")
    parser.add_argument("--backbone-options", type=json.loads, default={},
                        help='backbone builder options (JSON), e.g. \'{"input_size": 224}\' (default: the builder\'s)')
    parser.add_argument("--sam-encoder", default="sam_proxy_mobilenet_v2", help="SAM encoder (training-free SAM methods)")
    parser.add_argument("--sam-checkpoint", help="SAM weights (SAM-prompt methods; default for the proxy: the shipped file)")
    parser.add_argument("--resolution-mode", choices=("fixed", "original"), default="fixed")
    parser.add_argument("--resolution-size", type=int, default=512)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--ray-address", default=None)


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

