"""``refseg benchmark``: validate a table, plan it, run its cells (skipping finished ones), and make
its results table from what MLflow recorded.

Order of work: everything is checked before anything runs (the table, its data, the published
numbers, every cell's ``TrainConfig``, the tracking URI); then the stores are extracted once per
encoder (those missing); then the training cells, one after the other (``scaling.concurrency`` > 1:
that many at once, each a Ray task driving its own Ray Train run, e.g. with fractional
``gpus_per_worker`` so several share a GPU); then the noise curves and the evaluation cells; then
the table. A killed benchmark resumes when run again: finished cells are found in MLflow and
skipped, an interrupted training cell resumes from its last checkpoint (the training job's resume),
an interrupted evaluation or curve cell runs again.

MLflow layout (docs/benchmark.md): one run per table (``refseg.kind = benchmark``, run name = the
table's name) in the table's experiment; under it each training configuration's parent run (the
training job's, re-parented with ``mlflow.parentRunId``), under those the fold runs (the cells), and
the evaluation cells' runs. The table's files (markdown, CSV, PNG, models.csv, cells.json) are
artifacts of the benchmark run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.benchmark import records
from pipeline.benchmark.cells import Cells, CurveCell, EvaluationCell, TrainingCell, expand_cells
from pipeline.benchmark.estimates import Estimate, estimate
from pipeline.benchmark.published import PublishedNumbers, load_published
from pipeline.benchmark.spec import TableSpec, load_table
from pipeline.benchmark.stores import StoreNeed, stores_needed
from pipeline.errors import ConfigError, DataError
from pipeline.locations import Root, check_durable, resolve_root
from pipeline.training import tracking


@dataclass
class Benchmark:
    """A validated table, its cells and where its records go."""

    spec: TableSpec
    cells: Cells
    published: PublishedNumbers
    root: Root
    uri: str

    @property
    def out_dir(self) -> str:
        return self.root.join("outputs", "benchmark", self.spec.name)


def prepare(table: str | Path, root: str | None = None, tracking_uri: str | None = None) -> Benchmark:
    """Read and check everything a table needs, before anything runs (one line per problem)."""
    spec = load_table(table)
    spec.check_data()
    published = load_published(spec.published)
    known = published.by_id()
    for wanted in spec.compare_with:
        if wanted not in known:
            raise ConfigError(f"{spec.path}: compare_with names {wanted!r}, which is not an id of {published.path}")
    resolved = resolve_root(root)
    cells = expand_cells(spec, resolved.location)
    for cell in cells.training:
        cell.configs  # noqa: B018 - builds and validates each TrainConfig now (the training job's own checks)
    if "coco2pascal" in spec.tracks:
        from pipeline.benchmark.coco2pascal import load_folds

        load_folds()
    uri = tracking_uri or tracking.default_tracking_uri(resolved)
    check_durable({"the benchmark's output folder": resolved.join("outputs", "benchmark", spec.name), "the MLflow store": uri,
                   **{f"the {need.role} feature store": need.uri for need in stores_needed(cells.training)}})
    return Benchmark(spec, cells, published, resolved, uri)


def _mlflow_exists(uri: str) -> bool:
    """Whether there is a record to read (a local sqlite store not created yet has none)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).is_file()
    return True


def existing_experiment(uri: str, name: str) -> str | None:
    """The id of experiment ``name`` if the record exists and has it (never creates a store)."""
    if not _mlflow_exists(uri):
        return None
    return tracking.find_experiment(uri, name)


# -- the plan -------------------------------------------------------------------------------------

