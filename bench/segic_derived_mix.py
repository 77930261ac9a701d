"""Write SegIC's four-source mix over coco_mini for a real run of ``jobs/train_segic.py`` here.

No ADE20k or LVIS exist on the development machines: this writes ADE20k- and LVIS-format copies of
coco_mini's real images and annotations (``tests/segic_mix_data.py``, as the tests and
``bench/bench_segic_mixed.py`` do) and a ``mix.json`` of the four kinds SegIC trains on (COCO
semantic, ADE20k semantic, COCO instances, LVIS instances; uniform weights; ``--views`` cached
views for the instance sources in their own store; warps with p = 0.3):

    python bench/segic_derived_mix.py --shared ../shared --out outputs/segic_mix
    python jobs/train_segic.py --mix outputs/segic_mix/mix.json --extract-missing ...   # docs/segic_training.md

The derived sources repeat the COCO images under other formats and names: they exercise every
path of the mix on real pixels; they add no new images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # segic_mix_data: the derived ADE20k / LVIS copies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "segic_mix")
    parser.add_argument("--views", type=int, default=2, help="cached views per image of the instance sources")
    args = parser.parse_args()
    coco = args.shared / "data" / "coco_mini"
    if not (coco / "instances.json").is_file():
        parser.error(f"no coco_mini under {args.shared}/data (pass --shared)")
    from segic_mix_data import derive_ade20k, derive_lvis

    out = args.out.resolve()
    ade, lvis_root = out / "ade20k", out / "lvis"
    if not (ade / "objectInfo150.csv").exists():
        derive_ade20k(coco / "instances.json", coco / "images", ade)
    lvis = lvis_root / "lvis_v1_train.json"
    if not lvis.exists():
        derive_lvis(coco / "instances.json", coco / "images", lvis_root)
    instances = str(out / "stores" / "instances")
    mix = {
        "sources": [
            {"name": "coco_semantic", "kind": "coco_semantic"},
            {"name": "ade20k", "kind": "ade20k_semantic", "images": str(ade)},
            {"name": "coco_instances", "kind": "coco_instances", "store": instances, "views": args.views,
             "feature_dataset": "coco_mini_instances"},
            {"name": "lvis", "kind": "lvis_instances", "annotations": str(lvis), "images": str(lvis_root),
             "store": instances, "views": args.views, "feature_dataset": "coco_mini_instances"},
        ],
        "warp_prob": 0.3,
    }
    path = out / "mix.json"
    path.write_text(json.dumps(mix, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
