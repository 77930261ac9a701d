"""``refseg benchmark``'s pieces, fast (no Ray, no training): table validation (one line per bad
table, before anything runs), cell expansion and the identity of a cell, the COCO -> PASCAL folds as
data, the published numbers, the plan, and the table's rendering (papers' numbers, differences, std
only with several seeds, "not comparable: proxy SAM" from the recorded identities)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.benchmark import coco2pascal
from pipeline.benchmark.cells import expand_cells, is_sam_prompt_method
from pipeline.benchmark.published import load_published
from pipeline.benchmark.records import CellRecord
from pipeline.benchmark.spec import load_table
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PROXY = "sam_proxy_mobilenet_v2 (weights sha256 d06cf7a62c36, vrp512_squash_tf128)"
MOBILENET = "mobilenet_v2 (weights sha256 3fa2a28e74a4, vrp512_squash_tf128)"


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    """Stand-ins for the files a table names (validation only checks they exist)."""
    (tmp_path / "images").mkdir()
    for name in ("instances.json", "backbone.pth"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "lists").mkdir()
    return {"root": tmp_path}


def write_table(folder: Path, **changes) -> Path:
    table = {
        "name": "t", "methods": ["vrp_sam", "prosam"], "baselines": ["prototype_matching"], "folds": [0, 1], "seeds": [0, 1],
        "reference_types": ["mask", "box"], "published": str(REPO / "benchmarks" / "published.yaml"),
        "data": {"annotations": "instances.json", "images": "images", "lists_dir": "lists"},
        "encoders": {"backbone": {"encoder": "mobilenet_v2", "checkpoint": "backbone.pth"}},
        "training": {"recipe": {"epochs": 1}, "episodes_per_epoch": 16, "test_episodes": 8},
    }
    for key, value in changes.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    path = folder / "table.yaml"
    path.write_text(yaml.safe_dump(table))
    return path


@pytest.mark.parametrize(("change", "message"), [
    ({"methods": ["vrp_sam", "nosuch"]}, "unknown method 'nosuch'; available: "),
    ({"methods": ["prototype_matching"]}, "prototype_matching is training-free: list it under baselines"),
    ({"baselines": ["vrp_sam"]}, "baseline vrp_sam is trained: list it under methods"),
    ({"folds": [0, 4]}, "unknown fold 4; folds are 0..3"),
    ({"reference_types": ["mask", "lasso"]}, "unknown reference type 'lasso'; known: mask, box, scribble, points"),
    ({"tracks": ["unseen", "video"]}, "unknown track 'video'"),
    ({"seeds": [0, 0]}, "seeds names 0 twice"),
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"training": {"recipe": {"seed": 3}}}, "the seeds are the table's 'seeds'"),
    ({"scaling": {"gpus_per_worker": 0.25}}, "scaling.gpus_per_worker needs scaling.use_gpu: true"),
    ({"training": {"precision": "float16"}}, "training.precision must be one of ('float32', 'bfloat16')"),
    ({"encoders": {"sam": {"precision": "half"}, "backbone": {"encoder": "mobilenet_v2", "checkpoint": "b.pth"}}},
     "encoders.sam.precision must be one of ('float32', 'bfloat16')"),
])
def test_a_bad_table_is_one_line_naming_the_file_and_the_value(data: dict, change: dict, message: str) -> None:
    path = write_table(data["root"], **change)
    with pytest.raises(ConfigError) as error:
        load_table(path)
    text = str(error.value)
    assert message in text and text.startswith(str(path)) and "\n" not in text


def test_missing_data_is_named_before_anything_runs(data: dict) -> None:
    spec = load_table(write_table(data["root"], tracks=["unseen", "coco2pascal"]))
    with pytest.raises(ConfigError) as error:
        spec.check_data()
    assert str(error.value) == (f"{spec.path}: the PASCAL VOC 2012 + SBD root (JPEGImages, SegmentationClassAug) is needed "
                                "(track coco2pascal or dataset pascal5i); give data.pascal_root")
    spec = load_table(write_table(data["root"], tracks=["fss1000"], data={
        "annotations": "instances.json", "images": "images", "fss1000_root": "/nowhere/FSS-1000"}))
    with pytest.raises(ConfigError, match=r"the FSS-1000 folder \(one folder per class\) \(data.fss1000_root = "
                                          r"/nowhere/FSS-1000\) does not exist; nothing was run"):
        spec.check_data()
    (data["root"] / "images").rmdir()
    with pytest.raises(ConfigError, match=r"the COCO image folder \(data.images = .*/images\) does not exist"):
        load_table(write_table(data["root"])).check_data()


def test_unset_variables_are_named_and_defaults_apply(data: dict) -> None:
    path = write_table(data["root"], data={"annotations": "${NO_SUCH_VARIABLE}/x.json", "images": "images"})
    with pytest.raises(ConfigError, match=r"data.annotations uses \$\{NO_SUCH_VARIABLE\}, which is not set"):
        load_table(path, environ={})
    path = write_table(data["root"], data={"annotations": "${ROOT_X:-.}/instances.json", "images": "images"})
    assert load_table(path, environ={}).data["annotations"] == str(data["root"] / "instances.json")
    assert load_table(path, environ={"ROOT_X": "/elsewhere"}).data["annotations"] == "/elsewhere/instances.json"


def test_cells_expand_in_order_and_each_is_the_training_job_it_names(data: dict) -> None:
    spec = load_table(write_table(data["root"]))
    spec.check_data()
    cells = expand_cells(spec, str(data["root"] / "bench"))
    assert len(cells.training) == 2 * 2 * 2 * 2  # methods x folds x seeds x reference types
    assert [c.key for c in cells.training[:3]] == [
        "vrp_sam/coco20i fold 0/1-shot/mask/seed 0", "vrp_sam/coco20i fold 0/1-shot/mask/seed 1",
        "prosam/coco20i fold 0/1-shot/mask/seed 0"]
    assert not cells.evaluation and not cells.curves
    # a cell's identity: its TrainConfig (run name = configuration fingerprint) and fold; seeds differ
    names = {(c.run_name, c.fold) for c in cells.training}
    assert len(names) == len(cells.training)
    cell = cells.training[1]
    cfg = cell.config
    assert (cfg.method, cfg.fold, cfg.shot, cfg.annotation_type, cfg.seed) == ("vrp_sam", 0, 1, "mask", 1)
    assert cfg.baselines == ("prototype_matching",) and cfg.experiment == "benchmark-t"
    assert cfg.recipe.epochs == 1 and cfg.episodes_per_epoch == 16 and cfg.test_episodes == 8
    assert cfg.sam.store == str(data["root"] / "bench" / "stores" / "images-sam_proxy_mobilenet_v2") or cfg.sam.store.endswith(
        "-sam_proxy_mobilenet_v2")
    # the printed command is the training job's: parsed by it, it gives the same configuration
    from pipeline.training.commands import add_train_arguments, configs_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_train_arguments(parser, "coco20i")
    tokens = shlex.split(cell.command())
    assert tokens[:2] == ["python", "jobs/train_coco20i.py"]
    base, _ = configs_from_args(parser.parse_args(tokens[2:]), "coco20i")
    assert base.default_run_name() == cell.run_name
    # the same cell twice: the same identity (a re-run finds it)
    again = expand_cells(load_table(write_table(data["root"])), str(data["root"] / "bench"))
    assert again.training[1].run_name == cell.run_name
    # a bf16 table's cells train at bf16: other cells, other runs
    training = {"recipe": {"epochs": 1}, "episodes_per_epoch": 16, "test_episodes": 8, "precision": "bfloat16"}
    bf16 = expand_cells(load_table(write_table(data["root"], training=training)), str(data["root"] / "bench")).training[1]
    assert bf16.config.precision == "bfloat16" and bf16.run_name != cell.run_name
    assert configs_from_args(parser.parse_args(shlex.split(bf16.command())[2:]), "coco20i")[0].precision == "bfloat16"
    # a bf16 SAM store: its own store, read at bf16 by every cell
    encoders = {"sam": {"precision": "bfloat16"}, "backbone": {"encoder": "mobilenet_v2", "checkpoint": "backbone.pth"}}
    bf16 = expand_cells(load_table(write_table(data["root"], encoders=encoders)), str(data["root"] / "bench")).training[1]
    assert (bf16.config.sam.precision, bf16.config.backbone.precision) == ("bfloat16", "float32")
    assert bf16.config.sam.store == cfg.sam.store + "-bfloat16" and bf16.config.backbone.store == cfg.backbone.store


def test_tracks_add_evaluation_and_curve_cells(data: dict) -> None:
    spec = load_table(write_table(data["root"], methods=["vrp_sam"], baselines=["prototype_matching", "persam"],
                                  tracks=["unseen", "fss1000", "coco2pascal", "robustness"], seeds=[0],
                                  reference_types=["mask", "box", "scribble", "points"]))
    cells = expand_cells(spec)
    assert len(cells.training) == 1 * 2 * 4
    fss = [c for c in cells.evaluation if c.protocol == "fss1000"]
    c2p = [c for c in cells.evaluation if c.protocol == "coco2pascal"]
    # each trained model, and each baseline once per shot x reference (FSS-1000 has no folds; COCO->PASCAL: per fold)
    assert len(fss) == 8 + 2 * 4 and len(c2p) == 8 + 2 * 2 * 4
    assert {c.fold for c in fss if c.baseline} == {None} and {c.fold for c in c2p if c.baseline} == {0, 1}
    assert len({c.identity for c in cells.evaluation}) == len(cells.evaluation)
    assert len(cells.curves) == 8  # vrp_sam is a SAM-prompt method
    assert is_sam_prompt_method("fcp") and is_sam_prompt_method("prosam") and not is_sam_prompt_method("segic")


def test_coco2pascal_folds_are_data_derived_from_the_coco_folds_and_class_disjoint() -> None:
    from pipeline.data.folds import COCO_CLASS_NAMES, PASCAL_CLASS_NAMES, base_classes

    folds = coco2pascal.load_folds()
    assert sorted(c for classes in folds.values() for c in classes) == list(range(20))  # each VOC class in one fold
    assert [len(folds[f]) for f in range(4)] == [6, 4, 6, 4]
    names = yaml.safe_load(coco2pascal.FOLDS_FILE.read_text())["voc_to_coco"]
    for fold, classes in folds.items():
        trained = {COCO_CLASS_NAMES[c] for c in base_classes("coco20i", fold)}
        for voc in classes:
            assert names.get(PASCAL_CLASS_NAMES[voc], PASCAL_CLASS_NAMES[voc]) not in trained


def test_a_coco2pascal_fold_file_that_breaks_the_rule_is_refused(tmp_path: Path) -> None:
    raw = yaml.safe_load(coco2pascal.FOLDS_FILE.read_text())
    raw["folds"][0], raw["folds"][1] = raw["folds"][1], raw["folds"][0]
    path = tmp_path / "folds.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="differ from the rule"):
        coco2pascal.load_folds(path)


def test_published_numbers_have_sources_and_the_chosen_entry_follows_the_rules(tmp_path: Path) -> None:
    published = load_published(REPO / "benchmarks" / "published.yaml")
    assert all(e.source["paper"] and e.source["table"] and e.source["row"] for e in published.entries)
    prosam = published.choose("prosam", "unseen", "coco20i", 1, "mask")
    assert (prosam.mean, prosam.folds[0], prosam.source["table"]) == (54.63, 48.74, "Table 1")
    assert published.choose("vrp_sam", "unseen", "coco20i", 1, "mask").id == "vrpsam-paper-coco20i-mask"  # primary
    assert published.choose("vrp_sam", "unseen", "coco20i", 1, "mask", ("fcp-t1-coco20i-vrp_sam-resnet50_v2-1shot",)).mean == 50.2
    assert published.choose("fcp", "unseen", "coco20i", 1, "mask", backbone="vgg16").mean == 50.0  # same backbone first
    assert published.choose("vrp_sam", "unseen", "coco20i", 1, "points").mean == 39.85
    assert published.choose("prototype_matching", "unseen", "coco20i", 1, "mask") is None
    bad = tmp_path / "published.yaml"
    bad.write_text(yaml.safe_dump({"entries": [{"id": "x", "method": "vrp_sam", "track": "unseen", "dataset": "coco20i",
                                                "shot": 1, "reference": "mask", "mean": 50.0, "source": {"paper": "P"}}]}))
    with pytest.raises(ConfigError, match="source needs paper, table and row"):
        load_published(bad)


class _Bench:
    def __init__(self, spec) -> None:
        self.spec = spec
        self.published = load_published(spec.published)


def _record(method: str, kind: str, fold: int, seed: int | None, miou: float, reference: str = "mask",
            episode_set: str = "e", sam: str = PROXY, protocol: str = "test episodes drawn (...); not HSNet-identical") -> CellRecord:
    return CellRecord(f"{method}-{fold}-{seed}", kind, method, "unseen", "coco20i", fold, 1, reference, seed,
                      run_id=f"r{method}{fold}{seed}", status="FINISHED", miou=miou, episodes=64, failed=0,
                      cost={"wall_s": 120.0, "cpu_hours": 120 / 3600}, frozen={"sam": sam, "backbone": MOBILENET},
                      test_protocol=protocol, episode_set=episode_set)


def test_table_rows_mean_std_papers_differences_and_comparability(data: dict) -> None:
    from pipeline.benchmark.table import cell_text, rows_from_records, to_markdown, Table

    spec = load_table(write_table(data["root"]))
    records = [
        _record("vrp_sam", "trained", 0, 0, 20.0), _record("vrp_sam", "trained", 0, 1, 24.0),
        _record("vrp_sam", "trained", 1, 0, 30.0), _record("vrp_sam", "trained", 1, 1, 34.0),
        _record("prosam", "trained", 0, 0, 25.0),  # one seed only: no spread
        # the baseline measured in two cells on the same episodes: one value, counted once
        _record("prototype_matching", "training-free", 0, None, 18.0), _record("prototype_matching", "training-free", 0, None, 18.0),
        _record("prosam", "trained", 0, 1, 99.0, reference="box") ,
    ]
    records[-1].status = "RUNNING"  # unfinished cells are not in the table
    rows = rows_from_records(records, _Bench(spec))
    by = {(r.method, r.kind, r.fold, r.reference): r for r in rows}
    vrp0 = by[("vrp_sam", "trained", 0, "mask")]
    assert vrp0.values == [20.0, 24.0] and vrp0.mean == 22.0 and abs(vrp0.std - 2.8284271) < 1e-6
    assert cell_text(vrp0.values) == "22.00 ± 2.83"
    assert vrp0.published.id == "vrpsam-paper-coco20i-mask" and vrp0.paper == 48.1 and abs(vrp0.diff - (22.0 - 48.1)) < 1e-9
    assert vrp0.comparability.startswith("not comparable: proxy SAM; backbone mobilenet_v2 (paper: resnet50_v2); "
                                         "test episodes not HSNet's; 64 test episodes (paper: 1000)")
    assert by[("vrp_sam", "trained", 1, "mask")].paper is None  # the paper's fold 1 was not read: no number, no difference
    assert by[("vrp_sam", "trained", None, "mask")].values == [25.0, 29.0]  # mean over folds per seed, then over seeds
    assert by[("vrp_sam", "trained", None, "mask")].paper == 53.9
    prosam = by[("prosam", "trained", 0, "mask")]
    assert prosam.std is None and cell_text(prosam.values) == "25.00" and prosam.paper == 48.74
    baseline = by[("prototype_matching", "training-free", 0, "mask")]
    assert baseline.values == [18.0] and baseline.published is None
    assert baseline.comparability.endswith("no published number") and "proxy SAM" not in baseline.comparability  # it reads no SAM
    assert ("prosam", "trained", 0, "box") not in by
    # identities decide "proxy SAM", not a flag: a run recorded with a real SAM is not called proxy
    real = rows_from_records([_record("prosam", "trained", 0, 0, 50.0, sam="sam_vit_h (weights sha256 a7bf3b02f3eb, vrp512)",
                                      protocol="HSNet-identical test episodes")], _Bench(spec))[0]
    assert "proxy SAM" not in real.comparability and real.comparability.startswith("not comparable: backbone mobilenet_v2")
    text = to_markdown(Table("t", "benchmark-t", rows, [], [], {"sam": PROXY}, [], 5, 8, (0, 1)))
    import re

    number = re.search(r"\| vrp_sam \| trained \| unseen \(coco20i\) \| 0 \| 1 \| mask \| 2 \| 22.00 ± 2.83 \| 48.10 \[(\d)\] \| "
                       r"-26.10 \| 64 \(0\) \| 2.0 min \|", text).group(1)
    assert f"[{number}] VRP-SAM (its paper): VRP-SAM: SAM with Visual Reference Prompt" in text
    assert "| prosam | trained | unseen (coco20i) | 0 | 1 | mask | 1 | 25.00 | 48.74 [" in text
    assert "| prototype_matching | training-free | unseen (coco20i) | 0 | 1 | mask | - | 18.00 | - | - | 64 (0) | - |" in text
    assert "failed episode is excluded from the metric and counted here" in text


def test_write_outputs_csv_and_plots(data: dict, tmp_path: Path) -> None:
    import csv

    from pipeline.benchmark.table import Table, rows_from_records, write_outputs

    spec = load_table(write_table(data["root"]))
    rows = rows_from_records([_record("vrp_sam", "trained", 0, 0, 20.0), _record("vrp_sam", "trained", 0, 1, 24.0)], _Bench(spec))
    rows[0].curve = {0.0: 60.0, 1.0: 40.0}
    paths = write_outputs(Table("t", "e", rows, [], [], {}, [], 2, 2, (0,)), tmp_path / "out")
    table = list(csv.DictReader(paths["csv"].open()))
    assert table[0]["miou_mean"] == "22.0" and table[0]["n_seeds"] == "2" and float(table[0]["paper"]) == 48.1
    assert paths["plot"].stat().st_size > 0 and paths["robustness"].stat().st_size > 0


def test_plan_lists_cells_stores_and_an_estimate_from_measured_rates(data: dict, tmp_path: Path) -> None:
    from pipeline.benchmark.runner import plan, prepare

    path = write_table(data["root"], methods=["vrp_sam"], folds=[0], seeds=[0], reference_types=["mask"],
                       scaling={"use_gpu": True, "num_workers": 1}, training={"recipe": {"epochs": 2}, "episodes_per_epoch": 800})
    bench = prepare(path, str(tmp_path / "root"))
    text, result = plan(bench)
    assert "= 1 training cell(s) (0 finished)" in text
    assert f"{tmp_path / 'root' / 'stores'}" in text and "does not exist yet: extracted first" in text
    assert "[ ] vrp_sam/coco20i fold 0/1-shot/mask/seed 0: run vrp_sam-coco20i-1shot-mask-s0-" in text
    (item,) = result.cells
    # 2 epochs x 800 episodes at the H200's measured 29.8 ms per 2 episodes
    assert item.train_episodes == 1600 and abs(item.hours_per_cell - 1600 * 0.0297963505 / 2 / 3600) < 1e-6
    assert "gpu_step_time_h200.json" in item.source
    assert not (tmp_path / "root" / "mlflow.db").exists()  # planning creates nothing


READY = {"coco20i_sam_prompt": (36, 0, 0), "pascal5i_sam_prompt": (36, 0, 0), "coco2pascal": (36, 36 + 2 * 4, 0),
         "segic_one_shot": (12, 12 + 2, 0), "robustness": (48, 0, 48)}


def _ready_environment(tmp_path: Path) -> dict[str, str]:
    """Every variable the ready tables read, pointing at stand-ins that exist."""
    env = {}
    for name in ("REFSEG_COCO_ANNOTATIONS", "REFSEG_SAM_VIT_H", "REFSEG_RESNET50_V2", "REFSEG_DINOV2_L"):
        (tmp_path / name).write_text("x")
        env[name] = str(tmp_path / name)
    for name in ("REFSEG_COCO_IMAGES", "REFSEG_COCO_LISTS", "REFSEG_PASCAL_LISTS", "REFSEG_FSS1000_ROOT", "REFSEG_FSS1000_LISTS"):
        (tmp_path / name).mkdir()
        env[name] = str(tmp_path / name)
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    env["REFSEG_PASCAL_ROOT"] = str(tmp_path / "voc")
    return env


@pytest.mark.parametrize("name", sorted(READY))
def test_ready_tables_expand_and_refuse_missing_data_in_one_line(name: str, tmp_path: Path, monkeypatch) -> None:
    from pipeline.benchmark.runner import prepare

    env = _ready_environment(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bench = prepare(REPO / "benchmarks" / f"{name}.yaml", str(tmp_path / "root"))
    assert (len(bench.cells.training), len(bench.cells.evaluation), len(bench.cells.curves)) == READY[name]
    assert bench.cells.training[0].config.use_gpu
    # data that is not there: one line naming it, before anything runs
    key = {"pascal5i_sam_prompt": "REFSEG_PASCAL_ROOT", "coco2pascal": "REFSEG_PASCAL_ROOT",
           "segic_one_shot": "REFSEG_FSS1000_ROOT"}.get(name, "REFSEG_COCO_IMAGES")
    monkeypatch.setenv(key, str(tmp_path / "absent"))
    with pytest.raises(ConfigError) as error:
        prepare(REPO / "benchmarks" / f"{name}.yaml", str(tmp_path / "root"))
    assert f"= {tmp_path / 'absent'}) does not exist; nothing was run" in str(error.value) and "\n" not in str(error.value)
    monkeypatch.delenv(key)
    with pytest.raises(ConfigError, match=rf"uses \$\{{{key}\}}, which is not set: set the environment variable {key}"):
        prepare(REPO / "benchmarks" / f"{name}.yaml", str(tmp_path / "root"))
    assert not (tmp_path / "root").exists()  # nothing was written


def test_plan_scales_a_stored_table_run_on_the_same_device(data: dict, tmp_path: Path, monkeypatch) -> None:
    import json

    from pipeline.benchmark import estimates
    from pipeline.benchmark.runner import plan, prepare

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "benchmark_x_cpu.json").write_text(json.dumps({
        "table": "x", "commit": "abcdef0123", "device": "CPU",
        "cells": [{"method": "vrp_sam", "train_episodes": 100, "wall_s": 50.0},
                  {"method": "vrp_sam", "train_episodes": 100, "wall_s": 70.0}]}))
    (tmp_path / "m" / "benchmark_y_gpu.json").write_text(json.dumps({
        "table": "y", "device": "GPU", "cells": [{"method": "vrp_sam", "train_episodes": 100, "wall_s": 1.0}]}))
    monkeypatch.setattr(estimates, "MEASUREMENTS", tmp_path / "m")
    path = write_table(data["root"], methods=["vrp_sam", "fcp"], folds=[0], seeds=[0], reference_types=["mask"],
                       training={"recipe": {"epochs": 2}, "episodes_per_epoch": 400})
    text, result = plan(prepare(path, str(tmp_path / "root")))
    by = {c.method: c for c in result.cells}
    assert abs(by["vrp_sam"].hours_per_cell - 800 * 0.6 / 3600) < 1e-9  # CPU only: 0.6 s per training episode, 1 worker x 1 CPU
    assert "docs/measurements/benchmark_x_cpu.json (table x, commit abcdef0)" in by["vrp_sam"].source
    assert by["fcp"].hours_per_cell is None and "no measured rate" in by["fcp"].source  # no rate: no guess
