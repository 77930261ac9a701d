"""A fold prepared once by the driver (pipeline/training/prepare.py) and read by the training workers
(pipeline/training/prepared.py): read back exactly what the raw dataset gives, not rewritten when
prepared again, every file and mask checked, and the workers' walk imports no raw-dataset module."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.locations import resolve_root
from pipeline.training.config import TrainConfig
from pipeline.training.data import load_fold_data
from pipeline.training.prepare import FoldWriter
from pipeline.training.prepared import FOLD_FILE, PreparedRef, open_prepared

pytestmark = [pytest.mark.real_data]
REPO = Path(__file__).resolve().parents[1]
# What a training worker must never import: the raw datasets' readers and the driver's preparation
# (pipeline.data.base, the sources' interface and the ignore label, is allowed: it reads no dataset).
RAW_DATASET_MODULES = (
    "pycocotools", "pipeline.data.coco", "pipeline.data.semantic", "pipeline.data.splits",
    "pipeline.data.mask_cache", "pipeline.episodes.hsnet", "pipeline.episodes.training", "pipeline.training.data",
    "pipeline.training.prepare",
)


@pytest.fixture(scope="module")
def fold(coco_mini_dir: Path, coco20i_lists_dir: Path, tmp_path_factory) -> dict:
    cfg = TrainConfig(
        annotations=str(coco_mini_dir / "instances.json"), images=str(coco_mini_dir / "images"),
        lists_dir=str(coco20i_lists_dir), fold=0, val_episodes=20, test_episodes=40, feature_dataset="coco_mini",
    )
    root = resolve_root(str(tmp_path_factory.mktemp("prepared_root")))
    data = load_fold_data(cfg)
    return {"cfg": cfg, "data": data, "root": root, "ref": FoldWriter(cfg, data, root).write()}


def _files(root: str) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_a_prepared_fold_reads_back_exactly_what_the_dataset_gives(fold: dict) -> None:
    data, prepared = fold["data"], open_prepared(fold["ref"])
    assert prepared.train_pairs == {c: [str(i) for i in images] for c, images in data.train_pairs.items()}
    assert list(prepared.train_pairs) == list(data.train_pairs)  # the source's order, kept
    assert prepared.val.equals(data.val) and prepared.test.equals(data.test)
    assert prepared.test_protocol == data.test_protocol and prepared.describe() == data.describe("fold 0 data")
    assert prepared.report("r").as_dict() == {**data.report.as_dict(), "context": "r"}
    assert prepared.image_ids() == data.image_ids() and prepared.num_train_pairs == data.num_train_pairs
    keys = {(str(i), c) for c, images in data.train_pairs.items() for i in images}
    for table in (data.val, data.test):
        keys |= {(i, row["class_id"]) for row in table.to_pylist() for i in (row["query_id"], *row["support_ids"])}
    assert len(prepared.masks) == len(keys)
    for image, class_id in sorted(keys):
        np.testing.assert_array_equal(prepared.masks.get(image, class_id), data.masks.get(image, class_id))
    row = data.test.to_pylist()[0]
    np.testing.assert_array_equal(prepared.load_image(row["query_id"]), data.source.load_image(row["query_id"]))
    with pytest.raises(DataError, match="not one of the prepared fold's test images"):
        prepared.load_image("0")


def test_preparing_the_same_fold_again_writes_nothing(fold: dict) -> None:
    before = _files(fold["root"].location)
    again = FoldWriter(fold["cfg"], load_fold_data(fold["cfg"]), fold["root"]).write()
    assert again == fold["ref"]
    assert _files(fold["root"].location) == before  # same folder, same files, not one rewritten
    assert Path(fold["ref"].uri).name.startswith("coco20i-fold0-") and Path(fold["ref"].uri).parent.name == "prepared"


def test_corrupted_or_foreign_prepared_data_is_refused_naming_it_and_a_rerun_repairs_it(fold: dict, tmp_path: Path) -> None:
    ref, folder = fold["ref"], Path(fold["ref"].uri)
    test_file = folder / "test.parquet"
    original = test_file.read_bytes()
    test_file.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    with pytest.raises(DataError, match=rf"^prepared file {test_file} is corrupted \(its sha256 is not the one fold.json records\)"):
        open_prepared(ref)
    FoldWriter(fold["cfg"], fold["data"], fold["root"]).write()  # the driver checks the folder it finds and repairs it
    assert test_file.read_bytes() == original and open_prepared(ref).test.equals(fold["data"].test)

    mask = sorted((folder.parent.parent / "masks").rglob("*.png"))[0]
    data = mask.read_bytes()
    mask.write_bytes(data[:-20])
    image, class_id = mask.name.rsplit("-", 1)[0].rsplit("_", 1)
    with pytest.raises(DataError, match=rf"^mask {mask} is corrupted \(its sha256 is not the one in its name\)"):
        open_prepared(ref).masks.get(image, int(class_id))
    mask.write_bytes(data)

    with pytest.raises(DataError, match="is not the one this run prepared"):
        open_prepared(PreparedRef(ref.uri, "0" * 64))
    with pytest.raises(DataError, match="has no fold.json"):
        open_prepared(PreparedRef(str(tmp_path), ref.sha256))
    meta = json.loads((folder / FOLD_FILE).read_text())
    other = tmp_path / "other"
    other.mkdir()
    raw = json.dumps({**meta, "schema_version": 0}).encode()
    (other / FOLD_FILE).write_bytes(raw)
    with pytest.raises(DataError, match="has schema version 0, this refseg reads 1"):
        open_prepared(PreparedRef(str(other), hashlib.sha256(raw).hexdigest()))


WORKER_WALK = """
import json, sys
import pipeline.training.loop  # the worker's entry point and everything it imports
from pipeline.training.sampler_registry import SAMPLERS
for name in SAMPLERS.names():  # every sampler the loop may resolve (SegIC's mix reads its prepared parts)
    SAMPLERS.get(name)
