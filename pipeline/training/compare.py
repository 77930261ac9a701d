"""``refseg compare``: a methods x folds table from MLflow (markdown + CSV) and a bar plot.

One row per configuration (method, shot, annotation type, recipe...; the parent run name without
its seed), one column per fold, plus the mean over folds and FB-IoU. Next to each trained
configuration, the rows measured on the same test episodes by the training job: the same model
before training (``--evaluate-untrained``) and the training-free baselines (``--baseline``), so a
trained method's gain over the start and over a method that needs no training is read off one
table. When several seeds of a configuration ran, each cell is mean +- std over the seeds (and the
plot has error bars); with one seed a cell is that value, without a spread (published reproductions
of these methods miss the papers by 5-13 mIoU; the seed spread says how much of that is noise).
The frozen encoders the numbers were measured with are printed under the table (the proxy SAM's
numbers are not comparable to SAM's).
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
TRAINED, UNTRAINED, TRAINING_FREE = "trained", "untrained", "training-free"
_KIND_ORDER = {TRAINED: 0, UNTRAINED: 1, TRAINING_FREE: 2}
# What decides a fold's test episodes (a training-free baseline's value is a function of them only).
_EPISODE_PARAMS = ("dataset", "feature_dataset", "shot", "annotation_type", "lists_dir", "test_seed", "test_episodes",
                   "eval_size", "crowd")


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


def _baselines(metrics: dict[str, float], metric: str) -> dict[str, float]:
    """{baseline method: value} of the ``test_<method>_miou`` metrics a fold run logged (mIoU only:
    the job logs no other metric of its baselines)."""
    if metric != "test_miou":
        return {}
    out = {}
    for key, value in metrics.items():
        if key.startswith("test_") and key.endswith("_miou") and key not in ("test_miou", "test_untrained_miou"):
            out[key[len("test_") : -len("_miou")]] = value
    return out


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
    """{"folds", "metric", "rows": [{"configuration", "kind", "seeds", "folds": {fold: [values]}, "mean": [...],
    "fbiou": [...]}], "frozen": {encoders text: [configurations]}}.

    ``seeds`` of a training-free row are its distinct test-episode sets (usually one: every trained
    configuration on the same episodes measured the same value)."""
    values: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    fb: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    frozen: dict[str, set[str]] = defaultdict(set)
    untrained_metric = metric.replace("test_", "test_untrained_", 1) if metric.startswith("test_") else None
    untrained_fb = "test_untrained_fbiou"
    for row in rows:
        metrics = row["metrics"]
        if metric not in metrics:
            continue
        label, seed = _configuration(row)
        fold = row["fold"]
        values[(label, TRAINED)][seed][fold] = metrics[metric]
        if "test_fbiou" in metrics:
            fb[(label, TRAINED)][seed][fold] = metrics["test_fbiou"]
        if untrained_metric in metrics:
            values[(label, UNTRAINED)][seed][fold] = metrics[untrained_metric]
            if untrained_fb in metrics:
                fb[(label, UNTRAINED)][seed][fold] = metrics[untrained_fb]
        episodes = "|".join(str(row["params"].get(key, "")) for key in _EPISODE_PARAMS)
        params = row["params"]
        for baseline, value in _baselines(metrics, metric).items():
            values[(f"{baseline} ({params.get('shot', '?')}-shot, {params.get('annotation_type', '?')})", TRAINING_FREE)][episodes][fold] = value
        tags = row.get("tags", {})
        encoders = "; ".join(f"{key.split('.')[-1]}: {value}" for key, value in sorted(tags.items()) if key.startswith("refseg.frozen."))
        frozen[encoders or "not recorded"].add(label)
    if not values:
        raise ConfigError(f"no finished fold run with {metric!r} to compare")
    folds = sorted({fold for seeds in values.values() for per_fold in seeds.values() for fold in per_fold})
    table = []
    for key in sorted(values, key=lambda k: (k[1] == TRAINING_FREE, k[0], _KIND_ORDER[k[1]])):
        label, kind = key
        seeds = values[key]
        per_fold = {fold: [s[fold] for s in seeds.values() if fold in s] for fold in folds}
        complete = {seed: s for seed, s in seeds.items() if all(f in s for f in folds)}
        means = [sum(s[f] for f in folds) / len(folds) for s in complete.values()]
        fb_means = [sum(fb[key][seed][f] for f in folds) / len(folds) for seed in complete
                    if all(f in fb[key][seed] for f in folds)]
        table.append({"configuration": label, "kind": kind, "seeds": sorted(seeds), "folds": per_fold, "mean": means,
                      "fbiou": fb_means})
    return {"folds": folds, "metric": metric, "rows": table,
            "frozen": {text: sorted(labels) for text, labels in sorted(frozen.items())}}


def title(table: dict[str, Any], experiment: str) -> str:
    return f"refseg compare: {table['metric']} (%) per fold on the test episodes, MLflow experiment {experiment!r}"


def notes(table: dict[str, Any]) -> list[str]:
    """The lines under the table: how cells read, and the frozen encoders behind the numbers (as the
    runs recorded them; the proxy SAM's entry says its numbers are not comparable to SAM's)."""
    lines = ["Cells: the value of the one seed, or mean ± std (sample) over seeds where several ran. 'untrained' rows: "
             "the trained configuration above them before its first step; 'training-free' rows: baselines the training "
             "jobs measured on the same test episodes (seeds = distinct episode sets)."]
    for text, labels in table["frozen"].items():
        lines.append(f"Frozen encoders of {', '.join(labels)}: {text}.")
    return lines


def to_markdown(table: dict[str, Any], experiment: str = "") -> str:
    folds = table["folds"]
    head = ["configuration", "kind", "seeds", *[f"fold {f}" for f in folds], "mean", "FB-IoU"]
    lines = [f"# {title(table, experiment)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        cells = [row["configuration"], row["kind"], str(len(row["seeds"])), *[_cell(row["folds"][f]) for f in folds],
                 _cell(row["mean"]), _cell(row["fbiou"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *notes(table)])


def _stats(values: list[float]) -> tuple[float, float | None]:
    """(mean, std); std None with fewer than two values (no spread to show)."""
    if not values:
        return float("nan"), None
    mean, std = _mean_std(values)
    return mean, std if len(values) > 1 else None


def write_outputs(table: dict[str, Any], out_dir: str | Path, experiment: str = "") -> dict[str, Path]:
    """``compare.md``, ``compare.csv`` and ``compare.png`` (bars: mean over seeds per fold; error bars,
    the std over seeds, only where several seeds ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "compare.md", "csv": out / "compare.csv", "plot": out / "compare.png"}
    paths["markdown"].write_text(to_markdown(table, experiment) + "\n")
    folds = table["folds"]
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["configuration", "kind", "seeds", *[f"fold{f}_mean" for f in folds], *[f"fold{f}_std" for f in folds],
                         "mean", "mean_std", "fbiou"])
        for row in table["rows"]:
            stats = [_stats(row["folds"][f]) for f in folds]
            mean = _stats(row["mean"])
            writer.writerow([row["configuration"], row["kind"], len(row["seeds"]), *[s[0] for s in stats],
                             *["" if s[1] is None else s[1] for s in stats], mean[0], "" if mean[1] is None else mean[1],
                             _stats(row["fbiou"])[0]])
    groups = [*[f"fold {f}" for f in folds], "mean"]
    width = 0.8 / max(len(table["rows"]), 1)
    figure, axis = plt.subplots(figsize=(1.8 * len(groups) + 4, 4.5))
    hatches = {TRAINED: "", UNTRAINED: "//", TRAINING_FREE: ".."}
    for index, row in enumerate(table["rows"]):
        series = [row["folds"][f] for f in folds] + [row["mean"]]
        stats = [_stats(v) for v in series]
        positions = [g + (index - (len(table["rows"]) - 1) / 2) * width for g in range(len(groups))]
        errors = [s[1] or 0.0 for s in stats]
        axis.bar(positions, [0.0 if math.isnan(s[0]) else s[0] for s in stats], width, hatch=hatches[row["kind"]],
                 yerr=errors if any(s[1] is not None for s in stats) else None, capsize=3,
                 label=f"{row['configuration']} [{row['kind']}]")
    axis.set_xticks(range(len(groups)), groups)
    axis.set_ylabel(f"{table['metric']} (%)")
    figure.suptitle(title(table, experiment), fontsize=10)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    if any("PROXY SAM" in text for text in table["frozen"]):
        figure.text(0.01, 0.01, "frozen SAM = the proxy SAM (docs/proxy_sam.md): not comparable to SAM's or the papers' numbers",
                    fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(paths["plot"], dpi=120)
    plt.close(figure)
    return paths


def run_compare(experiment: str, tracking_uri: str | None, out_dir: str, run_names: list[str] | None = None,
                metric: str = "test_miou", root: str | None = None) -> str:
    from pipeline.locations import resolve_root
    from pipeline.training import tracking

    uri = tracking_uri or tracking.default_tracking_uri(resolve_root(root))
    tracking.check_reachable(uri)
    table = compare_table(tracking.search_fold_runs(uri, experiment, run_names), metric)
    paths = write_outputs(table, out_dir, experiment)
    text = to_markdown(table, experiment)
    return f"{text}\n\nwritten: {', '.join(str(p) for p in paths.values())}"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("compare", help="methods x folds table (markdown, CSV, bar plot) from MLflow")
    parser.add_argument("--experiment", default="coco20i")
    parser.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db")
    parser.add_argument("--root", help="refseg root (default REFSEG_ROOT, else the working directory)")
    parser.add_argument("--run-name", action="append", help="only these training runs (repeatable)")
    parser.add_argument("--metric", default="test_miou")
    parser.add_argument("--out-dir", default="outputs/compare")
    parser.set_defaults(handler=lambda args: print(run_compare(args.experiment, args.tracking_uri, args.out_dir,
                                                               args.run_name, args.metric, args.root)))
