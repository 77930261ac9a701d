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


def main(args: argparse.Namespace) -> int:
    from pipeline.benchmark.runner import plan, prepare, run
    from pipeline.benchmark.table import to_markdown

    bench = prepare(args.table, args.root, args.tracking_uri)
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


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("benchmark", help="run a declared results table (cells, baselines, papers' numbers, costs)")
    add_arguments(parser)
    parser.set_defaults(handler=main)
