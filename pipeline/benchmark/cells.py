"""A table's cells: method x fold x shot x seed x reference type, and what each one runs.

* a **training cell** (every method of the table, every fold, shot, seed and reference type) is one
  run of the training job, configured exactly as ``jobs/train_<dataset>.py`` with the arguments
  :meth:`TrainingCell.arguments` lists (so :meth:`TrainingCell.command` reproduces it by hand): its
  ``TrainConfig`` (hence its run name, which holds the configuration's fingerprint) and its fold
  are its identity. The table's baselines are measured inside it, on its test episodes;
* an **evaluation cell** (tracks ``fss1000`` and ``coco2pascal``) evaluates a training cell's
  inference model, or a baseline, on another dataset's episodes; its identity is the protocol, the
  predictor (a training cell, or a baseline name) and the shot / reference type;
* a **curve cell** (track ``robustness``) measures the prompt-noise curve of a training cell of a
  SAM-prompt method (VRP-SAM, ProSAM, FCP: the methods with prompt tokens).

Every store a cell reads comes from one extraction per encoder (the same locations for every cell).
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from functools import cached_property

from pipeline.benchmark.spec import TableSpec
from pipeline.errors import ConfigError
from pipeline.locations import resolve_root
from pipeline.training.config import TrainConfig
from pipeline.training.job import JobOptions, fold_configs
from refseg_models.build import method_class


def is_sam_prompt_method(method: str) -> bool:
    """Methods whose prediction is prompt tokens decoded by SAM's decoder (the noise curve's subject)."""
    cls = method_class(method)
    return hasattr(cls, "prompt_tokens") and hasattr(cls, "decode_tokens")


@dataclass(frozen=True, eq=False)
class TrainingCell:
    spec: TableSpec
    method: str
    fold: int
    shot: int
    reference: str
    seed: int
    root: str | None = None

    @property
    def key(self) -> str:
        """Human-readable name: ``<method>/<dataset> fold <f>/<shot>-shot/<reference>/seed <s>``."""
        return f"{self.method}/{self.spec.dataset} fold {self.fold}/{self.shot}-shot/{self.reference}/seed {self.seed}"

    @property
    def dataset(self) -> str:
        return self.spec.dataset

    def arguments(self) -> list[str]:
        """The training job's command-line arguments of this cell (``jobs/train_<dataset>.py``)."""
        spec, data, training, scaling = self.spec, self.spec.data, self.spec.training, self.spec.scaling
        sam, backbone = spec.encoders["sam"], spec.encoders["backbone"]
        recipe = {**training.get("recipe", {}), "seed": self.seed}
        args = ["--method", self.method, "--folds", str(self.fold), "--shot", str(self.shot),
                "--annotation-type", self.reference, "--recipe-options", json.dumps(recipe, sort_keys=True)]
        options = training.get("method_options", {}).get(self.method)
        if options:
            args += ["--method-options", json.dumps(options, sort_keys=True)]
        if spec.dataset == "coco20i":
            args += ["--annotations", data["annotations"], "--images", data["images"], "--layout", data["layout"]]
            if data.get("lists_dir"):
                args += ["--lists-dir", data["lists_dir"]]
            if "crowd" in training:
                args += ["--crowd", training["crowd"]]
        else:
            args += ["--images", data["pascal_root"], "--lists-dir", data["pascal_lists"]]
        if data.get("feature_dataset"):
            args += ["--feature-dataset", data["feature_dataset"]]
        for key, flag in (("episodes_per_epoch", "--episodes-per-epoch"), ("val_episodes", "--val-episodes"),
                          ("test_episodes", "--test-episodes"), ("test_seed", "--test-seed"),
                          ("point_style", "--point-style"), ("novel_policy", "--novel-policy"),
                          ("checkpoints_per_epoch", "--checkpoints-per-epoch"), ("log_every", "--log-every"),
                          ("precision", "--precision")):
            if key in training:
                args += [flag, str(training[key])]
        if training.get("sampler", "episodes") != "episodes":
            args += ["--sampler", training["sampler"], "--mix", json.dumps(training.get("mix", {}), sort_keys=True)]
        args += ["--sam-encoder", sam.encoder, "--backbone", backbone.encoder, "--backbone-checkpoint", backbone.checkpoint]
        if sam.checkpoint:
            args += ["--sam-checkpoint", sam.checkpoint]
        if sam.store:
            args += ["--sam-store", sam.store]
        if backbone.store:
            args += ["--backbone-store", backbone.store]
        for role, encoder in (("sam", sam), ("backbone", backbone)):
            if encoder.precision != "float32":
                args += [f"--{role}-precision", encoder.precision]
        args += ["--num-workers", str(scaling.num_workers), "--cpus-per-worker", str(scaling.cpus_per_worker)]
        if scaling.use_gpu:
            args.append("--use-gpu")
        # stores a sampler reads besides the method's (SegIC's mix): extracted by the training job itself
        args += ["--experiment", spec.experiment, "--extract-missing"]
        if self.root:
            args += ["--root", self.root]
        for baseline in spec.baselines:
            args += ["--baseline", baseline]
        if spec.evaluate_untrained:
            args.append("--evaluate-untrained")
        return args

    def command(self) -> str:
        """The training job's command line that runs (or resumes) this cell by hand."""
        return shlex.join(["python", f"jobs/train_{self.dataset}.py", *self.arguments()])

    @cached_property
    def configs(self) -> tuple[TrainConfig, JobOptions]:
        """(this fold's TrainConfig, JobOptions) exactly as the training job builds them."""
        from pipeline.training.commands import add_train_arguments, configs_from_args

        parser = argparse.ArgumentParser(prog=f"train_{self.dataset}", add_help=False)
        add_train_arguments(parser, self.dataset)
        try:
            args = parser.parse_args(self.arguments())
        except SystemExit as error:  # argparse has printed why; the table was validated, so this is a bug
            raise ConfigError(f"{self.spec.path}: the training arguments of cell {self.key} were refused") from error
        base, options = configs_from_args(args, self.dataset)
        options.gpus_per_worker = self.spec.scaling.gpus_per_worker
        options.extraction_workers = self.spec.scaling.extraction_workers
        (cfg,) = fold_configs(base, options)
        return cfg, options

    @property
    def config(self) -> TrainConfig:
        return self.configs[0]

    @property
    def run_name(self) -> str:
        return self.config.run_name