def plan(bench: Benchmark) -> tuple[str, Estimate]:
    """The printed plan: cells (done / to do), the stores they need (and which exist), and an
    estimate of device-hours and disk from measured rates only."""
    spec, cells, uri = bench.spec, bench.cells, bench.uri
    experiment_id = existing_experiment(uri, spec.experiment)
    stores = stores_needed(cells.training)
    done: dict[str, dict[str, Any]] = {}
    walls: dict[str, list[float]] = {}
    if experiment_id is not None:
        for cell in cells.training:
            run = records.training_finished(uri, experiment_id, cell)
            if run is not None:
                done[cell.key] = run
                if "cost/wall_s" in run["metrics"]:
                    walls.setdefault(cell.method, []).append(run["metrics"]["cost/wall_s"])
    todo = tuple(c for c in cells.training if c.key not in done)
    result = estimate(todo, stores, walls)
    n = len(cells.training)
    lines = [f"refseg benchmark: table {spec.name} ({spec.path}, spec {spec.digest})"]
    if spec.description:
        lines.append(f"  {spec.description}")
    lines.append(
        f"  tracks {', '.join(spec.tracks)}; trained on {spec.dataset}: {len(spec.methods)} method(s) x {len(spec.folds)} fold(s) x "
        f"{len(spec.shots)} shot(s) x {len(spec.reference_types)} reference type(s) x {len(spec.seeds)} seed(s) = {n} training "
        f"cell(s) ({len(done)} finished); {len(cells.evaluation)} evaluation cell(s); {len(cells.curves)} noise curve(s)")
    if spec.baselines:
        lines.append(f"  training-free baselines on each training cell's test episodes: {', '.join(spec.baselines)}")
    lines.append(f"  MLflow {uri}, experiment {spec.experiment}; outputs {bench.out_dir}")
    lines.append("stores (one extraction per encoder; every cell reads these):")
    for need, guess in zip(stores, result.stores):
        size = f", {guess.bytes / 1e9:.2f} GB" if guess.bytes else ""
        cost = need.cost()
        if cost is not None:
            state = f"finished ({cost.images} images{size}, extracted in {cost.extract_s / 60:.1f} min: sum of its shard times)"
        else:
            hours = f"; extraction ~{guess.extract_hours:.2f} h ({guess.source})" if guess.extract_hours else f" ({guess.source})"
            state = f"{need.state}: extracted first{size and ', ~' + size[2:]}{hours}"
        lines.append(f"  {need.role:8s} {need.encoder}: {need.uri}: {state}; read by {need.cells} cell(s)")
    lines.append("cells:")
    for cell in cells.training:
        run = done.get(cell.key)
        state = f"finished (MLflow run {run['run_id']})" if run else "to run"
        lines.append(f"  [{'x' if run else ' '}] {cell.key}: run {cell.run_name} fold {cell.fold}: {state}")
    for ecell in cells.evaluation:
        lines.append(f"  [ ] evaluation {ecell.key}")
    for curve in cells.curves:
        lines.append(f"  [ ] {curve.key}")
    lines.append("estimate (measured rates only; each names its source):")
    for item in result.cells:
        episodes = (f"{item.train_episodes:,} training episodes each (mean)" if item.train_episodes is not None
                    else "training episodes unknown")
        hours = f"~{item.hours_per_cell:.3f} {item.device}-h each, ~{item.hours_per_cell * item.cells:.2f} {item.device}-h" \
            if item.hours_per_cell is not None else "no estimate"
        lines.append(f"  {item.method}: {item.cells} cell(s) to run, {episodes}: {hours} ({item.source})")
    device = "GPU" if spec.scaling.use_gpu else "CPU"
    lines.append(f"  total: ~{result.device_hours:.2f} device-hours known ({device}; the cells without a rate are not in it), "
                 f"disk ~{result.disk_bytes / 1e9:.2f} GB for the stores (+ checkpoints and MLflow artifacts, small)")
    if spec.scaling.concurrency > 1:
        lines.append(f"  {spec.scaling.concurrency} cells at once"
                     + (f", {spec.scaling.gpus_per_worker} GPU per worker" if spec.scaling.gpus_per_worker else ""))
    return "\n".join(lines), result


# -- running --------------------------------------------------------------------------------------

