"""SegIC's mixed-dataset training data (``sampler="segic_mixed"``) on coco_mini-derived sources.

No ADE20k, LVIS or FSS-1000 exist here: ADE20k-, LVIS- and FSS-1000-format copies of the same real
coco_mini images and annotations are written into a temporary folder (tests/segic_mix_data.py), and
the stores hold the REAL MobileNetV2's features (at a 128 input, extracted in-process without Ray for
speed; the Ray extraction path is exercised by the job test). Checks: the configuration, the dataset
shares of the drawn samples against the weights (chi-square), no novel-class pixel in any target or
reference on all four folds, seeded tables / disjoint rank shares / batches that depend on their rows
only, the mask renderer against ``apply_view_to_mask``, warped-out cells ignored, and the batch layout; for
FSS-1000 as a fifth source: its kind and split, the shares with it, its pairs (an image, another of
its folder), no novel-class pixel from it on all four folds, ``coco_excluded`` and a missing root;
and (slow) a short run through the training job, killed and resumed in a real driver process.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, DataError
from pipeline.training.config import StoreSpec, TrainConfig
from pipeline.training.mix_config import MixConfig, MixSource

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights]

IMAGES = 40
WEIGHTS = (2.0, 1.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, coco_mini_dir: Path, mobilenet_v2_weights: Path) -> dict:
    from coco_helpers import coco_subset
    from segic_mix_data import derive_ade20k, derive_lvis, extract_in_process

    from pipeline.training.data import load_fold_data

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("segic_mix")
    subset = coco_subset(coco_mini_dir / "instances.json", IMAGES, root / "subset.json")
    ade = derive_ade20k(subset, coco_mini_dir / "images", root / "ade")
    lvis = derive_lvis(subset, coco_mini_dir / "images", root / "lvis")
    inst = str(root / "stores" / "instances")
    mix = MixConfig(
        sources=(
            MixSource("coco_semantic", "coco_semantic", weight=WEIGHTS[0], views=1),
            MixSource("ade20k", "ade20k_semantic", weight=WEIGHTS[1], images=str(ade), views=1),
            MixSource("coco_instances", "coco_instances", weight=WEIGHTS[2], store=inst, views=2, feature_dataset="mini_inst"),
            MixSource("lvis", "lvis_instances", weight=WEIGHTS[3], annotations=str(lvis), images=str(root / "lvis"),
                      store=inst, views=2, feature_dataset="mini_inst"),
        ),
        samples_per_epoch=64, warp_prob=0.3,
    )
    cfg = TrainConfig(
        method="segic", sampler="segic_mixed", mix=mix, annotations=str(subset), images=str(coco_mini_dir / "images"),
        feature_dataset="mini", backbone=StoreSpec("mobilenet_v2", str(mobilenet_v2_weights), str(root / "stores" / "main"),
                                                   options={"input_size": 128}),
        method_overrides=dict(feature_key="layer4", input_size=64, feature_size=8, mask_down_strides=(4, 2),
                              similarity_size=8, loss_points=256),
        recipe_overrides=dict(batch_size=8), num_workers=2, val_episodes=4, test_episodes=8,
    )
    data = load_fold_data(cfg)
    prepare(cfg, data, root, extract=extract_in_process)
    return {"root": root, "cfg": cfg, "data": {0: data}, "subset": subset}


def prepare(cfg: TrainConfig, data, root: Path, extract=None):
    """What the job's driver does for the fold: the mix's stores (extracted with ``extract``), then the
    fold and the mix written into a prepared artifact under ``root``; the artifact as workers open it."""
    from pipeline.locations import resolve_root
    from pipeline.training.prepare import FoldWriter
    from pipeline.training.prepared import open_prepared
    from pipeline.training.segic_mixed.preparation import prepare_mix

    writer = FoldWriter(cfg, data, resolve_root(str(root)))
    prepare_mix(cfg, data, writer, extract_missing=extract is not None, extract=extract)
    return open_prepared(writer.write())


def fold_data(workspace: dict, fold: int):
    from pipeline.training.data import load_fold_data

    if fold not in workspace["data"]:
        workspace["data"][fold] = load_fold_data(workspace["cfg"].replace(fold=fold))
    return workspace["data"][fold]


def make_sampler(workspace: dict, fold: int = 0, **mix_changes):
    from pipeline.training.worker import build_method
    from pipeline.training.segic_mixed import SegICMixedSampler

    cfg = workspace["cfg"].replace(fold=fold)
    if mix_changes:
        cfg = cfg.replace(mix=replace(cfg.mix, **mix_changes))
    model = build_method(cfg, {"backbone": {"layer4": (1280, 4, 4)}}, None)
    return SegICMixedSampler(cfg, prepare(cfg, fold_data(workspace, fold), workspace["root"]), model, None), model


# ---------------------------------------------------------------------------------------------- config
def test_mix_configuration_round_trips_and_picks_segics_recipe(workspace: dict) -> None:
    cfg = workspace["cfg"]
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    recipe = cfg.replace(recipe_overrides={}).recipe
    assert (recipe.lr, recipe.weight_decay, recipe.epochs, recipe.milestones, recipe.batch_size, recipe.samples_per_epoch) == (
        1e-4, 1e-4, 12, (10,), 32, 160_000)
    assert cfg.replace(mix=replace(cfg.mix, warp_prob=0.1)).fingerprint() != cfg.fingerprint()
    with pytest.raises(ConfigError, match="feeds segic only"):
        cfg.replace(method="vrp_sam")
    with pytest.raises(ConfigError, match="no recipe for segic on coco20i"):
        cfg.replace(sampler="episodes", mix=MixConfig())
    with pytest.raises(ConfigError, match="no source left"):
        MixConfig(coco_excluded=True)
    with pytest.raises(ConfigError, match="unknown option"):
        MixConfig.from_dict({"sources": [{"name": "a", "kind": "coco_semantic", "weigth": 2}]})
    with pytest.raises(ConfigError, match="kind must be one of"):
        MixSource("x", "pascal")


def test_command_line_builds_the_mix_and_needs_no_sam(workspace: dict, mobilenet_v2_weights: Path) -> None:
    import argparse

    from pipeline.training.commands import add_train_arguments, configs_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser, "coco20i")
    mix = {"sources": [{"name": "ade", "kind": "ade20k_semantic", "images": "ade", "weight": 2}], "warp_prob": 0.2}
    args = parser.parse_args([
        "--method", "segic", "--sampler", "segic_mixed", "--mix", json.dumps(mix), "--samples-per-epoch", "800",
        "--coco-excluded", "--annotations", str(workspace["subset"]), "--images", "imgs",
        "--backbone-checkpoint", str(mobilenet_v2_weights), "--folds", "1",
    ])
    base, options = configs_from_args(args, "coco20i")
    assert base.sampler == "segic_mixed" and base.mix.coco_excluded and base.mix.samples_per_epoch == 800
    assert base.mix.sources[0].images == str(Path("ade").resolve()) and base.mix.warp_prob == 0.2
    assert base.sam == StoreSpec()  # SegIC reads no SAM features: no SAM checkpoint needed
    assert [s.name for s in base.mix.active_sources()] == ["ade"]
    with pytest.raises(ConfigError, match="configure --sampler segic_mixed"):
        configs_from_args(parser.parse_args(["--method", "segic", "--mix", "{}", "--annotations", "a", "--images", "i",
                                             "--backbone-checkpoint", "w", "--samples-per-epoch", "5"]), "coco20i")


# ---------------------------------------------------------------------------------------------- shares
def test_dataset_shares_of_the_drawn_samples_match_the_weights(workspace: dict) -> None:
    from scipy.stats import chisquare

    sampler, _ = make_sampler(workspace)
    n = 8000
    sources = sampler.epoch_table(0, n).column("source").to_pylist()
    names = [part.name for part in sampler.parts]
    observed = np.array([sources.count(name) for name in names])
    expected = np.array(WEIGHTS) / sum(WEIGHTS) * n
    assert observed.sum() == n
    assert chisquare(observed, expected).pvalue > 1e-3, (observed, expected)
    # the test has power: uniform shares are rejected for these draws
    assert chisquare(observed, np.full(4, n / 4)).pvalue < 1e-6
    # Table 2's dagger setting: one flag, no COCO sample
    excluded, _ = make_sampler(workspace, coco_excluded=True)
    assert set(excluded.epoch_table(0, 400).column("source").to_pylist()) == {"ade20k", "lvis"}


# ---------------------------------------------------------------------------------------------- folds
def _novel_only(coco: dict, image_id: str, novel: set[int]) -> np.ndarray:
    """Pixels covered by an annotation of a novel class and by none of another class."""
    from segic_mix_data import _annotation_mask

    info = coco["images"][int(image_id)]
    h, w = info["height"], info["width"]
    novel_mask, other = np.zeros((h, w), bool), np.zeros((h, w), bool)
    for annotation in coco["annotations"].get(int(image_id), []):
        mask = _annotation_mask(annotation, h, w)
        if coco["class_of"][annotation["category_id"]] in novel:
            novel_mask |= mask
        else:
            other |= mask
    return novel_mask & ~other


@pytest.mark.parametrize("fold", [0, 1, 2, 3])
def test_no_novel_class_pixel_reaches_a_target_or_a_reference(workspace: dict, fold: int) -> None:
    from pipeline.data.folds import COCO_CLASS_NAMES, novel_classes
    from pipeline.data.folds import normalise_name

    raw = json.loads(Path(workspace["subset"]).read_text())
    categories = sorted(raw["categories"], key=lambda c: c["id"])
    coco = {"images": {i["id"]: i for i in raw["images"]}, "annotations": {},
            "class_of": {c["id"]: index for index, c in enumerate(categories)}}
    for annotation in raw["annotations"]:
        coco["annotations"].setdefault(annotation["image_id"], []).append(annotation)
    novel = set(novel_classes("coco20i", fold))
    novel_names = {normalise_name(COCO_CLASS_NAMES[c]) for c in novel}
    sampler, _ = make_sampler(workspace, fold)
    rows = sampler.epoch_table(0, 48).to_pylist()
    samples = sampler.resolve(rows)
    name_of_key = {}
    for part in sampler.parts:
        for class_id, key in enumerate(part.class_keys):
            name = normalise_name(part.class_names[class_id])
            assert (key == -1) == (name in novel_names)  # novel: never an instruction, a negative or queued
            if key >= 0:
                name_of_key[int(key)] = name
    seen = set()
    for sample in samples:
        part, row = sample["part"], sample["row"]
        seen.add(part.name)
        for class_id in sample["class_ids"]:
            assert normalise_name(part.class_names[class_id]) not in novel_names
        assert not {name_of_key[key] for key in sample["keys"] if key >= 0} & novel_names
        assert not {name_of_key[key] for key in sample["negative_classes"]} & novel_names
        for side, image_id, labels in (("target", row["image_id"], sample["target_labels"]),
                                       ("reference", row["reference_id"], sample["reference_labels"])):
            forbidden = torch.from_numpy(_novel_only(coco, image_id, novel))
            assert labels.shape[-2:] == forbidden.shape
            leaked = int(((labels == 1) & forbidden).sum())
            assert leaked == 0, f"fold {fold} {part.name} {side} {image_id}: {leaked} novel pixel(s)"
        # what the model sees is rendered from those masks: foreground only where they are
        assert sample["target_frame"].shape[0] == len(sample["keys"]) <= 10
    assert seen == {"coco_semantic", "ade20k", "coco_instances", "lvis"}


# ---------------------------------------------------------------------------------------------- streams
def test_tables_are_seeded_rank_shares_disjoint_and_batches_depend_on_their_rows_only(workspace: dict) -> None:
    from pipeline.training.epochs import rank_share

    sampler, _ = make_sampler(workspace)
    table = sampler.epoch_table(3, 64)
    assert table.equals(sampler.epoch_table(3, 64))  # a resumed run draws the same samples
    assert not table.equals(sampler.epoch_table(4, 64))
    shares = [rank_share(table, rank, 2) for rank in range(2)]
    ids = [row["episode_id"] for share in shares for row in share]
    assert sorted(ids) == list(range(64)) and len(shares[0]) == len(shares[1]) == 32
    first = shares[0][:4]
    a, b = sampler.build(first), sampler.build(first)
    assert torch.equal(a.target_masks, b.target_masks)
    assert torch.equal(a.features.target_backbone["layer4"], b.features.target_backbone["layer4"])
    # a row's sample is the same whatever batch it lands in (the resumed run re-chunks nothing, but a
    # different batch size or rank count must not change what a sample is)
    alone = sampler.build(first[1:2])
    n = alone.features.instructions.counts[0]
    assert torch.equal(alone.target_masks[0, :n], a.target_masks[1, :n])
    assert torch.equal(alone.features.reference_backbone["layer4"][0], a.features.reference_backbone["layer4"][1])


# ---------------------------------------------------------------------------------------------- geometry
def test_mask_renderer_equals_apply_view_to_mask(workspace: dict) -> None:
    from pipeline.training.segic_mixed import render_masks
    from pipeline.training.views import apply_view_to_mask, plan_views, segic_instance_config, segic_semantic_config

    data = fold_data(workspace, 0)
    image_id = data.source.image_ids()[3]
    instances = data.source.instance_masks(image_id)
    masks = torch.from_numpy(np.stack([m.astype(np.uint8) for _, m in instances]))
    h, w = masks.shape[1:]
    plan = plan_views({str(image_id): (h, w)}, 6, 0, segic_semantic_config(200))
    plan += plan_views({str(image_id): (h, w)}, 6, 1, segic_instance_config(160))
    for view in plan:
        for fill in (0, 255):
            ours = render_masks(masks, view, fill)
            for index in range(len(masks)):
                assert np.array_equal(ours[index].numpy(), apply_view_to_mask(masks[index].numpy(), view, fill=fill))


def test_warped_out_cells_are_ignored_in_targets_and_missing_in_references(workspace: dict) -> None:
    sampler, _ = make_sampler(workspace, warp_prob=1.0)
    rows = [row for row in sampler.epoch_table(0, 40).to_pylist() if row["kind"] == "semantic"][:8]
    samples = sampler.resolve(rows)
    found = 0
    for row, sample in zip(rows, samples):
        part = sample["part"]
        rng = np.random.Generator(np.random.PCG64(int(row["sample_seed"])))
        side = sampler._side(part, row["image_id"], row["target_view"], row["target_flip"], True, rng)
        raw = sampler._read([(part, side.store_id)])[0]
        features, valid = side.features(raw, "layer4")
        assert torch.equal(features, sample["target_features"])
        invalid = ~sampler._cells_to_frame(valid)
        assert bool((sample["target_frame"][:, invalid] == 255).all())
        assert torch.count_nonzero(features[:, ~valid]) == 0
        found += int(invalid.any())
    assert found  # some fresh views show content no cached view has


def test_batches_carry_instructions_negatives_and_keys(workspace: dict) -> None:
    sampler, model = make_sampler(workspace)
    rows = sampler.epoch_table(1, 64).to_pylist()[:12]
    batch = sampler.build(rows)
    features, instructions = batch.features, batch.features.instructions
    b, n = batch.target_masks.shape[:2]
    assert b == 12 and instructions.masks.shape == (12, n, 1, 64, 64) and max(instructions.counts) == n <= 10
    assert torch.equal(features.reference_masks, instructions.masks[:, 0].float())
    for i, row in enumerate(rows):
        count = instructions.counts[i]
        assert bool((batch.target_masks[i, count:] == 255).all())  # padding slots: no valid pixel
        if row["kind"] == "semantic":
            assert count == 1 and instructions.classes[i, 0] >= 0 and len(instructions.negative_classes[i]) > 0
            assert int(instructions.classes[i, 0]) not in instructions.negative_classes[i]
        else:
            assert bool((instructions.classes[i] == -1).all()) and instructions.negative_classes[i] == ()
    model.train()
    out = model(features)
    losses = model.loss(out, (batch.target_masks == 1).float(), (batch.target_masks != 255).float())
    assert torch.isfinite(losses["loss"]) and out["instruction_logits"].shape[:2] == (12, n)
    model.after_step(out, features)
    assert len(model.queue) == sum(1 for row in rows if row["kind"] == "semantic")


def test_a_missing_store_is_named_with_the_way_to_build_it(workspace: dict) -> None:
    from pipeline.training.segic_mixed.stores import prepare_stores

    cfg = workspace["cfg"]
    moved = cfg.replace(mix=replace(cfg.mix, sources=(MixSource("ade20k", "ade20k_semantic", images=str(workspace["root"] / "ade"),
                                                                store=str(workspace["root"] / "absent"), views=1),)))
    with pytest.raises(DataError, match=r"absent of mix source\(s\) ade20k does not exist yet.*--extract-missing"):
        prepare_stores(moved, fold_data(workspace, 0), extract_missing=False)


# ---------------------------------------------------------------------------------------------- FSS-1000
FSS_WEIGHT = 1.5


@pytest.fixture(scope="module")
def fss_workspace(workspace: dict, coco_mini_dir: Path) -> dict:
    """The derived mix plus an FSS-1000-format copy of the same images (its trn classes) as a fifth
    source, in a store of its own (its ``"<class>/<n>"`` ids are not COCO's), with one cached view."""
    from segic_mix_data import derive_fss1000, extract_in_process

    root = workspace["root"]
    fss = derive_fss1000(workspace["subset"], coco_mini_dir / "images", root / "fss")
    source = MixSource("fss1000", "fss1000_semantic", weight=FSS_WEIGHT, images=str(fss), store=str(root / "stores" / "fss"),
                       views=1, feature_dataset="mini_fss")
    cfg = workspace["cfg"]
    cfg = cfg.replace(mix=replace(cfg.mix, sources=cfg.mix.sources + (source,)))
    prepare(cfg, fold_data(workspace, 0), root, extract=extract_in_process)
    return {**workspace, "cfg": cfg, "fss": fss}


def test_fss1000_kind_round_trips_and_reads_the_training_split(fss_workspace: dict) -> None:
    from pipeline.training.views import view_id

    cfg = fss_workspace["cfg"]
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    source = cfg.mix.sources[-1]
    assert source.semantic and not source.coco and source.split == "trn"  # the default "training" reads as trn
    assert source.class_list == str(fss_workspace["fss"] / "trn.txt")
    assert MixSource.from_dict(source.to_dict()) == source == replace(source, split="trn")
    assert MixSource("f", "fss1000_semantic", images="x", annotations="splits/fss/val.txt").class_list == "splits/fss/val.txt"
    with pytest.raises(ConfigError, match="FSS-1000 split must be one of"):
        MixSource("f", "fss1000_semantic", images="x", split="validation")
    with pytest.raises(ConfigError, match="needs its images"):
        MixSource("f", "fss1000_semantic")
    sampler, _ = make_sampler(fss_workspace)
    part = sampler.parts[sampler.part_index["fss1000"]]
    trn = (fss_workspace["fss"] / "trn.txt").read_text().split()
    assert part.class_names == sorted(trn) and {i.split("/")[0] for i in part.images} <= set(trn)
    # plain images are stored under their "<class>/<n>" id, views under the "/"-free view id
    image = part.images[0]
    assert "/" in image and view_id(image, 0) == image.replace("/", "--") + "_v0"
    assert image in part.store and view_id(image, 0) in part.store


def test_dataset_shares_match_the_weights_with_fss1000_and_its_samples_pair_two_images_of_a_class(fss_workspace: dict) -> None:
    from scipy.stats import chisquare

    sampler, model = make_sampler(fss_workspace)
    n = 8000
    table = sampler.epoch_table(0, n)
    sources = table.column("source").to_pylist()
    names = [part.name for part in sampler.parts]
    weights = np.array(WEIGHTS + (FSS_WEIGHT,))
    observed = np.array([sources.count(name) for name in names])
    assert names[-1] == "fss1000" and observed.sum() == n
    assert chisquare(observed, weights / weights.sum() * n).pvalue > 1e-3, (observed, weights)
    assert chisquare(observed, np.full(len(names), n / len(names))).pvalue < 1e-6
    # the authors' DatasetFSS: an image of the split uniformly, then ANOTHER image of its folder
    part = sampler.parts[-1]
    rows = [row for row in table.to_pylist() if row["source"] == "fss1000"]
    for row in rows:
        folder = part.class_names[row["class_id"]]
        assert row["image_id"] != row["reference_id"] and row["kind"] == "semantic"
        assert row["image_id"].split("/")[0] == row["reference_id"].split("/")[0] == folder
    drawn = [row["image_id"] for row in rows]
    counts = np.array([drawn.count(image) for image in part.images])
    assert chisquare(counts).pvalue > 1e-3
    # FSS-1000 labels one class per image: no queue negatives (nor in the authors' DatasetFSS)
    batch = sampler.build(rows[:4])
    instructions = batch.features.instructions
    assert instructions.negative_classes == ((),) * 4 and bool((instructions.classes[:, 0] >= 0).all())
    model.train()
    out = model(batch.features)
    losses = model.loss(out, (batch.target_masks == 1).float(), (batch.target_masks != 255).float())
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("fold", [0, 1, 2, 3])
def test_no_novel_class_pixel_reaches_an_fss1000_target_or_reference(fss_workspace: dict, fold: int) -> None:
    from pipeline.data.folds import COCO_CLASS_NAMES, novel_classes
    from pipeline.data.folds import normalise_name
    from pipeline.report import SkipReport
    from pipeline.training.segic_mixed.sources import build_parts

    raw = json.loads(Path(fss_workspace["subset"]).read_text())
    coco = {"images": {i["id"]: i for i in raw["images"]}, "annotations": {},
            "class_of": {c["id"]: index for index, c in enumerate(sorted(raw["categories"], key=lambda c: c["id"]))}}
    for annotation in raw["annotations"]:
        coco["annotations"].setdefault(annotation["image_id"], []).append(annotation)
    coco_ids = json.loads((fss_workspace["fss"] / "coco_ids.json").read_text())
    novel = set(novel_classes("coco20i", fold))
    novel_names = {normalise_name(COCO_CLASS_NAMES[c]) for c in novel}
    sampler, _ = make_sampler(fss_workspace, fold)
    part = sampler.parts[sampler.part_index["fss1000"]]
    named_novel = {c for c, name in enumerate(part.class_names) if normalise_name(name) in novel_names}
    assert named_novel  # the check has teeth: the trn split holds classes named like this fold's novel ones
    assert {c for c, key in enumerate(part.class_keys) if key < 0} == named_novel
    assert not named_novel & part.usable_classes
    report = SkipReport("segic mix")
    build_parts(fss_workspace["cfg"].replace(fold=fold), fold_data(fss_workspace, fold), report)
    assert report.counts["fss1000: class named like a novel COCO class (novel_by_name)"] == len(named_novel)
    rows = [row for row in sampler.epoch_table(0, 200).to_pylist() if row["source"] == "fss1000"]
    assert len(rows) >= 20
    for row, sample in zip(rows, sampler.resolve(rows)):
        assert normalise_name(part.class_names[sample["class_ids"][0]]) not in novel_names
        assert sample["negative_classes"] == ()
        for side, image_id, labels in (("target", row["image_id"], sample["target_labels"]),
                                       ("reference", row["reference_id"], sample["reference_labels"])):
            forbidden = torch.from_numpy(_novel_only(coco, coco_ids[image_id], novel))
            assert labels.shape[-2:] == forbidden.shape and int((labels == 1).sum()) > 0
            leaked = int(((labels == 1) & forbidden).sum())
            assert leaked == 0, f"fold {fold} fss1000 {side} {image_id}: {leaked} novel pixel(s)"


def test_coco_excluded_leaves_the_ade20k_lvis_and_fss1000_sources(fss_workspace: dict, mobilenet_v2_weights: Path) -> None:
    import argparse

    from pipeline.training.commands import add_train_arguments, configs_from_args

    excluded, _ = make_sampler(fss_workspace, coco_excluded=True)
    assert [part.name for part in excluded.parts] == ["ade20k", "lvis", "fss1000"]
    assert set(excluded.epoch_table(0, 400).column("source").to_pylist()) == {"ade20k", "lvis", "fss1000"}
    parser = argparse.ArgumentParser()
    add_train_arguments(parser, "coco20i")
    mix = {"sources": [{"name": "coco", "kind": "coco_semantic"},
                       {"name": "fss", "kind": "fss1000_semantic", "images": "FSS-1000", "annotations": "splits/trn.txt"}]}
    args = parser.parse_args([
        "--method", "segic", "--sampler", "segic_mixed", "--mix", json.dumps(mix), "--coco-excluded",
        "--annotations", str(fss_workspace["subset"]), "--images", "imgs", "--backbone-checkpoint", str(mobilenet_v2_weights),
    ])
    base, _ = configs_from_args(args, "coco20i")
    (fss,) = base.mix.active_sources()
    assert fss.name == "fss" and fss.class_list == str(Path("splits/trn.txt").resolve())


def test_a_missing_fss1000_root_or_class_list_is_one_line_before_any_work(fss_workspace: dict, tmp_path: Path) -> None:
    from pipeline.training.job import _check_paths
    from pipeline.training.segic_mixed.stores import prepare_stores

    def no_extraction(*_, **__):
        raise AssertionError("extraction started")

    cfg = fss_workspace["cfg"]
    absent = MixSource("fss1000", "fss1000_semantic", images=str(tmp_path / "FSS-1000"), store=str(tmp_path / "store"), views=1)
    moved = cfg.replace(mix=replace(cfg.mix, sources=cfg.mix.sources[:-1] + (absent,)))
    with pytest.raises(DataError, match=r"^mix source 'fss1000' \(fss1000_semantic\): FSS-1000 root not found: \S+FSS-1000$"):
        prepare_stores(moved, fold_data(fss_workspace, 0), extract_missing=True, extract=no_extraction)
    with pytest.raises(DataError, match="FSS-1000 root not found"):
        _check_paths(moved)  # the job checks it with --annotations / --images, before any fold data is read
    (tmp_path / "FSS-1000" / "apple").mkdir(parents=True)
    with pytest.raises(DataError, match=r"^mix source 'fss1000' \(fss1000_semantic\): FSS-1000 trn class list not found: \S+trn.txt$"):
        prepare_stores(moved, fold_data(fss_workspace, 0), extract_missing=True, extract=no_extraction)
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------------------------- training
def _short_run_config(workspace: dict, tmp_path: Path, run_name: str):
    return workspace["cfg"].replace(
        mix=replace(workspace["cfg"].mix, samples_per_epoch=96),
        recipe_overrides=dict(batch_size=8, epochs=4, lr=5e-4), val_episodes=8, test_episodes=40,
        evaluate_untrained=True, baselines=("prototype_matching",), log_every=1,
        storage_path=str(tmp_path / "ray"), run_name=run_name,
    )


@pytest.fixture(scope="module")
def short_run(workspace: dict) -> dict:
    """SegIC through THE training job (Ray Train, 2 workers, MLflow, checkpoints), in this process."""
    from pipeline.locations import resolve_root
    from pipeline.training.job import JobOptions, run_training

    tmp_path = workspace["root"] / "short_run"
    tmp_path.mkdir()
    cfg = _short_run_config(workspace, tmp_path, "segic-mix")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = JobOptions(folds=(0,), tracking_uri=uri, ray_init_kwargs={"num_cpus": 2, "include_dashboard": False},
                         root=resolve_root(str(tmp_path)))
    import ray

    started_here = not ray.is_initialized()
    try:
        summary = run_training(cfg, options)
    finally:  # the job starts an embedded Ray in this process: later tests start their own
        if started_here and ray.is_initialized():
            ray.shutdown()
    return {"cfg": cfg, "uri": uri, "summary": summary, "root": tmp_path}


def _metric_series(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _last_training_state(run_dir: Path) -> dict:
    last = max(run_dir.glob("checkpoint_step*"))
    return torch.load(last / "state.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_short_segic_run_through_the_training_job_lowers_the_loss_and_lands_in_mlflow(short_run: dict) -> None:
    """The loss falls, and the trained, untrained and prototype-matching rows are tested on the same
    fold-0 episodes (re-running the configuration finds its run: the kill-and-resume test below).

    Known gap (docs/segic_training.md): at this size (40 images, 64-pixel inputs, 48 steps) the
    trained model does NOT beat the untrained one on novel classes, so that is reported, not
    asserted here; the longer run of the docs measures it."""
    from pipeline.training.job import format_summary

    print(format_summary(short_run["summary"]))
    fold = short_run["summary"]["folds"][0]
    losses = [value for _, value in _metric_series(short_run["uri"], fold["run_id"], "train/loss")]
    assert len(losses) == 4 * 96 // 8
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    assert {"test_miou", "test_untrained_miou", "test_prototype_matching_miou"} <= set(fold)


@pytest.mark.slow
def test_a_killed_segic_run_resumes_with_the_same_queue_and_sample_stream(workspace: dict, short_run: dict) -> None:
    """The same run in a real driver process, SIGKILLed (with the local Ray it started) after its
    first checkpoint, then started again: it resumes under the same MLflow run, logs every step once,
    and from the checkpoint on trains on exactly the batches and with exactly the negative queue of
    the uninterrupted run: every step's loss equals it, and so do the final queue contents of both
    ranks and the final weights."""
    import os
    import subprocess
    import sys

    from kill_process import kill_group_when

    root = short_run["root"]
    cfg = short_run["cfg"].replace(run_name="segic-killed")
    config_file = root / "segic-killed.json"
    config_file.write_text(json.dumps(cfg.to_dict()))
    command = [sys.executable, str(Path(__file__).parent / "segic_train_process.py"), str(config_file), short_run["uri"]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = Path(cfg.storage_path) / f"{cfg.run_name}-fold0"
    kill_group_when(command, lambda: any(run_dir.glob("checkpoint_step*")), "the first checkpoint", env=env)
    killed_at = max(int(p.name.removeprefix("checkpoint_step")) for p in run_dir.glob("checkpoint_step*"))
    assert killed_at < 48, "killed mid-run"
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]

    from pipeline.training.tracking import search_fold_runs

    runs = search_fold_runs(short_run["uri"], cfg.experiment, [cfg.run_name])
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED", "the restart resumed under the same child run"
    resumed = _metric_series(short_run["uri"], runs[0]["run_id"], "train/loss")
    straight = _metric_series(short_run["uri"], short_run["summary"]["folds"][0]["run_id"], "train/loss")
    assert [step for step, _ in resumed] == list(range(1, 49))  # every step once: no gap, no duplicate
    np.testing.assert_allclose([v for _, v in resumed], [v for _, v in straight], rtol=1e-5, atol=1e-6)

    mine = _last_training_state(run_dir)
    reference = _last_training_state(Path(short_run["cfg"].storage_path) / "segic-mix-fold0")
    assert mine["progress"] == reference["progress"]
    assert len(mine["model_extra"]) == len(reference["model_extra"]) == 2  # one queue per rank
    for ours, theirs in zip(mine["model_extra"], reference["model_extra"]):
        queue, expected = ours["negative_queue"], theirs["negative_queue"]
        assert queue["classes"] == expected["classes"] and queue["classes"], "a non-empty queue, restored"
        for a, b in zip(queue["features"], expected["features"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, value in reference["model"].items():
        torch.testing.assert_close(mine["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
