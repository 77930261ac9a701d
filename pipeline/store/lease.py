"""One writer per store: a lease object with owner and expiry, and per-run scratch directories.

``_lease.json`` in the store names the run that writes it (run id, host, pid, start time) and an
expiry. The holder renews it every ``ttl_s / 4`` from a daemon thread while it lives. Another run

* is refused with :class:`StoreLockedError` naming the holder while the lease is live;
* takes the lease over, saying so, when the holder is provably dead (same machine, its process is
  gone) or its lease expired (a run on another machine that stopped renewing: killed, or cut off).

How the lease is changed atomically:

* local stores: read-decide-write happens under ``flock`` of ``_lease.lock`` (a kernel lock: two
  processes cannot both see a free lease and both write theirs);
* object storage (pyarrow's S3/GCS filesystems have no create-if-absent): Fischer's timed protocol:
  read, write ours if free/stale, wait ``settle_s``, read back; whoever's lease is there then wins,
  the other is refused. It is safe as long as no run takes longer than ``settle_s`` between reading
  the lease and writing its own (a few ms normally; ``settle_s`` is 2 s by default).

Scratch: every run writes its temporary tars under its own directory (``.partial/<run id>/`` in a
local store, ``$TMPDIR/refseg-scratch-<run id>/`` for object stores), with an ``owner.json``. Runs
only remove scratch of runs that are provably dead (same machine, process gone) or, for other
machines, untouched for ``2 * ttl_s``; never the scratch of a live run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs

from pipeline.errors import DataError
from pipeline.store.fs import Location, io_errors

LEASE_NAME = "_lease.json"
LOCK_NAME = "_lease.lock"
SCRATCH_NAME = ".partial"
TMP_SCRATCH_PREFIX = "refseg-scratch-"
OWNER_FILE = "owner.json"
DEFAULT_TTL_S = 60.0
DEFAULT_SETTLE_S = 2.0
# mkdtemp names of versions before per-run scratch: no owner recorded, removed once this old.
_LEGACY_TMP_PREFIXES = ("refseg-store-", "refseg-shard-")
_LEGACY_MAX_AGE_S = 3600.0

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"refseg store: {message}", file=sys.stderr, flush=True)


class StoreLockedError(DataError):
    """Another live run holds the store's lease (or this run lost it)."""


