"""The results table of a benchmark: rows from MLflow's records, the papers' numbers beside them,
their differences, costs, and whether the setting is comparable; written as markdown, CSV and PNG.

A row is one method (trained, its untrained start, or a training-free baseline) on one protocol
(track, test dataset, shot, reference type) and fold; a "mean" row per method and protocol when
the table has several folds. Its value is the mean over the seeds of the cells (``± std``, the
sample standard deviation, only with two or more seeds); a training-free row's value is the same
on every cell that shares its test episodes, so it is counted once per episode set. Beside it: the
chosen published entry (:mod:`pipeline.benchmark.published`), the difference (ours - paper), the
test episodes evaluated and failed (a failed episode is excluded from the metric and counted here),
the cost (mean over the seeds) and, from the frozen encoders' identities and the test protocol the
runs recorded, "comparable setting" or "not comparable: <why>" (e.g. the proxy SAM).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.benchmark.published import Published
from pipeline.benchmark.records import NO_FOLD, CellRecord, evaluation_record, models_query, training_records
from refseg_models.encoders.sam_proxy import PROXY_ENCODER

PAPER_EPISODES = 1000
KIND_ORDER = {"trained": 0, "untrained": 1, "training-free": 2}
_COST_KEYS = ("wall_s", "cpu_hours", "gpu_hours", "train_episodes_per_s", "peak_rss_mb")


@dataclass
class Row:
    protocol: str
    dataset: str
    method: str
    kind: str
    shot: int
    reference: str
    fold: int | None  # None: the mean over the table's folds; NO_FOLD: a split without folds (FSS-1000)
    values: list[float]
    seeds: list[int | None]
    episodes: int | None = None
    failed: int | None = None
    published: Published | None = None
    cost: dict[str, float] = field(default_factory=dict)
    comparability: str = ""
    run_ids: list[str] = field(default_factory=list)
    curve: dict[float, float] = field(default_factory=dict)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over the seeds; None with fewer than two (no spread to show)."""
        if len(self.values) < 2:
            return None
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1))

    @property
    def paper(self) -> float | None:
        return None if self.published is None else self.published.value(self.fold)

    @property
    def diff(self) -> float | None:
        return None if self.paper is None or self.mean is None else self.mean - self.paper


@dataclass
class Table:
    name: str
    experiment: str
    rows: list[Row]
    context: list[Published]
    stores: list[dict[str, Any]]
    frozen: dict[str, str]
    models: list[dict[str, Any]]
    finished_cells: int
    total_cells: int
    folds: tuple[int, ...]
    noise_relative: bool = True


def cell_text(values: list[float]) -> str:
    """``mean`` for one value, ``mean ± std`` for several, ``-`` for none."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {std:.2f}"


def comparability(record: CellRecord, published: Published | None, encoders: tuple[str, ...]) -> str:
    """"comparable setting" or "not comparable: ..." from what the run recorded (the identities of
    the frozen encoders it read, its test protocol and episode count), against the paper's setting."""
    reasons = []
    sam = record.frozen.get("sam", "").split(" ", 1)[0] if "sam" in encoders else ""
    if sam == PROXY_ENCODER:
        reasons.append("proxy SAM")
    elif published is not None and published.setting.get("sam") and sam and sam != published.setting["sam"]:
        reasons.append(f"SAM {sam} (paper: {published.setting['sam']})")
    backbone = record.frozen.get("backbone", "").split(" ", 1)[0] if "backbone" in encoders else ""
    if published is not None and published.setting.get("backbone") and backbone and backbone != published.setting["backbone"]:
        reasons.append(f"backbone {backbone} (paper: {published.setting['backbone']})")
    if "not HSNet-identical" in record.test_protocol:
        reasons.append("test episodes not HSNet's")
    if record.episodes is not None and record.protocol != "fss1000" and record.episodes != PAPER_EPISODES:
        reasons.append(f"{record.episodes} test episodes (paper: {PAPER_EPISODES})")
    if published is None:
        reasons.append("no published number")
    return "not comparable: " + "; ".join(reasons) if reasons else "comparable setting"


def _implemented() -> set[str]:
    from refseg_models.build import available_models

    return set(available_models())


def _encoders_of(method: str) -> tuple[str, ...]:
    from refseg_models.build import build_model

    return tuple(build_model(method, allow_random_init=True).feature_spec().encoders)