def _train_cell(cell: TrainingCell, uri: str) -> float:
    """Run (or resume) one training cell through the training job; returns the wall seconds."""
    from pipeline.training.job import run_training

    cfg, options = cell.configs
    started = time.perf_counter()
    run_training(cfg, dataclasses.replace(options, tracking_uri=uri))
    return time.perf_counter() - started


def _cost_metrics(uri: str, run: dict[str, Any], cell: TrainingCell, wall_added: float | None) -> dict[str, float]:
    """``cost/*`` of a finished fold run: wall time (this benchmark's driver time on it, summed over
    invocations; a cell trained outside the benchmark: its run's start to end), CPU- and GPU-hours
    reserved (wall x workers x CPUs / GPUs per worker), training episodes/s of the loop's steps
    (global batch / median of data + step time), peak RSS of rank 0's worker."""
    metrics, cfg = run["metrics"], cell.config
    scaling = cell.spec.scaling
    if wall_added is not None:
        wall = metrics.get("cost/wall_s", 0.0) + wall_added
    elif "cost/wall_s" in metrics:
        wall = metrics["cost/wall_s"]
    else:
        wall = ((run["end_time"] or run["start_time"]) - run["start_time"]) / 1000.0
    gpus = (scaling.gpus_per_worker or 1.0) if scaling.use_gpu else 0.0
    out = {"cost/wall_s": wall, "cost/cpu_hours": wall * cfg.num_workers * cfg.cpus_per_worker / 3600,
           "cost/gpu_hours": wall * cfg.num_workers * gpus / 3600}
    step = [v for _, v in tracking.metric_history(uri, run["run_id"], "time/step_s")]
    data = [v for _, v in tracking.metric_history(uri, run["run_id"], "time/data_s")]
    if step:
        import statistics

        out["cost/train_episodes_per_s"] = cfg.recipe.batch_size / (statistics.median(step) + (statistics.median(data) if data else 0.0))
    peak = [v for _, v in tracking.metric_history(uri, run["run_id"], "memory/peak_rss_mb")]
    if peak:
        out["cost/peak_rss_mb"] = max(peak)
    results = tracking.read_artifact_json(uri, run["run_id"], "test/results.json") or {}
    manifest = metrics.get("data/test_episodes")
    if "episodes" in results:
        out["test_episodes_evaluated"] = float(results["episodes"])
        if manifest is not None:
            out["test_episodes_failed"] = float(manifest - results["episodes"])
    return out


def _record_training_cell(bench: Benchmark, experiment_id: str, benchmark_run: str, cell: TrainingCell,
                          wall_added: float | None) -> dict[str, Any]:
    uri, name = bench.uri, bench.spec.name
    run = records.training_finished(uri, experiment_id, cell)
    if run is None:
        raise DataError(f"cell {cell.key}: the training job returned but its fold run is not finished in MLflow")
    tags = {records.TAG_BENCHMARK: name, records.TAG_CELL: cell.key, records.TAG_PROTOCOL: "unseen"}
    tracking.set_tags(uri, run["run_id"], tags)
    parent = run["tags"].get("mlflow.parentRunId")
    if parent:
        tracking.set_tags(uri, parent, {records.TAG_BENCHMARK: name, "mlflow.parentRunId": benchmark_run})
    if wall_added is not None or "cost/wall_s" not in run["metrics"]:
        tracking.log_metrics(uri, run["run_id"], _cost_metrics(uri, run, cell, wall_added))
    model = run["tags"].get(tracking.TAG_MODEL)
    if model:
        tracking.set_model_version_tags(uri, model, tags)
    return run