from pipeline.data.folds import novel_classes
from pipeline.evaluation.resolution import EvalResolution
from pipeline.store.online import OnlineFeatures
from pipeline.training.config import TrainConfig
from pipeline.training.epochs import epoch_episodes, rank_share
from pipeline.training.episode_features import EpisodeFeatureBuilder
from pipeline.training.evaluate import evaluate_rows
from pipeline.training.prepared import open_prepared
from refseg_models import build_model
from refseg_models.encoders import build_encoder

cfg, ref, images, forbidden = json.loads(sys.argv[1])
cfg = TrainConfig.from_dict(cfg)
data = open_prepared(ref)
model = build_model("prototype_matching")
live = OnlineFeatures(build_encoder("mobilenet_v2", allow_random_init=True, input_size=64), images)
builder = EpisodeFeatureBuilder.for_method(model, data.masks, backbone_features=live, training=True)
batch = builder(rank_share(epoch_episodes(cfg, data, 0, 8), 0, 4))
test = rank_share(data.test, 0, 20)
evaluate_rows(model, EpisodeFeatureBuilder.for_method(model, data.masks, backbone_features=live), test, novel_classes("coco20i", 0),
              EvalResolution("fixed", 64), batch_size=2)
data.load_image(test[0]["query_id"])
print(json.dumps(sorted(m for m in forbidden if m in sys.modules)))
"""


def test_the_training_workers_walk_imports_no_raw_dataset_module(fold: dict) -> None:
    """What a Ray Train worker runs, in a fresh process: the loop's module, the prepared fold, an epoch's
    episodes, a training batch (masks, annotations, features), an evaluation and an overlay image:
    none of it imports pycocotools, a dataset reader, the HSNet list readers or the driver's preparation."""
    data = fold["data"]
    images = {str(i): str(data.source.image_path(data.source.key(i))) for i in data.image_ids()}
    argument = json.dumps([fold["cfg"].to_dict(), fold["ref"].to_dict(), images, RAW_DATASET_MODULES])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", WORKER_WALK, argument], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_instances_decode_to_exactly_what_pycocotools_draws(coco_mini_dir: Path) -> None:
    """The RLE strings the driver stores for SegIC's instance data decode, without pycocotools, to
    pycocotools' own masks: polygons (merged), and crowd regions (uncompressed RLE in the json)."""
    from pipeline.data.coco import CocoInstances
    from pipeline.store.rle import decode_rle

    coco = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", verbose=False).coco
    crowd = [a for a in coco.dataset["annotations"] if a.get("iscrowd")]
    polygons = [a for a in coco.dataset["annotations"] if not a.get("iscrowd")][:300]
    assert crowd and polygons
    for annotation in crowd + polygons:
        rle = coco.annToRLE(annotation)
        counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
        np.testing.assert_array_equal(decode_rle(counts, *rle["size"]), coco.annToMask(annotation))
    with pytest.raises(DataError, match="covers"):
        decode_rle(counts, rle["size"][0] + 1, rle["size"][1])


def test_the_workers_read_the_encoders_identities_the_driver_checked(fold: dict) -> None:
    """The driver records the stores and their encoders' identities in the fold; a worker opens the
    stores against them (no weights file hashed, no encoder looked up by name: a test's encoder
    registered in the driver only trains on a cluster too)."""
    from refseg_models.checkpoint import EncoderIdentity

    identity = EncoderIdentity("sam_vit_tiny", "ab" * 32, "vrp512_to1024_imagenet")
    writer = FoldWriter(fold["cfg"], fold["data"], fold["root"])
    writer.set_frozen({"sam": "s3://bucket/stores/sam"}, {"sam": identity})
    ref = writer.write()
    assert ref != fold["ref"] and open_prepared(ref).identities() == {"sam": identity}
    assert open_prepared(fold["ref"]).identities() == {}  # a fold prepared without them: the worker computes them