def rows_from_records(cell_records: list[CellRecord], bench: Any) -> list[Row]:
    """Group finished records into rows (+ mean-over-folds rows) with published numbers and notes."""
    spec, published = bench.spec, bench.published
    backbone = spec.encoders["backbone"].encoder
    groups: dict[tuple, list[CellRecord]] = defaultdict(list)
    for record in cell_records:
        if record.finished:
            groups[(record.protocol, record.dataset, record.kind, record.method, record.shot, record.reference, record.fold)].append(record)
    encoders: dict[str, tuple[str, ...]] = {}
    rows: list[Row] = []
    for (protocol, dataset, kind, method, shot, reference, fold), items in groups.items():
        if kind == "training-free":  # one value per episode set (the same on every cell sharing it)
            by_set = {r.episode_set: r for r in items}
            items = list(by_set.values())
        encoders.setdefault(method, _encoders_of(method))
        entry = published.choose(method, protocol, dataset, shot, reference, spec.compare_with, backbone) if kind != "untrained" else None
        first = items[0]
        # rows measured inside a training cell (its untrained start, the baselines) cost part of that cell
        own_cost = kind == "trained" or protocol != "unseen"
        cost = {key: sum(r.cost[key] for r in items if key in r.cost) / max(1, sum(key in r.cost for r in items))
                for key in _COST_KEYS if own_cost and any(key in r.cost for r in items)}
        curve: dict[float, list[float]] = defaultdict(list)
        for r in items:
            for scale, value in r.curve:
                curve[scale].append(value)
        rows.append(Row(protocol, dataset, method, kind, shot, reference, fold, [r.miou for r in items],
                        [r.seed for r in items], first.episodes, max((r.failed or 0) for r in items) if any(r.failed is not None for r in items) else None,
                        entry, cost, comparability(first, entry, encoders[method]), [r.run_id for r in items if r.run_id],
                        {s: sum(v) / len(v) for s, v in sorted(curve.items())}))
    rows += _mean_rows(rows, spec.folds)
    rows.sort(key=lambda r: (r.protocol, r.dataset, r.shot, r.reference, KIND_ORDER[r.kind], r.method,
                             -1 if r.fold is None else r.fold))
    return rows


def _mean_rows(rows: list[Row], folds: tuple[int, ...]) -> list[Row]:
    """Per method and protocol, the mean over the table's folds: per seed (seeds with every fold),
    then over the seeds; training-free rows: the mean of the folds' values."""
    if len(folds) < 2:
        return []
    groups: dict[tuple, dict[int, Row]] = defaultdict(dict)
    for row in rows:
        if row.fold is not None:
            groups[(row.protocol, row.dataset, row.kind, row.method, row.shot, row.reference)][row.fold] = row
    out = []
    for (protocol, dataset, kind, method, shot, reference), by_fold in groups.items():
        if set(by_fold) != set(folds):
            continue
        if kind == "training-free":
            values, seeds = [sum(by_fold[f].mean for f in folds) / len(folds)], [None]
        else:
            per_seed: dict[Any, list[float]] = defaultdict(list)
            for fold in folds:
                for seed, value in zip(by_fold[fold].seeds, by_fold[fold].values):
                    per_seed[seed].append(value)
            seeds = [s for s, v in per_seed.items() if len(v) == len(folds)]
            values = [sum(per_seed[s]) / len(folds) for s in seeds]
        first = by_fold[folds[0]]
        out.append(Row(protocol, dataset, method, kind, shot, reference, None, values, seeds, None, None, first.published,
                       {}, first.comparability, [r for f in folds for r in by_fold[f].run_ids]))
    return out


def build_table(bench: Any, experiment_id: str, stores: list[Any]) -> Table:
    """The table of a benchmark from MLflow (every cell's record) and the stores' costs."""
    from pipeline.training import tracking

    uri = bench.uri
    cell_records: list[CellRecord] = []
    trained: dict[str, CellRecord] = {}
    for cell in bench.cells.training:
        found = training_records(uri, experiment_id, cell)
        trained[cell.key] = found[0]
        cell_records += found
    evaluated = [evaluation_record(uri, experiment_id, cell) for cell in bench.cells.evaluation]
    cell_records += evaluated
    scales = set(bench.spec.noise_scales())
    finished = (sum(r.finished for r in trained.values()) + sum(r.finished for r in evaluated)
                + sum(scales <= {s for s, _ in trained[c.trained.key].curve} for c in bench.cells.curves))
    rows = rows_from_records(cell_records, bench)
    spec = bench.spec
    methods = set(spec.methods) | set(spec.baselines)
    context = []
    for protocol, dataset in sorted({(r.protocol, r.dataset) for r in rows}):
        # the primary entry of each method not run here (its own paper's number), for context
        context += [e for e in bench.published.context(protocol, dataset, spec.shots, spec.reference_types, methods)
                    if e.primary or e.method not in _implemented()]
    store_rows = []
    for need in stores:
        cost = need.cost()
        store_rows.append({"role": need.role, "encoder": need.encoder, "uri": need.uri,
                           **({"images": cost.images, "bytes": cost.bytes, "extract_s": cost.extract_s} if cost else {})})
    frozen = {}
    for record in cell_records:
        for role, text in record.frozen.items():
            frozen.setdefault(role, text)
    models = tracking.model_versions(uri, models_query(spec.name))
    return Table(spec.name, spec.experiment, rows, context, store_rows, frozen, models, finished, len(bench.cells), spec.folds,
                 bool(spec.robustness.get("relative", True)))


