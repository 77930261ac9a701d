"""``refseg compare`` from fold runs as MLflow returns them: trained, untrained and training-free
rows, a title, the frozen-encoder caveat, and a spread only where several seeds ran."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.training.compare import compare_table, to_markdown, write_outputs

PROXY = ("sam_proxy_mobilenet_v2 (weights sha256 d06cf7a62c36, vrp512_squash_tf128) = the PROXY SAM (a small SAM "
         "stand-in trained on coco_mini, docs/proxy_sam.md): not comparable to SAM's or the papers'")


def _run(method: str, seed: int, fold: int, miou: float, untrained: float, baseline: float, test_seed: int = 0) -> dict:
    return {
        "run_name": f"{method}-coco20i-1shot-mask-s{seed}-abcd1234", "fold": fold, "status": "FINISHED",
        "params": {"method": method, "shot": "1", "annotation_type": "mask", "recipe_overrides": "{}",
                   "dataset": "coco20i", "test_seed": str(test_seed), "test_episodes": "300"},
        "metrics": {"test_miou": miou, "test_fbiou": miou + 40, "test_untrained_miou": untrained,
                    "test_untrained_fbiou": untrained + 40, "test_prototype_matching_miou": baseline},
        "tags": {"refseg.frozen.sam": PROXY, "refseg.frozen.backbone": "mobilenet_v2 (weights sha256 3fa2a28e74a4)"},
    }


@pytest.fixture
def rows() -> list[dict]:
    # VRP-SAM: two seeds on folds 0 and 1; FCP: one seed. The baseline is the same on the same episodes.
    return [_run("vrp_sam", 1, 0, 20.0, 15.0, 18.0), _run("vrp_sam", 2, 0, 22.0, 16.0, 18.0),
            _run("vrp_sam", 1, 1, 30.0, 25.0, 28.0), _run("vrp_sam", 2, 1, 34.0, 24.0, 28.0),
            _run("fcp", 1, 0, 19.0, 10.0, 18.0), _run("fcp", 1, 1, 29.0, 11.0, 28.0)]


def test_rows_for_trained_untrained_and_training_free(rows: list[dict]) -> None:
    table = compare_table(rows)
    kinds = [(r["configuration"], r["kind"]) for r in table["rows"]]
    assert kinds == [("fcp (1-shot, mask)", "trained"), ("fcp (1-shot, mask)", "untrained"),
                     ("vrp_sam (1-shot, mask)", "trained"), ("vrp_sam (1-shot, mask)", "untrained"),
                     ("prototype_matching (1-shot, mask)", "training-free")]
    vrp = table["rows"][2]
    assert vrp["folds"] == {0: [20.0, 22.0], 1: [30.0, 34.0]} and vrp["mean"] == [25.0, 28.0]
    baseline = table["rows"][4]
    assert len(baseline["seeds"]) == 1 and baseline["folds"] == {0: [18.0], 1: [28.0]}  # one episode set, counted once
    assert table["rows"][3]["fbiou"] == [60.0, 60.0]  # the untrained model's FB-IoU
    with pytest.raises(ConfigError, match="no finished fold run"):
        compare_table([{**rows[0], "metrics": {}}])


def test_markdown_has_a_title_the_caveat_and_a_spread_only_for_several_seeds(rows: list[dict]) -> None:
    text = to_markdown(compare_table(rows), "coco20i")
    assert text.splitlines()[0] == "# refseg compare: test_miou (%) per fold on the test episodes, MLflow experiment 'coco20i'"
    lines = {line.split(" | ")[0] + " | " + line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| vrp_sam (1-shot, mask) | trained | 2 | 21.00 ± 1.41 | 32.00 ± 2.83 | 26.50 ± 2.12 |" in text
    assert "±" not in lines["| fcp (1-shot, mask) | trained"] and "19.00 | 29.00 | 24.00" in lines["| fcp (1-shot, mask) | trained"]
    assert "| prototype_matching (1-shot, mask) | training-free | 1 | 18.00 | 28.00 | 23.00 | - |" in text
    assert "the PROXY SAM" in text and "not comparable" in text


def test_csv_and_plot(rows: list[dict], tmp_path: Path) -> None:
    paths = write_outputs(compare_table(rows), tmp_path, "coco20i")
    with paths["csv"].open() as handle:
        table = {(r["configuration"], r["kind"]): r for r in csv.DictReader(handle)}
    assert float(table[("vrp_sam (1-shot, mask)", "trained")]["fold0_std"]) == pytest.approx(1.41421356)
    assert table[("fcp (1-shot, mask)", "trained")]["fold0_std"] == ""  # one seed: no spread
    assert table[("prototype_matching (1-shot, mask)", "training-free")]["mean"] == "23.0"
    assert paths["plot"].stat().st_size > 10_000 and paths["markdown"].read_text().startswith("# refseg compare")
