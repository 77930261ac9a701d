"""What MLflow holds of a table's cells: the record the table is made from (MLflow is the record).

A training cell is finished when its fold run (the training job's child run of its configuration,
tags ``refseg.run_name`` = the cell's run name and ``refseg.fold``) is FINISHED with ``test_miou``:
the training job's own rule for skipping a fold. An evaluation cell is finished when its run (tags
``refseg.kind = evaluation`` and ``refseg.cell`` = its identity) is FINISHED with ``test_miou``.

Tags written by the benchmark: ``refseg.benchmark`` (the table's name) on every cell run, its
configuration's parent run and the registered model version; ``refseg.cell`` (the cell's key);
``mlflow.parentRunId`` of each configuration's parent run = the benchmark's run (so the MLflow UI
nests benchmark -> configuration -> fold). Metrics written by the benchmark on a fold run:
``cost/*`` (docs/benchmark.md) and ``test_episodes_evaluated`` / ``test_episodes_failed``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from pipeline.benchmark.cells import EvaluationCell, TrainingCell
from pipeline.training import tracking

TAG_BENCHMARK, TAG_CELL, TAG_PROTOCOL = "refseg.benchmark", "refseg.cell", "refseg.protocol"
KIND_BENCHMARK, KIND_EVALUATION = "benchmark", "evaluation"
NOISE_METRIC = "robustness/prompt_noise_iou"
NOISE_STEP_SCALE = 100  # a noise scale s is logged at step round(100 * s): MLflow steps are integers
NO_FOLD = -1  # the fold of a record that has none (a training-free method on FSS-1000's test split)


@dataclass
class CellRecord:
    """One finished (or not) cell as MLflow has it."""

    key: str
    kind: str  # "trained" | "training-free" | "untrained"
    method: str
    protocol: str  # "unseen" | "fss1000" | "coco2pascal"
    dataset: str  # the test dataset
    fold: int | None
    shot: int
    reference: str
    seed: int | None
    run_id: str | None = None
    status: str = "not run"
    miou: float | None = None
    fbiou: float | None = None
    episodes: int | None = None
    failed: int | None = None
    cost: dict[str, float] = field(default_factory=dict)
    frozen: dict[str, str] = field(default_factory=dict)
    test_protocol: str = ""
    model_uri: str | None = None
    episode_set: str = ""  # what decides the test episodes (baselines' values are shared across cells)
    curve: list[tuple[float, float]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status == "FINISHED" and self.miou is not None


def fold_run(uri: str, experiment_id: str, cell: TrainingCell) -> dict[str, Any] | None:
    found = tracking.find_runs(uri, experiment_id, {tracking.TAG_KIND: tracking.CHILD, tracking.TAG_RUN: cell.run_name,
                                                    tracking.TAG_FOLD: str(cell.fold)})
    return found[0] if found else None


def training_finished(uri: str, experiment_id: str, cell: TrainingCell) -> dict[str, Any] | None:
    """The cell's fold run if it is finished (the training job's rule), else None."""
    run = fold_run(uri, experiment_id, cell)
    return run if run is not None and run["status"] == "FINISHED" and "test_miou" in run["metrics"] else None


def evaluation_run(uri: str, experiment_id: str, cell: EvaluationCell) -> dict[str, Any] | None:
    found = tracking.find_runs(uri, experiment_id, {tracking.TAG_KIND: KIND_EVALUATION, TAG_CELL: cell.identity})
    return found[0] if found else None


def _frozen(tags: dict[str, str]) -> dict[str, str]:
    return {key.split(".")[-1]: value for key, value in tags.items() if key.startswith("refseg.frozen.")}


def _episode_set(cfg: Any) -> str:
    return "|".join(str(getattr(cfg, key)) for key in ("dataset", "feature_dataset", "fold", "shot", "annotation_type",
                                                       "lists_dir", "test_seed", "test_episodes", "eval_size", "crowd"))


def training_records(uri: str, experiment_id: str, cell: TrainingCell) -> list[CellRecord]:
    """The trained row of a training cell, and the rows measured in it on the same episodes (the
    model untrained, the baselines)."""
    cfg = cell.config
    common = dict(protocol="unseen", dataset=cell.dataset, fold=cell.fold, shot=cell.shot, reference=cell.reference)
    trained = CellRecord(cell.key, "trained", cell.method, seed=cell.seed, episode_set=_episode_set(cfg), **common)
    run = fold_run(uri, experiment_id, cell)
    if run is None:
        return [trained]
    metrics, tags = run["metrics"], run["tags"]
    trained.run_id, trained.status = run["run_id"], run["status"]
    trained.miou, trained.fbiou = metrics.get("test_miou"), metrics.get("test_fbiou")
    trained.episodes = _int(metrics.get("test_episodes_evaluated"))
    trained.failed = _int(metrics.get("test_episodes_failed"))
    trained.cost = {k[len("cost/"):]: v for k, v in metrics.items() if k.startswith("cost/")}
    trained.frozen, trained.test_protocol = _frozen(tags), tags.get("refseg.test_protocol", "")
    trained.model_uri = tags.get(tracking.TAG_MODEL)
    trained.curve = [(step / NOISE_STEP_SCALE, value) for step, value in tracking.metric_history(uri, run["run_id"], NOISE_METRIC)]
    out = [trained]
    if "test_untrained_miou" in metrics:
        out.append(CellRecord(cell.key, "untrained", cell.method, seed=cell.seed, run_id=run["run_id"], status=run["status"],
                              miou=metrics["test_untrained_miou"], fbiou=metrics.get("test_untrained_fbiou"),
                              episodes=trained.episodes, failed=trained.failed, frozen=trained.frozen,
                              test_protocol=trained.test_protocol, episode_set=trained.episode_set, **common))
    for baseline in cfg.baselines:
        value = metrics.get(f"test_{baseline}_miou")
        if value is not None:
            out.append(CellRecord(f"{baseline} on the episodes of {cell.key}", "training-free", baseline, seed=None,
                                  run_id=run["run_id"], status=run["status"], miou=value, episodes=trained.episodes,
                                  failed=trained.failed, frozen=trained.frozen, test_protocol=trained.test_protocol,
                                  episode_set=trained.episode_set, **common))
    return out


def evaluation_record(uri: str, experiment_id: str, cell: EvaluationCell) -> CellRecord:
    dataset = "fss1000" if cell.protocol == "fss1000" else "pascal5i"
    record = CellRecord(cell.key, "trained" if cell.trained else "training-free", cell.method, cell.protocol, dataset,
                        NO_FOLD if cell.fold is None else cell.fold, cell.shot, cell.reference, cell.seed, episode_set=cell.identity.rsplit("|", 1)[0])
    run = evaluation_run(uri, experiment_id, cell)
    if run is None:
        return record
    metrics, tags = run["metrics"], run["tags"]
    record.run_id, record.status = run["run_id"], run["status"]
    record.miou, record.fbiou = metrics.get("test_miou"), metrics.get("test_fbiou")
    record.episodes, record.failed = _int(metrics.get("test_episodes_evaluated")), _int(metrics.get("test_episodes_failed"))
    record.cost = {k[len("cost/"):]: v for k, v in metrics.items() if k.startswith("cost/")}
    record.frozen, record.test_protocol = _frozen(tags), tags.get("refseg.test_protocol", "")
    return record


def median_step_s(uri: str, run_id: str) -> float | None:
    history = [value for _, value in tracking.metric_history(uri, run_id, "time/step_s")]
    return statistics.median(history) if history else None


def _int(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def models_query(name: str) -> str:
    """The MLflow query that lists the table's registered models (one version per method, protocol,
    fold and seed; tags refseg.fold, refseg.seed, refseg.method, refseg.cell)."""
    return f"tags.`{TAG_BENCHMARK}` = '{name}'"