@dataclass(frozen=True, eq=False)
class EvaluationCell:
    """``protocol``: ``fss1000`` or ``coco2pascal``; ``trained``: the training cell whose model it
    evaluates, or None for a ``baseline`` (training-free method) on the same episodes."""

    spec: TableSpec
    protocol: str
    fold: int | None
    shot: int
    reference: str
    trained: TrainingCell | None = None
    baseline: str | None = None

    @property
    def method(self) -> str:
        return self.trained.method if self.trained is not None else str(self.baseline)

    @property
    def seed(self) -> int | None:
        return self.trained.seed if self.trained is not None else None

    @property
    def key(self) -> str:
        what = self.trained.key if self.trained is not None else f"{self.baseline} (training-free)"
        where = self.protocol + (f" fold {self.fold}" if self.fold is not None else "")
        return f"{where}/{self.shot}-shot/{self.reference}: {what}"

    @property
    def identity(self) -> str:
        """What decides its result: protocol, fold, shot, reference, episodes and the predictor."""
        predictor = f"{self.trained.run_name}#fold{self.trained.fold}" if self.trained else f"baseline:{self.baseline}"
        episodes = self.spec.evaluation.get("episodes", 1000), self.spec.evaluation.get("seed", 0)
        return f"{self.protocol}|fold{self.fold}|{self.shot}shot|{self.reference}|episodes{episodes[0]}-seed{episodes[1]}|{predictor}"


@dataclass(frozen=True, eq=False)
class CurveCell:
    """The prompt-noise curve of a trained SAM-prompt cell (logged on its fold run)."""

    trained: TrainingCell

    @property
    def key(self) -> str:
        return f"prompt-noise curve of {self.trained.key}"


@dataclass(frozen=True)
class Cells:
    training: tuple[TrainingCell, ...]
    evaluation: tuple[EvaluationCell, ...]
    curves: tuple[CurveCell, ...]

    def __len__(self) -> int:
        return len(self.training) + len(self.evaluation) + len(self.curves)


def expand_cells(spec: TableSpec, root: str | None = None) -> Cells:
    """Every cell of ``spec``: training cells in the order fold, shot, reference type, method, seed;
    then the evaluation cells of the fss1000 / coco2pascal tracks (each trained cell's model and each
    baseline); then the curve cells of the robustness track."""
    root = root if root is None else resolve_root(root).location
    training = tuple(
        TrainingCell(spec, method, fold, shot, reference, seed, root)
        for fold in spec.folds for shot in spec.shots for reference in spec.reference_types
        for method in spec.methods for seed in spec.seeds
    )
    evaluation: list[EvaluationCell] = []
    for protocol in ("fss1000", "coco2pascal"):
        if protocol not in spec.tracks:
            continue
        for cell in training:
            evaluation.append(EvaluationCell(spec, protocol, cell.fold, cell.shot, cell.reference, trained=cell))
        folds = spec.folds if protocol == "coco2pascal" else (None,)  # FSS-1000's test split has no folds
        for fold in folds:
            for shot in spec.shots:
                for reference in spec.reference_types:
                    for baseline in spec.baselines:
                        evaluation.append(EvaluationCell(spec, protocol, fold, shot, reference, baseline=baseline))
    curves = tuple(CurveCell(cell) for cell in training if "robustness" in spec.tracks and is_sam_prompt_method(cell.method))
    return Cells(training, tuple(evaluation), curves)
