"""What a table will cost before it runs, from measured rates only (each estimate names its source).

Sources, in order of preference:

* **this table's finished cells** (their ``cost/wall_s`` in MLflow): the wall time per cell of each
  method on the machine that ran them: the estimate for the remaining cells of that method;
* **a stored table run on the same device** (``docs/measurements/benchmark_*.json``, written by
  ``bench/benchmark_cell_rates.py``): its cells' wall seconds per training episode (validation, test
  and start-up included, so a rough guide for another schedule), times this cell's training episodes;
* **GPU**: ``docs/measurements/gpu_step_time_h200.json`` (``bench/bench_step_time.py`` on one H200,
  fp32, batch 2): seconds per training episode of each method from the stores (``store_arm_s`` / 2)
  and seconds per image of the SAM encoders (``sam_vit_*_encoder_s`` / 2); validation, test and
  start-up are not in it;
* **stores**: a finished store's own stats (bytes, extraction seconds); else a stored table run's store
  of the same encoder on the same device (bytes and seconds per image); else, for SAM ViT-H / ViT-B on
  GPU, the encoder's measured seconds per image; bytes from the exact tar layout of the encoder's
  output shapes (``pipeline.store.layout.bytes_per_sample``, fp16) when nothing was measured.

Training episodes per cell = epochs x episodes per epoch (the table's, else one per training pair
of the fold: counted in the official ``trn`` list, an upper bound when the images are a subset).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.benchmark.cells import TrainingCell
from pipeline.benchmark.stores import StoreNeed
from pipeline.data.splits import read_coco20i_list, read_pascal5i_list
from pipeline.errors import DataError
from pipeline.store.layout import bytes_per_sample
from refseg_models.encoders import build_encoder

REPO = Path(__file__).resolve().parents[2]
MEASUREMENTS = REPO / "docs" / "measurements"
GPU_MEASUREMENT = MEASUREMENTS / "gpu_step_time_h200.json"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class CellEstimate:
    method: str
    cells: int
    train_episodes: int | None  # per cell (mean over the cells); None: unknown (no lists, no episodes_per_epoch)
    hours_per_cell: float | None  # device-hours (mean over the cells)
    device: str  # "GPU" or "CPU"
    source: str


@dataclass
class StoreEstimate:
    role: str
    encoder: str
    uri: str
    finished: bool
    images: int | None
    bytes: int | None
    extract_hours: float | None
    source: str


@dataclass
class Estimate:
    cells: list[CellEstimate] = field(default_factory=list)
    stores: list[StoreEstimate] = field(default_factory=list)

    @property
    def device_hours(self) -> float:
        known = [c.hours_per_cell * c.cells for c in self.cells if c.hours_per_cell is not None]
        known += [s.extract_hours for s in self.stores if s.extract_hours is not None and not s.finished]
        return sum(known)

    @property
    def disk_bytes(self) -> int:
        return sum(s.bytes or 0 for s in self.stores)


def _gpu_rates() -> dict:
    try:
        return json.loads(GPU_MEASUREMENT.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _stored_runs(device: str) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(MEASUREMENTS.glob("benchmark_*.json")):
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if stored.get("device") == device:
            out.append((path, stored))
    return out


def _source(path: Path, stored: dict) -> str:
    return f"docs/measurements/{path.name} (table {stored.get('table')}, commit {str(stored.get('commit', '?'))[:7]})"


def _store_rates(device: str) -> dict[str, tuple[float, float, str]]:
    """{encoder: (bytes per image, extraction seconds per image, source)} of stored table runs."""
    out: dict[str, tuple[float, float, str]] = {}
    for path, stored in _stored_runs(device):
        for store in stored.get("stores", []):
            if store.get("images") and store["encoder"] not in out:
                out[store["encoder"]] = (store["bytes"] / store["images"], store["extract_s"] / store["images"], _source(path, stored))
    return out


def _table_rates(device: str) -> dict[str, tuple[float, str]]:
    """{method: (wall seconds per training episode, source)} from the stored table runs on ``device``."""
    per_method: dict[str, list[float]] = {}
    sources: dict[str, str] = {}
    for path, stored in _stored_runs(device):
        for cell in stored.get("cells", []):
            if cell.get("train_episodes"):
                per_method.setdefault(cell["method"], []).append(cell["wall_s"] / cell["train_episodes"])
                sources.setdefault(cell["method"], _source(path, stored))
    return {m: (sum(v) / len(v), sources[m]) for m, v in per_method.items()}


def train_episodes(cell: TrainingCell) -> int | None:
    """Training episodes of one cell (epochs x episodes per epoch), None when it cannot be known
    without reading the dataset (no official lists and no ``episodes_per_epoch``)."""
    cfg = cell.config
    per_epoch = cfg.episodes_per_epoch or cfg.recipe.samples_per_epoch
    if per_epoch is None and cfg.lists_dir:
        try:
            if cfg.dataset == "coco20i":
                per_epoch = sum(len(v) for v in read_coco20i_list(cfg.lists_dir, "trn", cfg.fold).values())
            else:
                per_epoch = len(read_pascal5i_list(cfg.lists_dir, "trn", cfg.fold))
        except DataError:
            return None
    if per_epoch is None:
        return None
    batch = cfg.recipe.batch_size
    return (per_epoch // batch) * batch * cfg.recipe.epochs


def count_images(folder: str | None) -> int | None:
    if not folder or not Path(folder).is_dir():
        return None
    if (Path(folder) / "JPEGImages").is_dir():  # a PASCAL VOC root
        folder = str(Path(folder) / "JPEGImages")
    return sum(1 for p in Path(folder).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _bytes_per_image(need: StoreNeed) -> tuple[int, str]:
    spec = getattr(need.example.config, need.role)
    with torch.device("meta"):
        encoder = build_encoder(spec.encoder, None, allow_random_init=True, **spec.options)
    return bytes_per_sample(encoder.output_shapes(), 2), "the tar layout of its fp16 output shapes"


def estimate(cells: tuple[TrainingCell, ...], stores: list[StoreNeed], finished_wall_s: dict[str, list[float]]) -> Estimate:
    """The estimate of ``cells`` (those not finished) and ``stores``; ``finished_wall_s``: {method:
    wall seconds of this table's finished cells} (measured here, preferred)."""
    rates = _gpu_rates()
    stored = {device: _table_rates(device) for device in ("CPU", "GPU")}
    out = Estimate()
    by_method: dict[str, list[TrainingCell]] = {}
    for cell in cells:
        by_method.setdefault(cell.method, []).append(cell)
    for method, group in by_method.items():
        cfg = group[0].config
        counts = [train_episodes(cell) for cell in group]  # per cell: folds have different training lists
        episodes = None if None in counts else round(sum(counts) / len(counts))
        device = "GPU" if cfg.use_gpu else "CPU"
        # device-hours reserved per wall hour of one cell: its workers x the CPUs / GPUs each reserves
        scaling = group[0].spec.scaling
        reserved = cfg.num_workers * ((scaling.gpus_per_worker or 1.0) if cfg.use_gpu else cfg.cpus_per_worker)
        if finished_wall_s.get(method):
            walls = finished_wall_s[method]
            hours = sum(walls) / len(walls) / 3600 * reserved
            source = f"the mean wall time of this table's {len(walls)} finished {method} cell(s) x {reserved:g} {device}(s) reserved"
        elif method in stored[device] and episodes is not None:
            per_episode, where = stored[device][method]
            hours = episodes * per_episode / 3600 * reserved
            source = (f"{where}: {per_episode:.2f} s of cell wall time per training episode (with its validation, test "
                      f"and start-up: a rough guide for another schedule) x {reserved:g} {device}(s) reserved")
        elif cfg.use_gpu and method in rates and episodes is not None:
            hours = episodes * rates[method]["store_arm_s"] / rates.get("batch", 2) / 3600
            source = (f"{GPU_MEASUREMENT.relative_to(REPO)} ({rates.get('gpu', 'GPU')}, fp32, training steps only: "
                      f"{rates[method]['store_arm_s'] / rates.get('batch', 2) * 1000:.1f} ms per episode)")
        else:
            hours = None
            source = ("no measured rate for this method on this device yet (run the table once: its finished cells "
                      "become the rate)")
        out.cells.append(CellEstimate(method, len(group), episodes, hours, device, source))
    images = count_images(stores[0].example.config.images) if stores else None
    device = "GPU" if stores and stores[0].example.config.use_gpu else "CPU"
    measured = _store_rates(device)
    for need in stores:
        cost = need.cost() if need.finished else None
        n = cost.images if cost is not None else images
        if cost is not None:
            size, extract_hours, source = cost.bytes, cost.extract_s / 3600, "measured: its shards' stats (sum of shard times)"
        elif need.encoder in measured:
            per_byte, per_second, where = measured[need.encoder]
            size = None if n is None else int(n * per_byte)
            extract_hours = None if n is None else n * per_second / 3600
            source = f"{where}: {per_second:.2f} s and {per_byte / 1e6:.2f} MB per image"
        else:
            per_image, how = _bytes_per_image(need)
            size = None if n is None else n * per_image
            if need.encoder in ("sam_vit_h", "sam_vit_b") and f"{need.encoder}_encoder_s" in rates and n is not None and device == "GPU":
                per = rates[f"{need.encoder}_encoder_s"] / rates.get("batch", 2)
                extract_hours = n * per / 3600
                source = (f"{GPU_MEASUREMENT.relative_to(REPO)}: the encoder alone, {per * 1000:.0f} ms per image (decode and "
                          f"writes not included); bytes from {how}")
            else:
                extract_hours, source = None, f"no measured extraction rate for this encoder; bytes from {how}"
        out.stores.append(StoreEstimate(need.role, need.encoder, need.uri, need.finished, n, size, extract_hours, source))
    return out
