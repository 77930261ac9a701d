"""What the driver writer reports: the bar's failed= counts every shard so far, and a shard's
``duration_s`` is the wall time the run spent on it, not how long its tar was open (no Ray)."""

from __future__ import annotations

import json
import time

import numpy as np

from pipeline.extraction.chunks import chunk_rows
from pipeline.extraction.shard_sink import write_rows
from pipeline.store import StoreBuilder, resolve_location, sorted_items

from test_store_readwrite import KEY, SHAPES, features_of

CHUNK_SECONDS = 0.3  # what decode + encode of one chunk "takes" before its row reaches the driver


class FakeBar:
    def __init__(self, **_):
        self.postfixes: list[dict] = []
        self.n = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, count):
        self.n += count

    def set_postfix(self, refresh=True, **values):
        self.postfixes.append(values)


def test_failed_count_is_cumulative_and_durations_cover_the_shard(tmp_path):
    items = sorted_items([(i, f"/data/{i}.jpg") for i in range(1, 7)])
    builder = StoreBuilder(resolve_location(str(tmp_path / "store")), KEY, SHAPES, items, 3)
    pending = builder.prepare()
    failed_ids = {"2", "5"}  # one in each shard

    def rows():
        for row in chunk_rows(pending, batch_size=3):  # one chunk per shard
            time.sleep(CHUNK_SECONDS)
            ids = json.loads(row["image_ids"])
            ok = [i for i in ids if i not in failed_ids]
            failures = [{"image_id": i, "path": f"/data/{i}.jpg", "reason": "unreadable"} for i in ids if i in failed_ids]
            encoded = dict(row, ok_ids=json.dumps(ok), failures=json.dumps(failures))
            for name in SHAPES:
                encoded[f"feature_{name}"] = np.stack([features_of(i)[name] for i in ok]).tobytes()
            yield encoded

    bar = FakeBar()
    started = time.perf_counter()
    write_rows(rows(), builder, {spec.index: spec for spec in pending}, builder.feature_shapes, "float16", 6,
                False, None, lambda **kwargs: bar, started=started)
    builder.finalize()
    assert bar.n == 6 and bar.postfixes[-1]["failed"] == 2  # both shards' failures, not the last one's
    durations = [json.loads((tmp_path / "store" / f"shard-00000{i}_stats.json").read_text())["duration_s"]
                 for i in range(2)]
    assert all(duration >= CHUNK_SECONDS for duration in durations), durations
    assert sum(durations) <= time.perf_counter() - started
