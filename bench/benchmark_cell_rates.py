"""The measured cost of a finished benchmark table's cells, stored for ``refseg benchmark --plan``.

Reads a table's finished training cells from MLflow (``cost/wall_s`` and the rest, logged by the
benchmark) and prints one JSON object: per cell the method, training / validation / test episodes,
wall seconds, CPU- and GPU-hours, train episodes/s and peak RSS; per store its images, bytes and
extraction seconds (its shards' stats); with the command, commit and machine (``bench_output.provenance``). Committed as ``docs/measurements/benchmark_<table>_<device>.json``, it
is the rate ``--plan`` scales by training episodes for a method that has no finished cell yet on that
device (``pipeline/benchmark/estimates.py``).

    python bench/benchmark_cell_rates.py benchmarks/cpu_small.yaml --root outputs/bench --json docs/measurements/benchmark_cpu_small_cpu.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_output import emit, provenance  # noqa: E402

from pipeline.benchmark import records  # noqa: E402
from pipeline.benchmark.estimates import train_episodes  # noqa: E402
from pipeline.benchmark.runner import existing_experiment, prepare  # noqa: E402
from pipeline.benchmark.stores import stores_needed  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table")
    parser.add_argument("--root")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bench = prepare(args.table, args.root, args.tracking_uri)
    experiment_id = existing_experiment(bench.uri, bench.spec.experiment)
    if experiment_id is None:
        raise ConfigError(f"no MLflow experiment {bench.spec.experiment} at {bench.uri}: run the table first")
    cells = []
    for cell in bench.cells.training:
        run = records.training_finished(bench.uri, experiment_id, cell)
        if run is None or "cost/wall_s" not in run["metrics"]:
            continue
        cfg, metrics = cell.config, run["metrics"]
        cells.append({"cell": cell.key, "method": cell.method, "train_episodes": train_episodes(cell),
                      "val_episodes": int(metrics.get("data/val_episodes", 0)), "test_episodes": int(metrics.get("data/test_episodes", 0)),
                      "baselines": list(cfg.baselines), "num_workers": cfg.num_workers, "cpus_per_worker": cfg.cpus_per_worker,
                      "wall_s": metrics["cost/wall_s"], **{k[len("cost/"):]: v for k, v in metrics.items() if k.startswith("cost/") and k != "cost/wall_s"}})
    stores = []
    for need in stores_needed(bench.cells.training):
        cost = need.cost()
        if cost is not None:
            stores.append({"role": need.role, "encoder": need.encoder, "images": cost.images, "bytes": cost.bytes,
                           "extract_s": cost.extract_s, "workers": bench.spec.scaling.extraction_workers})
    device = "GPU" if bench.spec.scaling.use_gpu else "CPU"
    return emit({**provenance(), "table": bench.spec.name, "table_file": bench.spec.path, "device": device, "cells": cells,
                 "stores": stores}, args.json)


if __name__ == "__main__":
    sys.exit(main())
