"""One writer per store, with real second processes: a live run is refused naming the holder and
its partial tar survives; a killed run's lease is taken over with a message and only dead runs'
scratch is removed (local stores, and object storage on a loopback moto S3 server, whose killed
runs leave their temporary shard in the machine's temp dir)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.store import StoreBuilder, open_store, resolve_location, sorted_items, verify_store
from pipeline.store.lease import LEASE_NAME, RunIdentity, StoreLease, StoreLockedError, make_scratch_dir

from test_store_readwrite import KEY, SHAPES, features_of
from test_store_s3 import s3_client, s3_endpoint  # noqa: F401  (module-scoped moto S3 server fixture)

HELPER = Path(__file__).resolve().parent / "store_writer_process.py"
ITEMS = sorted_items([(i, f"/data/{i}.jpg") for i in range(1, 8)])


class Holder:
    """The helper process, stopped at READY (holding the lease, half a shard in its scratch)."""

    def __init__(self, uri: str, tmpdir: Path, endpoint: str | None = None):
        command = [sys.executable, str(HELPER), uri] + (["--endpoint", endpoint] if endpoint else [])
        env = {"TMPDIR": str(tmpdir), "PATH": "/usr/bin:/bin"}
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self._watchdog = threading.Timer(120, self.process.kill)  # never leave it behind
        self._watchdog.start()
        line = self.process.stdout.readline().split()
        assert line and line[0] == "READY", self.process.stderr.read()[-2000:]
        self.run_id, self.scratch = line[1], Path(line[2])

    @property
    def pid(self) -> int:
        return self.process.pid

    def finish(self) -> None:
        self.process.stdin.write("finish\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "DONE", self.process.stderr.read()[-2000:]
        assert self.process.wait(timeout=60) == 0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._watchdog.cancel()


def write_all(builder: StoreBuilder) -> None:
    for spec in builder.prepare():
        writer = builder.writer(spec)
        for item in spec.items:
            writer.add(item.image_id, features_of(item.image_id))
        writer.publish()
    builder.finalize()


def test_a_live_run_is_refused_naming_it_and_its_partial_survives(tmp_path):
    uri = str(tmp_path / "store")
    holder = Holder(uri, tmp_path)
    try:
        partials = list(holder.scratch.glob("shard-000000.tar.partial-*"))
        assert holder.scratch.parent == tmp_path / "store" / ".partial" and len(partials) == 1
        second = StoreBuilder(resolve_location(uri), KEY, SHAPES, ITEMS, 3)
        holder_name = rf"run {holder.run_id} \(host {socket.gethostname()}, pid {holder.pid}\)"
        with pytest.raises(StoreLockedError, match=rf"is being written by another run: {holder_name}"):
            second.prepare()
        assert partials[0].exists()  # nobody touched its partial
        holder.finish()  # the first run completes undisturbed
    finally:
        holder.kill()
    assert verify_store(uri).ok and len(open_store(uri)) == 7
    assert not (tmp_path / "store" / ".partial").exists() and not (tmp_path / "store" / LEASE_NAME).exists()
    rerun = StoreBuilder(resolve_location(uri), KEY, SHAPES, ITEMS, 3)
    assert rerun.prepare() == [] and not rerun.lease.held  # finished: checked, not locked, not written


def test_a_killed_runs_lease_is_taken_over_and_only_dead_scratch_is_removed(tmp_path):
    uri = str(tmp_path / "store")
    holder = Holder(uri, tmp_path)
    holder.kill()  # SIGKILL: its lease and half shard stay behind
    assert (tmp_path / "store" / LEASE_NAME).exists() and holder.scratch.exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        # A live process's scratch (a run that lost its lease but still runs) must survive.
        live = make_scratch_dir(tmp_path / "store" / ".partial", RunIdentity.new(pid=sleeper.pid))
        (live / "shard-000001.tar.partial-1").write_bytes(b"live")
        messages: list[str] = []
        builder = StoreBuilder(resolve_location(uri), KEY, SHAPES, ITEMS, 3, log=messages.append)
        write_all(builder)
        taken = [m for m in messages if m.startswith("taking over the lease")]
        assert taken and f"run {holder.run_id}" in taken[0] and f"its process {holder.pid} on" in taken[0]
        assert any(str(holder.scratch) in m and "its process is gone" in m for m in messages)
        assert not holder.scratch.exists() and (live / "shard-000001.tar.partial-1").read_bytes() == b"live"
        assert verify_store(uri).ok
    finally:
        sleeper.kill()
        sleeper.wait()


def _fake_lease(location, expires_in: float) -> dict:
    owner = RunIdentity("elsewhere-1-abc", "elsewhere", "elsewhere/0/0", 4242, None)
    lease = {"owner": owner.to_dict(), "renewed_at": time.time(), "expires_at": time.time() + expires_in, "ttl_s": 60}
    location.write_bytes(LEASE_NAME, json.dumps(lease).encode())
    return lease


def test_another_machines_lease_is_respected_until_it_expires(tmp_path):
    location = resolve_location(str(tmp_path / "store"))
    location.makedirs()
    _fake_lease(location, expires_in=30)
    with pytest.raises(StoreLockedError, match=r"run elsewhere-1-abc \(host elsewhere, pid 4242\).*expires in (29|30) s"):
        StoreLease(location).acquire()
    _fake_lease(location, expires_in=-5)
    messages: list[str] = []
    lease = StoreLease(location, log=messages.append).acquire()
    try:
        assert "its lease expired 5 s ago" in messages[0] and lease.held
    finally:
        lease.release()
    assert not location.exists(LEASE_NAME)


def test_leases_and_scratch_on_object_storage(s3_endpoint, tmp_path, monkeypatch):  # noqa: F811
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this machine's temp dir, as the helper's TMPDIR
    filesystem = s3_client(s3_endpoint)
    uri = "s3://refseg-test/stores/leased"
    location = resolve_location(uri, filesystem)
    holder = Holder(uri, tmp_path, endpoint=s3_endpoint)
    try:
        assert holder.scratch.parent == tmp_path and holder.scratch.name.startswith("refseg-scratch-")
        with pytest.raises(StoreLockedError, match=rf"run {holder.run_id} \(host .*, pid {holder.pid}\)"):
            StoreLease(location, settle_s=0.2).acquire()
    finally:
        holder.kill()  # a killed S3 run: its temporary shard stays in the temp dir
    assert list(holder.scratch.glob("shard-000000.tar.partial-*"))
    messages: list[str] = []
    builder = StoreBuilder(location, KEY, SHAPES, ITEMS, 3, lease_settle_s=0.2, log=messages.append)
    write_all(builder)
    assert any("taking over the lease" in m and "is gone" in m for m in messages)
    assert not holder.scratch.exists(), messages  # removed on start
    assert not list(tmp_path.glob("refseg-scratch-*"))  # and this run's own scratch on finish
    assert verify_store(uri, filesystem=filesystem).ok
    assert not location.exists(LEASE_NAME)

    # Two runs starting at the same moment: exactly one gets the lease (Fischer's timed protocol).
    leases = [StoreLease(location, settle_s=0.5) for _ in range(2)]
    outcomes: list[object] = [None, None]

    def take(index: int) -> None:
        try:
            outcomes[index] = leases[index].acquire()
        except StoreLockedError as error:
            outcomes[index] = error

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [lease for lease, outcome in zip(leases, outcomes) if outcome is lease]
    assert len(winners) == 1 and isinstance([o for o in outcomes if o is not winners[0]][0], StoreLockedError)
    winners[0].release()

    # A live holder renews: after more than its ttl it is still refused, released it is free.
    holder_lease = StoreLease(location, ttl_s=1.0, settle_s=0.1).acquire()
    first_expiry = holder_lease.expires_at
    time.sleep(1.6)
    assert holder_lease.expires_at > first_expiry
    with pytest.raises(StoreLockedError):
        StoreLease(location, settle_s=0.1).acquire()
    holder_lease.release()
    StoreLease(location, settle_s=0.1).acquire().release()