# ----------------------------------------------------------------------------------- identities
def _machine_id() -> str:
    """Hostname + boot id + pid namespace: two processes with equal ids can check each other's pids."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    namespace = ""
    with contextlib.suppress(OSError):
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rfind(")") + 2 :].split()[0] == "Z":
            return False  # a zombie: killed, not yet reaped
    current = _process_start(pid)
    return start is None or current is None or current == start


@dataclass(frozen=True)
class RunIdentity:
    """Who writes: a run id plus where its process lives (to check whether it still does)."""

    run_id: str
    host: str
    machine: str
    pid: int
    pid_start: str | None

    @classmethod
    def new(cls, pid: int | None = None) -> "RunIdentity":
        pid = os.getpid() if pid is None else pid
        host = socket.gethostname()
        run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{host}-{pid}-{secrets.token_hex(3)}")
        return cls(run_id, host, _machine_id(), pid, _process_start(pid))

    def derived(self, suffix: str) -> "RunIdentity":
        """This process's identity under a run id derived from another run's (encoder actors)."""
        pid = os.getpid()
        return RunIdentity(f"{self.run_id}-{suffix}", socket.gethostname(), _machine_id(), pid, _process_start(pid))

    @classmethod
    def from_dict(cls, data: dict) -> "RunIdentity":
        return cls(str(data["run_id"]), str(data["host"]), str(data["machine"]), int(data["pid"]), data.get("pid_start"))

    def to_dict(self) -> dict:
        return asdict(self)

    def alive(self) -> bool | None:
        """True/False when this machine can tell (same machine), None for another machine."""
        if self.machine != _machine_id():
            return None
        return _process_alive(self.pid, self.pid_start)

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid})"


# ----------------------------------------------------------------------------------- the lease
class StoreLease:
    """The write lease of the store at ``location`` for ``run``; use as a context manager or
    :meth:`acquire` / :meth:`release`. :meth:`check` raises if the lease was lost meanwhile."""

    def __init__(
        self,
        location: Location,
        run: RunIdentity | None = None,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        settle_s: float | None = None,
        log: Log | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_s}")
        self.location = location
        self.run = run or RunIdentity.new()
        self.ttl_s = float(ttl_s)
        self.settle_s = (0.0 if location.is_local else DEFAULT_SETTLE_S) if settle_s is None else float(settle_s)
        self.log = log or _stderr
        self.held = False
        self.lost: str | None = None
        self.expires_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return self.location.join("")

    # -------------------------------------------------------------- reading / writing the object
    def read(self) -> dict | None:
        path = self.location.join(LEASE_NAME)
        try:
            with self.location.filesystem.open_input_stream(path) as stream:
                data = stream.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            if self.location.filesystem.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            raise DataError(f"cannot read the lease {path}: {error}") from error
        try:
            lease = json.loads(data)
            RunIdentity.from_dict(lease["owner"])
            float(lease["expires_at"])
            return lease
        except (ValueError, KeyError, TypeError):
            # A torn or foreign file: nobody can be holding it through this code; treat as expired.
            return {"owner": None, "expires_at": 0.0, "unreadable": data[:200].decode(errors="replace")}

    def _write(self) -> None:
        now = time.time()
        self.expires_at = now + self.ttl_s
        payload = {
            "owner": self.run.to_dict(),
            "store": self.where,
            "renewed_at": now,
            "expires_at": self.expires_at,
            "ttl_s": self.ttl_s,
        }
        self.location.write_bytes(LEASE_NAME, json.dumps(payload, indent=1, sort_keys=True).encode())

    @contextlib.contextmanager
    def _critical(self) -> Iterator[None]:
        """Local stores: serialise lease changes between processes with flock (see module doc)."""
        if not self.location.is_local:
            yield
            return
        import fcntl

        lock_path = self.location.join(LOCK_NAME)
        with io_errors(f"cannot create the store's lock file {lock_path}"):
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the flock

    # -------------------------------------------------------------- holder state
    def _holder(self, lease: dict) -> RunIdentity | None:
        return RunIdentity.from_dict(lease["owner"]) if lease.get("owner") else None

    def stale_reason(self, lease: dict) -> str | None:
        """Why ``lease`` (not ours) may be taken over, or None when its holder is live."""
        holder = self._holder(lease)
        if holder is None:
            return f"the lease file is unreadable ({lease.get('unreadable', '')!r})"
        now = time.time()
        if now > float(lease["expires_at"]):
            return f"its lease expired {now - float(lease['expires_at']):.0f} s ago"
        if holder.alive() is False:
            return f"its process {holder.pid} on {holder.host} is gone"
        return None

    def describe(self, lease: dict) -> str:
        holder = self._holder(lease)
        if holder is None:
            return "an unreadable lease"
        now = time.time()
        renewed = float(lease.get("renewed_at", 0.0))
        return (
            f"{holder.describe()}, lease renewed {now - renewed:.0f} s ago, "
            f"expires in {float(lease['expires_at']) - now:.0f} s"
        )

    # -------------------------------------------------------------- acquire / renew / release
    def acquire(self) -> "StoreLease":
        if self.held:
            return self
        with self._critical():
            current = self.read()
            holder = self._holder(current) if current else None
            if current is not None and (holder is None or holder.run_id != self.run.run_id):
                reason = self.stale_reason(current)
                if reason is None:
                    raise self._locked_error(current)
                self.log(f"taking over the lease of {self.where} from {self.describe(current)}: {reason}")
            self._write()
        if self.settle_s > 0:  # object storage: make sure nobody wrote theirs at the same time
            time.sleep(self.settle_s)
            current = self.read()
            holder = self._holder(current) if current else None
            if holder is None or holder.run_id != self.run.run_id:
                raise self._locked_error(current or {"owner": None, "expires_at": 0.0}, raced=True)
        self.held = True
        self.lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="refseg-store-lease", daemon=True)
        self._thread.start()
        return self

    def _locked_error(self, lease: dict, raced: bool = False) -> StoreLockedError:
        how = " (it took the lease at the same moment)" if raced else ""
        return StoreLockedError(
            f"feature store {self.where} is being written by another run: {self.describe(lease)}{how}. "
            "Wait for it to finish (a re-run then only does what is left), or stop it; a run that died "
            f"on another machine releases the store when its lease expires (ttl {self.ttl_s:.0f} s)."
        )

    def renew(self) -> None:
        with self._lock:
            if not self.held or self.lost:
                return
            try:
                with self._critical():
                    current = self.read()
                    holder = self._holder(current) if current else None
                    if holder is None or holder.run_id != self.run.run_id:
                        taker = self.describe(current) if current else "nobody (the lease was deleted)"
                        self.lost = f"the lease of {self.where} is now held by {taker}"
                        return
                    self._write()
            except (OSError, DataError) as error:
                if time.time() > self.expires_at:
                    self.lost = f"could not renew the lease of {self.where} before it expired ({error})"
                else:
                    self.log(f"could not renew the lease of {self.where} (will retry): {error}")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            self.renew()
            if self.lost:
                self.log(f"lost the lease: {self.lost}")
                return

    def check(self) -> None:
        """Raise :class:`StoreLockedError` if this run no longer holds the lease."""
        if self.lost:
            raise StoreLockedError(f"this run lost its write lease: {self.lost}; stopping before writing more")
        if not self.held:
            raise StoreLockedError(f"this run does not hold the write lease of {self.where}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(OSError, DataError), self._critical():
            current = self.read()
            holder = self._holder(current) if current else None
            if holder is not None and holder.run_id == self.run.run_id:
                self.location.delete(LEASE_NAME)

    def __enter__(self) -> "StoreLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lease_holder(location: Location) -> str | None:
    """The run id holding the lease of ``location`` now (None if there is no readable lease)."""
    lease = StoreLease(location, log=lambda _: None).read()
    return (lease.get("owner") or {}).get("run_id") if lease else None


# ----------------------------------------------------------------------------------- scratch
def make_scratch_dir(parent: str | Path, run: RunIdentity, prefix: str = "") -> Path:
    """``parent/<prefix><run id>/`` with an ``owner.json`` naming ``run`` (created if needed)."""
    directory = Path(parent) / f"{prefix}{run.run_id}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OWNER_FILE).write_text(json.dumps(run.to_dict(), indent=1))
    return directory


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    if path.is_dir():
        for child in path.rglob("*"):
            with contextlib.suppress(OSError):
                newest = max(newest, child.stat().st_mtime)
    return newest


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_scratch(
    parent: str | Path, me: RunIdentity, *, ttl_s: float = DEFAULT_TTL_S, prefix: str = "", log: Log | None = None
) -> list[str]:
    """Remove scratch under ``parent`` left by dead runs; returns what was removed.

    ``<prefix><run id>/owner.json`` entries: removed when their owner is provably dead (same
    machine, process gone) or, on another machine, untouched for ``2 * ttl_s``. Entries without an
    owner (versions before per-run scratch): ``*.partial-<pid>`` files in a store's ``.partial/``
    follow the same rule with their pid on this machine; ``refseg-store-*``/``refseg-shard-*``
    temp dirs are removed once untouched for an hour. Live runs' scratch is never touched.
    """
    parent = Path(parent)
    log = log or _stderr
    removed = []
    if not parent.is_dir():
        return removed
    now = time.time()
    for entry in sorted(parent.iterdir()):
        name = entry.name
        try:
            owner_file = entry / OWNER_FILE
            if entry.is_dir() and name.startswith(prefix) and owner_file.is_file():
                owner = RunIdentity.from_dict(json.loads(owner_file.read_text()))
                if owner.run_id == me.run_id:
                    continue
                alive = owner.alive()
                stale = alive is False or (alive is None and now - _newest_mtime(entry) > 2 * ttl_s)
                why = "its process is gone" if alive is False else f"untouched for over {2 * ttl_s:.0f} s"
            elif prefix and any(name.startswith(legacy) for legacy in _LEGACY_TMP_PREFIXES) and entry.is_dir():
                stale = now - _newest_mtime(entry) > _LEGACY_MAX_AGE_S
                why = "left by an older version, untouched for over an hour"
            elif not prefix and (match := re.search(r"\.partial-(\d+)$", name)):
                pid_alive = _process_alive(int(match.group(1)), None)
                stale = not pid_alive or now - _newest_mtime(entry) > 2 * ttl_s
                why = "left by an older version"
            else:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if stale:
            size = sum(p.stat().st_size for p in ([entry] if entry.is_file() else entry.rglob("*")) if p.is_file())
            _remove(entry)
            removed.append(str(entry))
            log(f"removed scratch of a dead run: {entry} ({size / 1e6:.1f} MB; {why})")
    return removed


def temp_root() -> Path:
    return Path(tempfile.gettempdir())
