"""The papers' published numbers (``benchmarks/published.yaml``), each with where it comes from.

An entry is one row of one paper's table: the method (a refseg method name, or a method refseg does
not implement, shown for context only), the protocol (track, dataset, shot, reference type), the
per-fold values and mean as printed, the frozen encoders the paper used (``setting``), and its
source (``paper``, ``table``, ``row``, and ``read_from`` when the numbers were read from another
document than the paper itself). Nothing here is computed: the values are the printed ones.

A cell of a benchmark table is put beside the entry the table names in ``compare_with`` for its
method and protocol, else the entry marked ``primary`` (the method's own paper), else the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

_KEYS = ("id", "method", "label", "track", "dataset", "shot", "reference", "folds", "mean", "setting", "source",
         "primary", "note")
_SOURCE_KEYS = ("paper", "table", "row", "read_from", "url")


@dataclass(frozen=True)
class Published:
    """One published result row (values in mIoU %)."""

    id: str
    method: str
    label: str
    track: str
    dataset: str
    shot: int
    reference: str
    folds: dict[int, float]
    mean: float | None
    setting: dict[str, str]
    source: dict[str, str]
    primary: bool = False
    note: str = ""

    def value(self, fold: int | None) -> float | None:
        """The printed value of ``fold`` (None: the mean over folds), or None if not printed."""
        return self.mean if fold is None else self.folds.get(fold)

    def cite(self) -> str:
        """``<paper>, <table>, row "<row>"`` (+ ``; read from <read_from>``)."""
        text = f"{self.source['paper']}, {self.source['table']}, row \"{self.source['row']}\""
        if self.source.get("read_from"):
            text += f"; read from {self.source['read_from']}"
        return text


def _entry(raw: Any, path: str, index: int) -> Published:
    where = f"{path}: entry {index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(_KEYS)}")
    for key in ("id", "method", "track", "dataset", "shot", "reference", "source"):
        if key not in raw:
            raise ConfigError(f"{where}: {key} is required")
    source = raw["source"]
    if not isinstance(source, dict) or not all(source.get(k) for k in ("paper", "table", "row")):
        raise ConfigError(f"{where} ({raw['id']}): source needs paper, table and row")
    if sorted(set(source) - set(_SOURCE_KEYS)):
        raise ConfigError(f"{where} ({raw['id']}): unknown source key {sorted(set(source) - set(_SOURCE_KEYS))[0]!r}")
    folds = {int(k): float(v) for k, v in (raw.get("folds") or {}).items()}
    if not folds and raw.get("mean") is None:
        raise ConfigError(f"{where} ({raw['id']}): give folds, mean, or both")
    return Published(
        id=str(raw["id"]), method=str(raw["method"]), label=str(raw.get("label") or raw["method"]), track=str(raw["track"]),
        dataset=str(raw["dataset"]), shot=int(raw["shot"]), reference=str(raw["reference"]), folds=folds,
        mean=None if raw.get("mean") is None else float(raw["mean"]), setting={k: str(v) for k, v in (raw.get("setting") or {}).items()},
        source={k: str(v) for k, v in source.items()}, primary=bool(raw.get("primary", False)), note=str(raw.get("note") or ""),
    )


@dataclass
class PublishedNumbers:
    """Every entry of a published-numbers file, looked up by protocol."""

    path: str
    entries: list[Published] = field(default_factory=list)

    def by_id(self) -> dict[str, Published]:
        return {entry.id: entry for entry in self.entries}

    def matching(self, method: str, track: str, dataset: str, shot: int, reference: str) -> list[Published]:
        return [e for e in self.entries if (e.method, e.track, e.dataset, e.shot, e.reference) == (method, track, dataset, shot, reference)]

    def choose(self, method: str, track: str, dataset: str, shot: int, reference: str,
               compare_with: tuple[str, ...] = (), backbone: str | None = None) -> Published | None:
        """The entry a cell is compared with: one of ``compare_with`` if it matches; else, among the
        entries with the cell's backbone if any has it (else all), the primary one, else the first;
        None when no paper printed this protocol."""
        candidates = self.matching(method, track, dataset, shot, reference)
        for wanted in compare_with:
            for entry in candidates:
                if entry.id == wanted:
                    return entry
        same_backbone = [e for e in candidates if backbone is not None and e.setting.get("backbone") == backbone]
        pool = same_backbone or candidates
        primary = [e for e in pool if e.primary]
        return (primary or pool or [None])[0]

    def context(self, track: str, dataset: str, shots: tuple[int, ...], references: tuple[str, ...],
                methods: set[str]) -> list[Published]:
        """Entries of methods outside ``methods`` (not run here) on the table's protocols: shown for context."""
        return [e for e in self.entries if e.track == track and e.dataset == dataset and e.shot in shots
                and e.reference in references and e.method not in methods]


def load_published(path: str | Path) -> PublishedNumbers:
    """Read and check a published-numbers file (ids unique, every source complete)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"published-numbers file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        raise ConfigError(f"{path}: expected a mapping with a list under 'entries'")
    entries = [_entry(item, str(path), index) for index, item in enumerate(raw["entries"])]
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise ConfigError(f"{path}: id {entry.id!r} is used twice")
        seen.add(entry.id)
    return PublishedNumbers(str(path), entries)