def _run_training_cells(bench: Benchmark, experiment_id: str, benchmark_run: str,
                        ray_address: str | None = None) -> dict[str, dict[str, Any]]:
    """Every training cell finished (run here or found finished); {cell key: its fold run}."""
    uri, spec = bench.uri, bench.spec
    finished: dict[str, dict[str, Any]] = {}
    todo: list[TrainingCell] = []
    for cell in bench.cells.training:
        run = records.training_finished(uri, experiment_id, cell)
        if run is not None:
            print(f"cell {cell.key}: finished already (MLflow run {run['run_id']}, test mIoU {run['metrics']['test_miou']:.2f})",
                  flush=True)
            finished[cell.key] = _record_training_cell(bench, experiment_id, benchmark_run, cell, None)
        else:
            todo.append(cell)
    if todo:
        from pipeline.ray_session import init_ray

        init_ray(ray_address)
    if spec.scaling.concurrency == 1:
        for cell in todo:
            print(f"cell {cell.key}: training (or resuming) {cell.run_name} fold {cell.fold}", flush=True)
            started = time.perf_counter()
            try:
                _train_cell(cell, uri)
            except BaseException:
                run = records.fold_run(uri, experiment_id, cell)
                if run is not None:  # the driver time spent on it counts when it resumes
                    previous = run["metrics"].get("cost/wall_s", 0.0)
                    tracking.log_metrics(uri, run["run_id"], {"cost/wall_s": previous + time.perf_counter() - started})
                raise
            finished[cell.key] = _record_training_cell(bench, experiment_id, benchmark_run, cell, time.perf_counter() - started)
        return finished
    import ray

    remote = ray.remote(num_cpus=0)(_train_cell)  # the cell's own Ray Train workers hold its resources
    pending: dict[Any, TrainingCell] = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < spec.scaling.concurrency:
            cell = queue.pop(0)
            print(f"cell {cell.key}: training (or resuming) {cell.run_name} fold {cell.fold} as a Ray task", flush=True)
            pending[remote.remote(cell, uri)] = cell
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            cell = pending.pop(ref)
            finished[cell.key] = _record_training_cell(bench, experiment_id, benchmark_run, cell, ray.get(ref))
    return finished


def _run_curves(bench: Benchmark, fold_runs: dict[str, dict[str, Any]], ray_address: str | None = None) -> None:
    import ray

    from pipeline.benchmark.robustness import noise_curve
    from pipeline.ray_session import init_ray

    spec, uri = bench.spec, bench.uri
    scales = list(spec.noise_scales())
    wanted = {round(s * records.NOISE_STEP_SCALE) for s in scales}
    remote = ray.remote(num_cpus=spec.scaling.cpus_per_worker)(noise_curve)
    for curve in bench.cells.curves:
        run = fold_runs[curve.trained.key]
        logged = {step for step, _ in tracking.metric_history(uri, run["run_id"], records.NOISE_METRIC)}
        if wanted <= logged:
            print(f"{curve.key}: finished already", flush=True)
            continue
        model = run["tags"].get(tracking.TAG_MODEL)
        if not model:
            raise DataError(f"{curve.key}: its fold run {run['run_id']} registered no model")
        print(f"{curve.key}: measuring at noise scales {scales}", flush=True)
        init_ray(ray_address)
        started = time.perf_counter()
        points = ray.get(remote.remote(curve.trained.config.to_dict(), model, uri, scales,
                                       bool(spec.robustness.get("relative", True)), spec.robustness.get("episodes"),
                                       curve.trained.config.recipe.batch_size))
        for scale, value, episodes in points:
            tracking.log_metrics(uri, run["run_id"], {records.NOISE_METRIC: value, "robustness/prompt_noise_episodes": episodes},
                                 step=round(scale * records.NOISE_STEP_SCALE))
        tracking.log_metrics(uri, run["run_id"], {"cost/noise_curve_s": time.perf_counter() - started})


def _run_evaluations(bench: Benchmark, experiment_id: str, benchmark_run: str, fold_runs: dict[str, dict[str, Any]]) -> None:
    from pipeline.benchmark.evaluation import run_evaluation_cell

    for cell in bench.cells.evaluation:
        run = records.evaluation_run(bench.uri, experiment_id, cell)
        if run is not None and run["status"] == "FINISHED" and "test_miou" in run["metrics"]:
            print(f"evaluation {cell.key}: finished already (MLflow run {run['run_id']})", flush=True)
            continue
        print(f"evaluation {cell.key}: running", flush=True)
        trained = fold_runs[cell.trained.key] if cell.trained is not None else None
        run_evaluation_cell(cell, bench.uri, experiment_id, benchmark_run, bench.root.location, trained)


