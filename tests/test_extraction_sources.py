"""Image lists for extraction (no Ray)."""

from __future__ import annotations

import argparse

import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.extraction.commands import add_extract_arguments, config_from_args
from pipeline.extraction.config import ExtractionConfig, default_batch_size
from pipeline.extraction.sources import coco_items, folder_items, items_from_args, list_file_items


@pytest.mark.real_data
def test_coco_items_cover_every_image(coco_mini_dir):
    items = coco_items(coco_mini_dir / "instances.json", coco_mini_dir / "images")
    assert len(items) == 543 and len({item.image_id for item in items}) == 543
    assert all(item.path.endswith(".jpg") for item in items)


def test_folder_and_list_sources(tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    found = [(i.image_id, i.path) for i in folder_items(tmp_path)]
    assert found == [("a", str(tmp_path / "a.png")), ("b", str(tmp_path / "b.jpg"))]
    listing = tmp_path / "list.tsv"
    listing.write_text("# id\tpath\n7\tb.jpg\n\nx_1\tsub/c.jpg\n")
    listed = [(i.image_id, i.path) for i in list_file_items(listing)]
    assert listed == [("7", str(tmp_path / "b.jpg")), ("x_1", str(tmp_path / "sub/c.jpg"))]
    listing.write_text("7 b.jpg\n")
    with pytest.raises(DataError, match="list.tsv:1"):
        list_file_items(listing)
    with pytest.raises(ConfigError, match="needs --image-dir"):
        items_from_args(str(listing), None, None)
    with pytest.raises(DataError, match="not a COCO-style json"):
        coco_items(listing, tmp_path)


def test_cli_arguments_become_one_serialisable_config():
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    args = parser.parse_args([
        "--output", "s3://b/p", "--dataset", "coco2014", "--encoder", "sam_vit_b", "--checkpoint", "sam.pth",
        "--encoder-options", '{"preprocessing": "sam_longest1024_pad"}', "--image-dir", "imgs", "--batch-size", "4",
    ])
    config = config_from_args(args)
    assert config.encoder_options == {"preprocessing": "sam_longest1024_pad"} and config.batch_size == 4
    assert '"output": "s3://b/p"' in config.to_json()
    with pytest.raises(ConfigError, match="not valid JSON"):
        bad_json = ["--output", "o", "--dataset", "d", "--encoder", "e", "--encoder-options", "{"]
        config_from_args(parser.parse_args(bad_json))
    with pytest.raises(ConfigError, match="batch_size"):
        config_from_args(parser.parse_args(["--output", "o", "--dataset", "d", "--encoder", "e", "--batch-size", "0"]))


def test_precision_compile_and_the_default_batch_reach_the_config():
    parser = argparse.ArgumentParser()
    add_extract_arguments(parser)
    base = ["--output", "o", "--dataset", "d", "--encoder", "sam_vit_h"]
    default = config_from_args(parser.parse_args(base))
    assert (default.batch_size, default.precision, default.compile) == (None, "float32", False)
    chosen = config_from_args(parser.parse_args([*base, "--precision", "bfloat16", "--compile"]))
    assert (chosen.precision, chosen.compile) == ("bfloat16", True)
    assert '"precision": "bfloat16"' in chosen.to_json()
    with pytest.raises(ConfigError, match="precision must be one of"):
        ExtractionConfig(output="o", dataset="d", encoder="e", precision="float16")
    # No batch given: 8 on CPUs (as before), the encoder's own on GPUs.
    assert default_batch_size("sam_vit_h", on_gpu=False) == 8
    assert default_batch_size("sam_vit_h", on_gpu=True) == 16 and default_batch_size("sam_vit_b", on_gpu=True) == 32
    assert default_batch_size("dinov2_vitl14", on_gpu=True) == 16 and default_batch_size("dinov2_vits14", on_gpu=True) == 32
    assert default_batch_size("some_new_encoder", on_gpu=True) == 16


def test_an_empty_image_source_is_refused_naming_it(tmp_path, capsys):
    """Issue 20: an empty image folder said "the image list is empty" without naming the folder."""
    from pipeline.cli import main

    empty = tmp_path / "images"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"image folder {empty} holds no image file"):
        folder_items(empty)
    listing = tmp_path / "list.tsv"
    listing.write_text("# id\tpath\n\n")
    with pytest.raises(DataError, match=f"image list {listing} lists no image"):
        list_file_items(listing)
    annotations = tmp_path / "instances.json"
    annotations.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DataError, match=f"{annotations}: its 'images' list is empty"):
        coco_items(annotations, empty)
    code = main(["extract", "--output", str(tmp_path / "store"), "--dataset", "d", "--encoder", "mobilenet_v2",
                 "--allow-random-init", "--image-dir", str(empty)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        f"refseg extract: error: image folder {empty} holds no image file (.jpg, .jpeg, .png, .bmp, .webp) directly "
        "in it: nothing to extract (sub-folders are not searched)"]
    assert not (tmp_path / "store").exists()
