"""``refseg compare``: a methods x folds table from MLflow (markdown + CSV) and a bar plot.

One row per configuration (method, shot, annotation type, recipe...; the parent run name without
its seed), one column per fold, plus the mean over folds and FB-IoU. When several seeds of a
configuration ran, each cell is mean +- std over the seeds (published reproductions of these
methods miss the papers by 5-13 mIoU; the seed spread says how much of that is noise).
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

_SEED = re.compile(r"-s(\d+)-")


def _configuration(row: dict[str, Any]) -> tuple[str, str]:
    """(configuration label, seed) of a fold run, from its params."""
    params = row["params"]
    method = params.get("method", "?")
    shot = params.get("shot", "?")
    annotation = params.get("annotation_type", "?")
    recipe = params.get("recipe_overrides", "{}")
    seed_match = _SEED.search(row["run_name"])
    seed = seed_match.group(1) if seed_match else "?"
    label = f"{method} ({shot}-shot, {annotation})"
    if recipe not in ("{}", ""):
        label += f" {recipe}"
    return label, seed


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = _mean_std(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {std:.2f}"


def compare_table(rows: list[dict[str, Any]], metric: str = "test_miou") -> dict[str, Any]:
    """{"folds": [...], "rows": [{"configuration", "seeds", "folds": {fold: [values]}, "mean": [...], "fbiou": [...]}]}."""
    by_config: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    fb: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if metric not in row["metrics"]:
            continue
        label, seed = _configuration(row)
        by_config[label][seed][row["fold"]] = row["metrics"][metric]
        if "test_fbiou" in row["metrics"]:
            fb[label][seed][row["fold"]] = row["metrics"]["test_fbiou"]
    if not by_config:
        raise ConfigError(f"no finished fold run with {metric!r} to compare")
    folds = sorted({fold for seeds in by_config.values() for per_fold in seeds.values() for fold in per_fold})
    table = []
    for label in sorted(by_config):
        seeds = by_config[label]
        per_fold = {fold: [s[fold] for s in seeds.values() if fold in s] for fold in folds}
        complete = [s for s in seeds.values() if all(f in s for f in folds)]
        means = [sum(s[f] for f in folds) / len(folds) for s in complete]
        fb_means = [sum(fb[label][seed][f] for f in folds) / len(folds) for seed, s in seeds.items()
                    if s in complete and all(f in fb[label][seed] for f in folds)]
        table.append({"configuration": label, "seeds": sorted(seeds), "folds": per_fold, "mean": means, "fbiou": fb_means})
    return {"folds": folds, "metric": metric, "rows": table}


def to_markdown(table: dict[str, Any]) -> str:
    folds = table["folds"]
    head = ["configuration", "seeds", *[f"fold {f}" for f in folds], "mean", "FB-IoU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        cells = [row["configuration"], str(len(row["seeds"])), *[_cell(row["folds"][f]) for f in folds],
                 _cell(row["mean"]), _cell(row["fbiou"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(table: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``compare.md``, ``compare.csv`` and ``compare.png`` (bars: mean over seeds per fold, std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "compare.md", "csv": out / "compare.csv", "plot": out / "compare.png"}
    paths["markdown"].write_text(to_markdown(table) + "\n")
    folds = table["folds"]
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["configuration", "seeds", *[f"fold{f}_mean" for f in folds], *[f"fold{f}_std" for f in folds],
                         "mean", "mean_std", "fbiou"])
        for row in table["rows"]:
            stats = [_mean_std(row["folds"][f]) if row["folds"][f] else (float("nan"), float("nan")) for f in folds]
            mean = _mean_std(row["mean"]) if row["mean"] else (float("nan"), float("nan"))
            fbiou = _mean_std(row["fbiou"])[0] if row["fbiou"] else float("nan")
            writer.writerow([row["configuration"], len(row["seeds"]), *[s[0] for s in stats], *[s[1] for s in stats],
                             mean[0], mean[1], fbiou])
    groups = [*[f"fold {f}" for f in folds], "mean"]
    width = 0.8 / max(len(table["rows"]), 1)
    figure, axis = plt.subplots(figsize=(1.6 * len(groups) + 2, 4))
    for index, row in enumerate(table["rows"]):
        series = [row["folds"][f] for f in folds] + [row["mean"]]
        heights = [_mean_std(v)[0] if v else 0.0 for v in series]
        errors = [_mean_std(v)[1] if v else 0.0 for v in series]
        positions = [g + (index - (len(table["rows"]) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, heights, width, yerr=errors, capsize=3, label=row["configuration"])
    axis.set_xticks(range(len(groups)), groups)
    axis.set_ylabel(f"{table['metric']} (%)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths["plot"], dpi=120)
    plt.close(figure)
    return paths


def run_compare(experiment: str, tracking_uri: str | None, out_dir: str, run_names: list[str] | None = None,
                metric: str = "test_miou") -> str:
    from pipeline.training import tracking

    uri = tracking_uri or tracking.default_tracking_uri()
    tracking.check_reachable(uri)
    table = compare_table(tracking.search_fold_runs(uri, experiment, run_names), metric)
    paths = write_outputs(table, out_dir)
    text = to_markdown(table)
    return f"{text}\n\nwritten: {', '.join(str(p) for p in paths.values())}"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("compare", help="methods x folds table (markdown, CSV, bar plot) from MLflow")
    parser.add_argument("--experiment", default="coco20i")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db")
    parser.add_argument("--run-name", action="append", help="only these training runs (repeatable)")
    parser.add_argument("--metric", default="test_miou")
    parser.add_argument("--out-dir", default="outputs/compare")
    parser.set_defaults(handler=lambda args: print(run_compare(args.experiment, args.tracking_uri, args.out_dir, args.run_name, args.metric)))
