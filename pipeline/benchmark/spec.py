"""A declared results table (``benchmarks/*.yaml``): read, expanded (``${VAR}``), validated.

Everything a table can get wrong is refused here, in one line naming the file and the key, before
anything is extracted, trained or logged: unknown keys, methods, baselines, folds, reference types,
tracks, and data that does not exist (:meth:`TableSpec.check_data`). The format is in
docs/benchmark.md; a small example::

    name: cpu-small
    tracks: [unseen]
    dataset: coco20i
    methods: [vrp_sam, prosam]
    baselines: [prototype_matching]
    folds: [0]
    shots: [1]
    seeds: [0, 1]
    reference_types: [mask, box]
    data: {annotations: ..., images: ..., lists_dir: ...}
    encoders: {backbone: {encoder: mobilenet_v2, checkpoint: ...}}

String values may use ``${VAR}`` (an environment variable; an unset one is an error naming it) or
``${VAR:-default}``; relative paths are read from the table file's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.folds import NUM_FOLDS
from pipeline.errors import ConfigError
from refseg_models.annotations import ANNOTATION_TYPES, POINT_STYLES
from refseg_models.build import available_models, method_class
from refseg_models.encoders.precision import PRECISIONS

TRACKS = ("unseen", "coco2pascal", "fss1000", "robustness")
DATASETS = ("coco20i", "pascal5i")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Keys of each section and, for data, which are paths (resolved against the table's folder).
_TOP = ("name", "description", "experiment", "tracks", "dataset", "methods", "baselines", "folds", "shots", "seeds",
        "reference_types", "evaluate_untrained", "published", "compare_with", "data", "encoders", "training",
        "evaluation", "robustness", "scaling")
_DATA_PATHS = ("annotations", "images", "lists_dir", "pascal_root", "pascal_lists", "fss1000_root", "fss1000_lists")
_DATA = (*_DATA_PATHS, "layout", "feature_dataset")
_ENCODER = ("encoder", "checkpoint", "store", "precision")  # builder options: the encoders' defaults (the training job takes none)
_TRAINING = ("recipe", "method_options", "episodes_per_epoch", "val_episodes", "test_episodes", "test_seed",
             "point_style", "novel_policy", "crowd", "sampler", "mix", "checkpoints_per_epoch", "log_every", "precision")
_EVALUATION = ("episodes", "seed", "num_workers", "resolution_size")
_ROBUSTNESS = ("noise_scales", "relative", "episodes")
_SCALING = ("num_workers", "cpus_per_worker", "use_gpu", "gpus_per_worker", "concurrency", "extraction_workers")


@dataclass(frozen=True)
class EncoderSpec:
    """A frozen encoder of the table: registry name, weights file (None: the proxy SAM's shipped
    file), store location (None: ``<root>/stores/<feature dataset>-<encoder>``, ``-bfloat16`` appended
    for a bf16 store), precision the encoder runs in for its store (``refseg extract --precision``)."""

    encoder: str
    checkpoint: str | None = None
    store: str | None = None
    precision: str = "float32"


@dataclass(frozen=True)
class Scaling:
    """Per cell: Ray Train workers, CPUs and GPUs per worker (fractions share a GPU between cells);
    ``concurrency``: cells run at once (1: one after the other, the CPU default)."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float | None = None
    concurrency: int = 1
    extraction_workers: int = 1


