"""Where extracted chunks land: the driver writes them into shard tars, or collects actors' finished shards."""

from __future__ import annotations

import json
import time

from pipeline.errors import DataError
from pipeline.extraction.chunks import write_chunk
from pipeline.store.shard_writer import ShardResult


def collect_shard_rows(rows, location, total, progress, on_shard_done, tqdm) -> None:
    """``writer="actors"``: shards arrive finished (any order); report them."""
    failed = 0
    with tqdm(total=total, unit="img", desc="extract", disable=not progress, smoothing=0.1) as bar:
        for row in rows:
            result = ShardResult.from_json(row["result"], location.join(f"shard {row['shard']}"))
            failed += len(result.failures)
            bar.update(result.count)
            bar.set_postfix(shard=result.shard, failed=failed, refresh=False)  # failed so far, all shards
            if on_shard_done is not None:
                on_shard_done(result)


def write_rows(
    rows, builder, specs, feature_shapes, dtype, total, progress, on_shard_done, tqdm, started: float | None = None
) -> None:
    """Stream ordered chunk rows into their shard tars; publish each shard after its last chunk.

    A shard's ``duration_s`` is the wall time the run spent on it: from the previous shard's publish
    (the first shard: from ``started``, the pipeline's start, so it includes actor start-up) to its
    own publish. Decode and encode of a shard overlap the previous shard's writes, so these add up to
    the pipeline's wall time instead of measuring only how long the tar was open.
    """
    writer = None
    current = None
    failed = 0
    shard_started = time.perf_counter() if started is None else started
    with tqdm(total=total, unit="img", desc="extract", disable=not progress, smoothing=0.1) as bar:
        try:
            for row in rows:
                shard = int(row["shard"])
                if shard != current:
                    if writer is not None:
                        raise DataError(f"shard {current} ended without its last chunk (rows out of order)")
                    current, writer = shard, builder.writer(specs[shard], started=shard_started)
                bar.update(write_chunk(writer, row, feature_shapes, dtype))
                failed += len(json.loads(row["failures"]))
                bar.set_postfix(shard=specs[shard].name, failed=failed, refresh=False)  # failed so far, all shards
                if bool(row["last"]):
                    result = writer.publish()
                    writer, current = None, None
                    shard_started = time.perf_counter()
                    if on_shard_done is not None:
                        on_shard_done(result)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    if writer is not None:
        raise DataError(f"shard {current} was not completed (its last chunk never arrived)")