def _ensure_stores(bench: Benchmark, benchmark_run: str) -> list[StoreNeed]:
    """Extract the missing stores (once per encoder), then log every store's extraction cost."""
    from pipeline.training.job import prepare_stores

    from pipeline.training.features import store_exists

    needs = stores_needed(bench.cells.training)
    missing = [need for need in needs if not need.finished]
    for need in missing:
        print(f"store {need.uri} ({need.role}, {need.encoder}) {need.state}: extracted once, for every cell", flush=True)
    for need in missing:
        if not store_exists(need.uri):  # one call extracts every missing store of that cell's configuration
            prepare_stores(need.example.config, True, bench.spec.scaling.extraction_workers)
    needs = stores_needed(bench.cells.training)
    for need in needs:
        cost = need.cost()
        if cost is not None:
            tracking.log_metrics(bench.uri, benchmark_run, {f"store/{need.role}/extract_s": cost.extract_s,
                                                            f"store/{need.role}/bytes": cost.bytes,
                                                            f"store/{need.role}/images": cost.images})
            tracking.set_tags(bench.uri, benchmark_run, {f"refseg.store.{need.role}": need.uri})
    return needs


def run(bench: Benchmark, ray_address: str | None = None) -> dict[str, Any]:
    """Run every unfinished cell of the table, then write its table; returns the table's summary."""
    from pipeline.benchmark.table import build_table, write_outputs
    from pipeline.store.version import code_version

    spec, uri = bench.spec, bench.uri
    tracking.check_reachable(uri)
    experiment_id = tracking.ensure_experiment(uri, spec.experiment, ["test_miou", "test_fbiou", "cost/wall_s"])
    benchmark_run, _ = tracking.find_or_create_run(
        uri, experiment_id, spec.name, {tracking.TAG_KIND: records.KIND_BENCHMARK, records.TAG_BENCHMARK: spec.name},
        {"table_file": spec.path, "tracks": ",".join(spec.tracks), "methods": ",".join(spec.methods)},
    )
    tracking.set_running(uri, benchmark_run)
    tracking.set_tags(uri, benchmark_run, {"refseg.benchmark.spec": spec.digest, "refseg.code_version": code_version()})
    print(f"benchmark {spec.name}: MLflow run {benchmark_run} (experiment {spec.experiment}, {uri})", flush=True)
    with tracking.ended_with_the_driver(uri, [benchmark_run]):
        needs = _ensure_stores(bench, benchmark_run)
        fold_runs = _run_training_cells(bench, experiment_id, benchmark_run, ray_address)  # Ray starts only if a cell runs
        if bench.cells.curves:
            _run_curves(bench, fold_runs, ray_address)
        _run_evaluations(bench, experiment_id, benchmark_run, fold_runs)
        table = build_table(bench, experiment_id, needs)
        paths = write_outputs(table, bench.out_dir)
        tracking.log_artifacts(uri, benchmark_run, bench.out_dir, "table")
        total = len(bench.cells)
        tracking.log_metrics(uri, benchmark_run, {"cells": total, "cells_finished": table.finished_cells})
    tracking.finish(uri, benchmark_run)
    return {"table": table, "paths": paths, "benchmark_run": benchmark_run, "experiment_id": experiment_id}


def finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def dump_cells(cells: Cells) -> str:
    """The cells as JSON (key, identity, the command that reproduces a training cell)."""
    out = {"training": [{"key": c.key, "run_name": c.run_name, "fold": c.fold, "command": c.command()} for c in cells.training],
           "evaluation": [{"key": c.key, "identity": c.identity} for c in cells.evaluation],
           "curves": [{"key": c.key} for c in cells.curves]}
    return json.dumps(out, indent=1)


__all__ = ["Benchmark", "CurveCell", "EvaluationCell", "dump_cells", "plan", "prepare", "run"]