def _fold_text(fold: int | None) -> str:
    return "mean" if fold is None else "-" if fold == NO_FOLD else str(fold)


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _sources(table: Table) -> dict[str, int]:
    numbers: dict[str, int] = {}
    for row in table.rows:
        if row.published is not None and row.published.id not in numbers:
            numbers[row.published.id] = len(numbers) + 1
    for entry in table.context:
        numbers.setdefault(entry.id, len(numbers) + 1)
    return numbers


HEAD = ("method", "kind", "protocol", "fold", "shot", "reference", "seeds", "mIoU", "paper", "Δ", "episodes (failed)",
        "wall", "CPU-h", "GPU-h", "train ep/s", "peak MB", "setting")


def to_markdown(table: Table) -> str:
    sources = _sources(table)
    lines = [f"# refseg benchmark {table.name}: test mIoU (%)", "",
             f"{table.finished_cells} of {table.total_cells} cells finished; MLflow experiment `{table.experiment}`.", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for row in table.rows:
        seeds = "-" if row.kind == "training-free" else str(len(row.values))
        paper = "-" if row.paper is None else f"{row.paper:.2f} [{sources[row.published.id]}]"
        episodes = "-" if row.episodes is None else f"{row.episodes} ({row.failed if row.failed is not None else '?'})"
        wall = "-" if "wall_s" not in row.cost else f"{row.cost['wall_s'] / 60:.1f} min"
        lines.append("| " + " | ".join([
            row.method, row.kind, f"{row.protocol} ({row.dataset})", _fold_text(row.fold),
            str(row.shot), row.reference, seeds, cell_text(row.values), paper, _num(row.diff), episodes, wall,
            _num(row.cost.get("cpu_hours"), 4), _num(row.cost.get("gpu_hours") or None, 4), _num(row.cost.get("train_episodes_per_s"), 1),
            _num(row.cost.get("peak_rss_mb"), 0), row.comparability]) + " |")
    curves = [row for row in table.rows if row.curve and row.fold is not None]
    if curves:
        scales = sorted({s for row in curves for s in row.curve})
        lines += ["", "Prompt-noise robustness (ProSAM's measurement): mean mask IoU (%) of the test episodes with N(0, s^2) "
                  f"noise{' x the episode' + chr(39) + 's prompt-token RMS' if table.noise_relative else ''} added to every prompt token, mean over the seeds "
                  "(MLflow metric `robustness/prompt_noise_iou` of each cell's run, step = 100 s; robustness.png).", "",
                  "| method | reference | fold | seeds | " + " | ".join(f"s = {x:g}" for x in scales) + " |",
                  "|" + "---|" * (4 + len(scales))]
        for row in curves:
            lines.append(f"| {row.method} | {row.reference} | {row.fold} | {len(row.values)} | "
                         + " | ".join(_num(row.curve.get(x)) for x in scales) + " |")
    lines += ["", *notes(table, sources)]
    return "\n".join(lines)


def notes(table: Table, sources: dict[str, int]) -> list[str]:
    lines = ["Reading it: mIoU is HSNet's (summed-area per-class IoU over the fold's test classes); a cell is the value "
             "of one seed, or mean ± std (sample std over seeds) where two or more seeds ran. Δ = ours - paper. "
             "'episodes (failed)': test episodes evaluated, and those that failed (their data could not be read): a "
             "failed episode is excluded from the metric and counted here. Cost columns: mean over the seeds' cells; "
             "wall = the benchmark driver's time on the cell (training, validation, test, the baselines), CPU-/GPU-h = "
             "wall x workers x CPUs / GPUs reserved per worker, train ep/s = global batch / median (data + step) time of "
             "the loop, peak MB = rank 0 worker's peak RSS. training-free rows: measured inside the training cells, on "
             "their test episodes (counted once per episode set). 'setting' is decided from the frozen encoders' "
             "identities and the test protocol the runs recorded."]
    for role, text in sorted(table.frozen.items()):
        lines.append(f"Frozen {role}: {text}.")
    for store in table.stores:
        if "extract_s" in store:
            lines.append(f"Store {store['role']} ({store['encoder']}): {store['uri']}: {store['images']} images, "
                         f"{store['bytes'] / 1e6:.1f} MB, extracted in {store['extract_s'] / 60:.1f} min (sum of its shard times).")
    by_id = {row.published.id: row.published for row in table.rows if row.published is not None}
    by_id.update({entry.id: entry for entry in table.context})
    if sources:
        lines.append("Published numbers:")
        for entry_id, number in sources.items():
            entry = by_id[entry_id]
            note = f" ({entry.note})" if entry.note else ""
            lines.append(f"[{number}] {entry.label}: {entry.cite()}{note}.")
    if table.context:
        lines.append("Published, not run here (context): " + "; ".join(
            f"{e.label} {e.dataset} {e.shot}-shot {e.reference}: mean {_num(e.mean)} [{sources[e.id]}]" for e in table.context) + ".")
    if table.models:
        lines.append(f"Registered models of this table ({len(table.models)}): `MlflowClient().search_model_versions(\"tags.`refseg.benchmark` = "
                     f"'{table.name}'\")` (models.csv lists them).")
    return lines


def write_outputs(table: Table, out_dir: str | Path) -> dict[str, Path]:
    """``table.md``, ``table.csv``, ``table.png`` (and ``robustness.png`` when there are noise
    curves), ``models.csv`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "table.md", "csv": out / "table.csv", "plot": out / "table.png", "models": out / "models.csv"}
    paths["markdown"].write_text(to_markdown(table) + "\n")
    sources = _sources(table)
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "kind", "protocol", "dataset", "fold", "shot", "reference", "n_seeds", "miou_mean", "miou_std",
                         "values", "paper", "paper_source", "diff", "episodes", "failed", *[f"cost_{k}" for k in _COST_KEYS],
                         "setting", "run_ids"])
        for row in table.rows:
            writer.writerow([row.method, row.kind, row.protocol, row.dataset, _fold_text(row.fold), row.shot,
                             row.reference, len(row.values), row.mean, "" if row.std is None else row.std,
                             " ".join(f"{v:.6f}" for v in row.values), "" if row.paper is None else row.paper,
                             "" if row.published is None else f"[{sources[row.published.id]}] {row.published.id}",
                             "" if row.diff is None else row.diff, "" if row.episodes is None else row.episodes,
                             "" if row.failed is None else row.failed, *[row.cost.get(k, "") for k in _COST_KEYS],
                             row.comparability, " ".join(row.run_ids)])
    with paths["models"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model_uri", "method", "fold", "seed", "test_protocol", "cell", "run_id"])
        for model in sorted(table.models, key=lambda m: (m["name"], int(m["version"]))):
            tags = model["tags"]
            writer.writerow([model["uri"], tags.get("refseg.method", ""), tags.get("refseg.fold", ""), tags.get("refseg.seed", ""),
                             tags.get("refseg.test_protocol", ""), tags.get("refseg.cell", ""), model["run_id"]])
    _plot(table, paths["plot"])
    if any(row.curve for row in table.rows):
        paths["robustness"] = out / "robustness.png"
        _plot_curves(table, paths["robustness"])
    return paths


def _plot(table: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.rows if r.values]
    figure, axis = plt.subplots(figsize=(max(7.0, 1.1 * len(rows) + 2), 5.2))
    labels = []
    for index, row in enumerate(rows):
        hatch = {"trained": "", "untrained": "//", "training-free": ".."}[row.kind]
        axis.bar(index, row.mean, 0.7, yerr=row.std if row.std is not None else None, capsize=3, hatch=hatch,
                 color=f"C{sorted({r.method for r in rows}).index(row.method) % 10}")
        if row.paper is not None:
            axis.plot(index, row.paper, marker="_", markersize=18, color="black")
        labels.append(f"{row.method}\n{row.protocol} {row.reference} fold {_fold_text(row.fold)}")
    axis.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30, ha="right")
    axis.set_ylabel("test mIoU (%)")
    axis.set_title(f"refseg benchmark {table.name}\nbars: ours (error bar: std over seeds, 2+ seeds; hatched: training-free / "
                   "untrained); black tick: the paper", fontsize=9)
    if any(r.comparability.startswith("not comparable: proxy SAM") for r in rows):
        figure.text(0.01, 0.01, "proxy SAM (docs/proxy_sam.md): not comparable to the papers' numbers", fontsize=7)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_curves(table: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for row in table.rows:
        if row.curve and row.fold is not None:
            scales = sorted(row.curve)
            axis.plot(scales, [row.curve[s] for s in scales], marker="o",
                      label=f"{row.method} {row.reference} fold {row.fold} ({len(row.values)} seed(s))")
    axis.set_xlabel("prompt-token noise scale s (N(0, s^2)" + (" x token RMS)" if table.noise_relative else ")"))
    axis.set_ylabel("mean mask IoU (%)")
    axis.set_title(f"refseg benchmark {table.name}: prompt-noise robustness (ProSAM's measurement)", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