@dataclass(frozen=True)
class TableSpec:
    """A validated table. ``path``: the file; ``folder``: what relative paths were read against."""

    name: str
    path: str
    tracks: tuple[str, ...]
    dataset: str
    methods: tuple[str, ...]
    baselines: tuple[str, ...]
    folds: tuple[int, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    reference_types: tuple[str, ...]
    data: dict[str, Any]
    encoders: dict[str, EncoderSpec]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    robustness: dict[str, Any]
    scaling: Scaling
    published: str
    compare_with: tuple[str, ...] = ()
    evaluate_untrained: bool = False
    description: str = ""
    experiment: str = ""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def digest(self) -> str:
        """A short hash of the expanded table (what the benchmark run records of its spec)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def where(self, key: str) -> str:
        return f"{self.path}: {key}"

    def noise_scales(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.robustness.get("noise_scales", (0.0, 0.25, 0.5, 1.0, 2.0)))

    def check_data(self) -> None:
        """Every file and folder the table reads exists: one line naming the first that does not
        (and the key that names it), before anything runs."""
        needs = _needed_data(self)
        for key, (kind, what) in needs.items():
            value = self.data.get(key)
            if value is None:
                raise ConfigError(f"{self.path}: {what} is needed ({self._needs_why(key)}); give data.{key}")
            _check_path(self.path, f"data.{key}", str(value), kind, what)
        for role, encoder in self.encoders.items():
            if encoder.checkpoint is not None:
                _check_path(self.path, f"encoders.{role}.checkpoint", encoder.checkpoint, "file",
                            f"the {role} encoder's weights")

    def _needs_why(self, key: str) -> str:
        if key.startswith("pascal"):
            return "track coco2pascal or dataset pascal5i"
        if key.startswith("fss1000"):
            return "track fss1000"
        return f"dataset {self.dataset}"


def _needed_data(spec: TableSpec) -> dict[str, tuple[str, str]]:
    """{data key: ("file" | "dir", what it is)} that the table's dataset and tracks read."""
    needs: dict[str, tuple[str, str]] = {}
    if spec.dataset == "coco20i":
        needs["annotations"] = ("file", "the COCO instances json")
        needs["images"] = ("dir", "the COCO image folder")
    else:
        needs["pascal_root"] = ("dir", "the PASCAL VOC 2012 + SBD root (JPEGImages, SegmentationClassAug)")
    if spec.data.get("lists_dir") is not None or spec.dataset == "pascal5i":
        needs["lists_dir" if spec.dataset == "coco20i" else "pascal_lists"] = (
            "dir", "the HSNet COCO-20i lists" if spec.dataset == "coco20i" else "the HSNet PASCAL-5i lists")
    if "coco2pascal" in spec.tracks:
        needs["pascal_root"] = ("dir", "the PASCAL VOC 2012 + SBD root (JPEGImages, SegmentationClassAug)")
        needs["pascal_lists"] = ("dir", "the HSNet PASCAL-5i lists (val/fold*.txt)")
    if "fss1000" in spec.tracks:
        needs["fss1000_root"] = ("dir", "the FSS-1000 folder (one folder per class)")
    return needs


def _check_path(table: str, key: str, value: str, kind: str, what: str) -> None:
    path = Path(value)
    ok = path.is_file() if kind == "file" else path.is_dir()
    if not ok:
        raise ConfigError(f"{table}: {what} ({key} = {value}) {'does not exist' if not path.exists() else 'is not a ' + ('file' if kind == 'file' else 'folder')}; nothing was run")


def expand(value: Any, where: str, environ: dict[str, str] | None = None) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` substituted in every string of ``value``."""
    environ = os.environ if environ is None else environ
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ and environ[name] != "":
                return environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where} uses ${{{name}}}, which is not set: set the environment variable {name}")

        return _VARIABLE.sub(substitute, value)
    join = " " if where.endswith(":") else "."
    if isinstance(value, dict):
        return {k: expand(v, f"{where}{join}{k}", environ) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, f"{where}[{i}]", environ) for i, v in enumerate(value)]
    return value


def _known(section: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(keys)}")


def _list(raw: dict[str, Any], key: str, kind: type, path: str, default: Any = None) -> tuple:
    value = raw.get(key, default)
    if value is None:
        raise ConfigError(f"{path}: {key} is required")
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise ConfigError(f"{path}: {key} is empty")
    for item in value:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise ConfigError(f"{path}: {key} must list {kind.__name__} values, got {item!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{path}: {key} names {sorted({v for v in value if value.count(v) > 1})[0]!r} twice")
    return tuple(value)


def _resolve(folder: Path, value: str | None) -> str | None:
    if value is None or "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (folder / path).resolve())


def parse_table(raw: Any, path: str, folder: Path, environ: dict[str, str] | None = None) -> TableSpec:
    """A :class:`TableSpec` from a parsed YAML mapping (``path``: for messages)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a table file holds a mapping (name, methods, folds, ...), got {type(raw).__name__}")
    _known(raw, _TOP, path)
    raw = expand(raw, f"{path}:", environ)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}: name must be lower-case letters, digits, '-', '_' or '.' (<= 64), got {name!r}")
    tracks = _list(raw, "tracks", str, path, ["unseen"])
    for track in tracks:
        if track not in TRACKS:
            raise ConfigError(f"{path}: unknown track {track!r}; known: {', '.join(TRACKS)}")
    dataset = raw.get("dataset", "coco20i")
    if dataset not in DATASETS:
        raise ConfigError(f"{path}: dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if "coco2pascal" in tracks and dataset != "coco20i":
        raise ConfigError(f"{path}: track coco2pascal trains on COCO-20i: dataset must be coco20i, got {dataset!r}")
    models = available_models()
    methods = _list(raw, "methods", str, path)
    for method in methods:
        if method not in models:
            raise ConfigError(f"{path}: unknown method {method!r}; available: {', '.join(models)}")
        if not method_class(method).trainable:
            raise ConfigError(f"{path}: {method} is training-free: list it under baselines, not methods")
    baselines = _list(raw, "baselines", str, path, []) if raw.get("baselines") else ()
    for baseline in baselines:
        if baseline not in models:
            raise ConfigError(f"{path}: unknown baseline {baseline!r}; available: {', '.join(models)}")
        if method_class(baseline).trainable:
            raise ConfigError(f"{path}: baseline {baseline} is trained: list it under methods")
    folds = _list(raw, "folds", int, path)
    for fold in folds:
        if not 0 <= fold < NUM_FOLDS:
            raise ConfigError(f"{path}: unknown fold {fold}; folds are 0..{NUM_FOLDS - 1}")
    shots = _list(raw, "shots", int, path, [1])
    if any(shot < 1 for shot in shots):
        raise ConfigError(f"{path}: shots must be >= 1, got {list(shots)}")
    seeds = _list(raw, "seeds", int, path)
    if any(not 0 <= seed < 2**31 for seed in seeds):
        raise ConfigError(f"{path}: seeds must be in 0..2**31-1, got {list(seeds)}")
    references = _list(raw, "reference_types", str, path, ["mask"])
    for reference in references:
        if reference not in ANNOTATION_TYPES:
            raise ConfigError(f"{path}: unknown reference type {reference!r}; known: {', '.join(ANNOTATION_TYPES)}")

    folder = Path(folder)
    data = dict(raw.get("data") or {})
    _known(data, _DATA, f"{path}: data")
    for key in _DATA_PATHS:
        data[key] = _resolve(folder, data.get(key))
    data.setdefault("layout", "2017")
    if data["layout"] not in ("2017", "2014"):
        raise ConfigError(f"{path}: data.layout must be '2017' or '2014', got {data['layout']!r}")

    encoders = _encoders(raw.get("encoders") or {}, path, folder)
    training = dict(raw.get("training") or {})
    _known(training, _TRAINING, f"{path}: training")
    if training.get("point_style", "pixel") not in POINT_STYLES:
        raise ConfigError(f"{path}: training.point_style must be one of {POINT_STYLES}")
    if training.get("precision", "float32") not in PRECISIONS:
        raise ConfigError(f"{path}: training.precision must be one of {PRECISIONS}")
    for key in ("recipe", "method_options", "mix"):
        if not isinstance(training.get(key, {}), dict):
            raise ConfigError(f"{path}: training.{key} must be a mapping")
    if "seed" in training.get("recipe", {}):
        raise ConfigError(f"{path}: training.recipe.seed: the seeds are the table's 'seeds' (one cell per seed)")
    unknown_options = sorted(set(training.get("method_options", {})) - set(methods))
    if unknown_options:
        raise ConfigError(f"{path}: training.method_options names {unknown_options[0]!r}, which is not in methods (baselines "
                          "run with their defaults, as the training job runs them)")
    evaluation = dict(raw.get("evaluation") or {})
    _known(evaluation, _EVALUATION, f"{path}: evaluation")
    robustness = dict(raw.get("robustness") or {})
    _known(robustness, _ROBUSTNESS, f"{path}: robustness")
    scales = robustness.get("noise_scales", [0.0, 0.25, 0.5, 1.0, 2.0])
    if not isinstance(scales, list) or not scales or any(not isinstance(s, (int, float)) or s < 0 for s in scales):
        raise ConfigError(f"{path}: robustness.noise_scales must be a list of numbers >= 0, got {scales!r}")
    scaling_raw = dict(raw.get("scaling") or {})
    _known(scaling_raw, _SCALING, f"{path}: scaling")
    scaling = Scaling(**scaling_raw)
    if scaling.num_workers < 1 or scaling.concurrency < 1 or scaling.cpus_per_worker <= 0:
        raise ConfigError(f"{path}: scaling.num_workers and concurrency must be >= 1, cpus_per_worker > 0")
    if scaling.gpus_per_worker is not None:
        if not scaling.use_gpu:
            raise ConfigError(f"{path}: scaling.gpus_per_worker needs scaling.use_gpu: true")
        if not 0 < scaling.gpus_per_worker <= 1:
            raise ConfigError(f"{path}: scaling.gpus_per_worker must be in (0, 1] (a fraction shares a GPU), "
                              f"got {scaling.gpus_per_worker}")
    published = _resolve(folder, raw.get("published") or "published.yaml")
    compare_with = tuple(raw.get("compare_with") or ())
    return TableSpec(
        name=name, path=path, tracks=tracks, dataset=dataset, methods=methods, baselines=tuple(baselines),
        folds=folds, shots=shots, seeds=seeds, reference_types=references, data=data, encoders=encoders,
        training=training, evaluation=evaluation, robustness=robustness, scaling=scaling, published=str(published),
        compare_with=compare_with, evaluate_untrained=bool(raw.get("evaluate_untrained", False)),
        description=str(raw.get("description") or "").strip(), experiment=str(raw.get("experiment") or f"benchmark-{name}"),
        raw=raw,
    )


def _encoders(raw: dict[str, Any], path: str, folder: Path) -> dict[str, EncoderSpec]:
    from refseg_models.encoders import available_encoders
    from refseg_models.encoders.sam_proxy import PROXY_ENCODER

    _known(raw, ("sam", "backbone"), f"{path}: encoders")
    defaults = {"sam": {"encoder": PROXY_ENCODER}, "backbone": {"encoder": "mobilenet_v2"}}
    out = {}
    for role in ("sam", "backbone"):
        entry = {**defaults[role], **(raw.get(role) or {})}
        _known(entry, _ENCODER, f"{path}: encoders.{role}")
        if entry["encoder"] not in available_encoders():
            raise ConfigError(f"{path}: encoders.{role}: unknown encoder {entry['encoder']!r}; "
                              f"available: {', '.join(available_encoders())}")
        if entry.get("precision", "float32") not in PRECISIONS:
            raise ConfigError(f"{path}: encoders.{role}.precision must be one of {PRECISIONS}")
        out[role] = EncoderSpec(entry["encoder"], _resolve(folder, entry.get("checkpoint")), _resolve(folder, entry.get("store")),
                                entry.get("precision", "float32"))
    if out["backbone"].checkpoint is None:
        raise ConfigError(f"{path}: encoders.backbone.checkpoint is required (the backbone's weights file)")
    if out["sam"].encoder != PROXY_ENCODER and out["sam"].checkpoint is None:
        raise ConfigError(f"{path}: encoders.sam.checkpoint is required for {out['sam'].encoder} "
                          "(only the proxy SAM ships with refseg)")
    return out


def load_table(path: str | Path, environ: dict[str, str] | None = None) -> TableSpec:
    """Read and validate a table file (YAML; JSON is YAML too)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"table file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from error
    return parse_table(raw, str(path), path.resolve().parent, environ)
