"""A store on S3: written, random-accessed, streamed and verified through a local moto S3 server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cluster_helpers import free_port
from environment import import_or_missing, missing
from pipeline.store import StoreMismatchError, open_store, verify_store

from test_store_readwrite import KEY, features_of, write_store

pafs = import_or_missing("pyarrow.fs")


@pytest.fixture(scope="module")
def s3_endpoint():
    """``127.0.0.1:<port>`` of a moto S3 server (loopback only) with the bucket ``refseg-test``."""
    moto_server = Path(sys.executable).with_name("moto_server")
    if not moto_server.exists():
        missing("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    process = subprocess.Popen(
        [str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        s3_client(f"127.0.0.1:{port}", allow_bucket_creation=True).create_dir("refseg-test")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def s3_client(endpoint: str, **options):
    return pafs.S3FileSystem(
        endpoint_override=endpoint, scheme="http", access_key="test", secret_key="test", region="us-east-1", **options
    )


@pytest.fixture(scope="module")
def s3_filesystem(s3_endpoint):
    return s3_client(s3_endpoint, allow_bucket_creation=True)


def test_store_round_trip_on_s3(s3_filesystem):
    uri = "s3://refseg-test/stores/toy"
    write_store(uri, list(range(1, 8)), per_shard=3, failed=(2,), filesystem=s3_filesystem)
    names = {info.base_name for info in s3_filesystem.get_file_info(pafs.FileSelector("refseg-test/stores/toy"))}
    assert {"manifest.json", "index.parquet", "_plan.json", "shard-000002.tar", "shard-000002_stats.json"} <= names
    assert not any("partial" in name or name.endswith(".tmp") for name in names)

    store = open_store(uri, expect=KEY, filesystem=s3_filesystem)
    assert len(store) == 6 and store.manifest.num_failed == 1
    for image_id in ("1", "5", "7"):
        got = store.get(image_id)
        assert all(np.array_equal(got[name], value) for name, value in features_of(image_id).items())
    streamed = {sample["image_id"]: sample for sample in store.stream()}
    assert sorted(streamed, key=int) == ["1", "3", "4", "5", "6", "7"]
    assert np.array_equal(streamed["6"]["embed"], features_of("6")["embed"])
    assert verify_store(uri, filesystem=s3_filesystem, allow_failed=True).ok
    with pytest.raises(StoreMismatchError, match="dataset: store has 'toy', requested 'other'"):
        open_store(uri, expect=type(KEY)(**{**KEY.to_dict(), "dataset": "other"}), filesystem=s3_filesystem)
