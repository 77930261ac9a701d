"""One SAM store and one backbone store, extracted once, feed two methods' data paths unchanged."""

from __future__ import annotations

import hashlib

import pytest
import torch

from environment import import_or_missing
from pipeline.data import CocoInstances, MaskCache
from pipeline.episodes import build_episode_manifest
from pipeline.extraction import RegistryEncoder, extract_store
from pipeline.extraction.sources import coco_items
from pipeline.store import open_store
from pipeline.training import EpisodeFeatureBuilder
from refseg_models import build_model
from refseg_models.encoders import build_encoder

pytestmark = [pytest.mark.real_data, pytest.mark.real_weights]
ray = import_or_missing("ray")

MOBILENET_CHANNELS = (32, 96, 1280)


def _tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def stores(coco_mini_dir, mobilenet_v2_weights, tmp_path_factory, tiny_sam):
    root = tmp_path_factory.mktemp("stores")
    coco = CocoInstances(coco_mini_dir / "instances.json", coco_mini_dir / "images", verbose=False)
    pairs = {2: coco.images_of_class(2)[:3], 16: coco.images_of_class(16)[:3]}  # car, dog
    wanted = {str(image_id) for images in pairs.values() for image_id in images}
    items = [item for item in coco_items(coco_mini_dir / "instances.json", coco_mini_dir / "images")
             if item.image_id in wanted]
    torch.manual_seed(0)
    sam_weights = root / "sam_vit_tiny_test.pth"  # no real SAM here: a checkpoint this test writes
    from refseg_models.modeling.sam_decoder import build_sam_decoder

    # a full SAM-layout checkpoint: image encoder + prompt encoder / mask decoder (random weights)
    state = {**build_encoder("sam_vit_tiny", allow_random_init=True).state_dict(), **build_sam_decoder().state_dict()}
    torch.save(state, sam_weights)
    sam_encoder = RegistryEncoder("sam_vit_tiny", str(sam_weights))
    backbone_encoder = RegistryEncoder("mobilenet_v2", str(mobilenet_v2_weights))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, encoder in (("sam", sam_encoder), ("mobilenet", backbone_encoder)):
            summary = extract_store(items, str(root / name), encoder, "coco_mini", batch_size=3, progress=False)
            assert summary.written == len(items) and summary.failed == 0
    finally:
        ray.shutdown()
    manifest = build_episode_manifest(pairs, dataset="coco_mini", fold=0, split="train", n_episodes=4, shot=2, seed=3)
    return {"root": root, "coco": coco, "manifest": manifest, "sam_weights": sam_weights,
            "mobilenet_weights": mobilenet_v2_weights}


def test_two_methods_consume_the_same_stores_unchanged(stores):
    root = stores["root"]
    before = {name: _tree_digest(root / name) for name in ("sam", "mobilenet")}
    sam_store = open_store(str(root / "sam"))
    backbone_store = open_store(str(root / "mobilenet"))
    backbone = build_encoder("mobilenet_v2", stores["mobilenet_weights"])
    masks = MaskCache(stores["coco"])
    rows = stores["manifest"].to_pylist()

    torch.manual_seed(0)
    vrp_sam = build_model("vrp_sam", backbone_channels=MOBILENET_CHANNELS, sam_checkpoint=stores["sam_weights"]).eval()
    fcp = build_model("fcp", backbone_channels=MOBILENET_CHANNELS, sam_checkpoint=stores["sam_weights"]).eval()
    providers = dict(sam=sam_store, backbone_features=backbone_store, backbone=backbone)
    vrp_batch = EpisodeFeatureBuilder.for_method(vrp_sam, masks, **providers)(rows)
    fcp_batch = EpisodeFeatureBuilder.for_method(fcp, masks, **providers)(rows)
    with torch.no_grad():
        vrp_out = vrp_sam(vrp_batch.features)
        fcp_out = fcp(fcp_batch.features)
    for out in (vrp_out, fcp_out):
        assert out["mask_logits"].shape == (4, 1, 512, 512)
        assert torch.isfinite(out["mask_logits"]).all()

    # both paths read the very same cached tensors
    assert torch.equal(vrp_batch.features.target_sam, fcp_batch.features.target_sam)
    assert torch.equal(vrp_batch.features.reference_backbone["layer3"], fcp_batch.features.reference_backbone["layer3"])
    first_query = rows[0]["query_id"]
    stored = torch.from_numpy(sam_store.get(first_query)["image_embedding"].copy()).float()
    assert torch.equal(vrp_batch.features.target_sam[0], stored)
    reference = torch.from_numpy(sam_store.get(rows[0]["support_ids"][1])["image_embedding"].copy()).float()
    assert torch.equal(fcp_batch.features.reference_sam[0, 1], reference)
    assert vrp_batch.features.reference_sam is None  # VRP-SAM never reads reference embeddings
    assert vrp_batch.target_masks.shape == (4, 512, 512)
    assert (vrp_batch.features.reference_masks.flatten(1).sum(1) > 0).all()

    after = {name: _tree_digest(root / name) for name in ("sam", "mobilenet")}
    assert after == before
