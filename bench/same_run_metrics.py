"""Did a change move any number? Compare the fold runs of two MLflow stores metric by metric.

A refactor must leave training bit-identical for the same seed. Run the same training commands once
on the old code and once on the new (each with its own ``--root``), then

    python bench/same_run_metrics.py OLD_ROOT/mlflow.db NEW_ROOT/mlflow.db

prints, per fold run (matched by run name and fold), ``IDENTICAL`` when every metric has the same
value at every step, else the metrics that differ. Timing and memory metrics (``time/``,
``memory/``) are left out: they differ from run to run. Exit status 1 when anything differs or a run
is missing on one side.
"""

from __future__ import annotations

import argparse
import sys

SKIPPED_PREFIXES = ("time/", "memory/")


def fold_metrics(db: str) -> dict[str, dict[str, list[tuple[int, float | str]]]]:
    """{"<run name> fold <k>": {metric: [(step, value)]}} of every fold run of the sqlite store ``db``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    out: dict[str, dict[str, list[tuple[int, float | str]]]] = {}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], "tags.`refseg.kind` = 'fold'"):
            key = f"{run.data.tags.get('refseg.run_name')} fold {run.data.params.get('fold')}"
            # NaN (e.g. FB-IoU of no validation episode) as a string: equal to itself
            out[key] = {name: sorted((m.step, "nan" if m.value != m.value else m.value)
                                     for m in client.get_metric_history(run.info.run_id, name))
                        for name in run.data.metrics if not name.startswith(SKIPPED_PREFIXES)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the old code's mlflow.db")
    parser.add_argument("after", help="the new code's mlflow.db")
    args = parser.parse_args(argv)
    before, after = fold_metrics(args.before), fold_metrics(args.after)
    same = True
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after:
            print(f"{key}: only in {'after' if key not in before else 'before'}")
            same = False
            continue
        differ = sorted(name for name in set(before[key]) | set(after[key]) if before[key].get(name) != after[key].get(name))
        print(f"{key}: " + ("IDENTICAL (every metric, every step)" if not differ else f"DIFFERENT: {', '.join(differ)}"))
        same = same and not differ
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
