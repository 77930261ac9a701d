"""``refseg benchmark TABLE`` (also ``python jobs/benchmark.py TABLE``, and under ``ray job submit``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("table", help="the table file (benchmarks/*.yaml; docs/benchmark.md)")
    parser.add_argument("--plan", action="store_true",
                        help="print the cells (done / to run), the stores they need (and which exist) and an estimate of "
                             "device-hours and disk, then stop: nothing runs")
    parser.add_argument("--root", help="where stores, checkpoints, the MLflow store and the table go (default REFSEG_ROOT, else the "
                                       "working directory; required under `ray job submit --working-dir`)")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db")
    parser.add_argument("--ray-address", help="default: RAY_ADDRESS (ray job submit) or an embedded local Ray")
    parser.add_argument("--cells", action="store_true", help="with --plan: also print each training cell's command line")
    parser.add_argument("--models", action="store_true",
                        help="print the table's registered models (one MLflow query: method, protocol, fold, seed -> models:/...) "
                             "and stop")


def main(args: argparse.Namespace) -> int:
    from pipeline.benchmark.runner import plan, prepare, run
    from pipeline.benchmark.table import to_markdown

    bench = prepare(args.table, args.root, args.tracking_uri)
    if args.models:
        print(format_models(bench))
        return 0
    text, _ = plan(bench)
    print(text, flush=True)
    if args.plan:
        if args.cells:
            for cell in bench.cells.training:
                print(f"# {cell.key}\n{cell.command()}")
        return 0
    import ray

    result = run(bench, args.ray_address)
    if ray.is_initialized():
        ray.shutdown()  # no worker log line after the table
    print(to_markdown(result["table"]), flush=True)
    print(f"written: {', '.join(str(p) for p in result['paths'].values())}; MLflow benchmark run {result['benchmark_run']}",
          flush=True)
    return 0


def format_models(bench: Any) -> str:
    """The table's registered models, one line each (the query is printed first: it is the whole lookup)."""
    from pipeline.benchmark.records import models_query
    from pipeline.benchmark.runner import existing_experiment
    from pipeline.training import tracking

    query = models_query(bench.spec.name)
    lines = [f"MlflowClient({bench.uri!r}).search_model_versions(\"{query}\"):"]
    models = tracking.model_versions(bench.uri, query) if existing_experiment(bench.uri, bench.spec.experiment) else []
    for model in sorted(models, key=lambda m: (m["tags"].get("refseg.method", ""), m["tags"].get("refseg.fold", ""),
                                                m["tags"].get("refseg.seed", ""), m["name"])):
        tags = model["tags"]
        lines.append(f"  {tags.get('refseg.method', '?')} {tags.get('refseg.protocol', '?')} fold {tags.get('refseg.fold', '?')} "
                     f"seed {tags.get('refseg.seed', '?')} ({tags.get('refseg.cell', '')}): {model['uri']}")
    if not models:
        lines.append("  (none registered yet)")
    return "\n".join(lines)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("benchmark", help="run a declared results table (cells, baselines, papers' numbers, costs)")
    add_arguments(parser)
    parser.set_defaults(handler=main)
