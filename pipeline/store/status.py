"""How far a store's extraction got, from its files alone: finished (``manifest.json``, written
last), incomplete (``_plan.json``, written first, and the shards whose stats exist), or absent."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.store.fs import Location, resolve_location
from pipeline.store.layout import MANIFEST_NAME, PLAN_NAME

_STATS = re.compile(r"^shard-\d{6}_stats\.json$")


@dataclass(frozen=True)
class StoreStatus:
    uri: str
    finished: bool
    started: bool  # an extraction planned it (``_plan.json``), finished or not
    shards_done: int
    shards_planned: int  # 0 when unknown (no readable plan)

    @property
    def incomplete(self) -> bool:
        return self.started and not self.finished

    def describe(self) -> str:
        """``"does not exist yet"`` or ``"is incomplete (3 of 8 shards written: its extraction was
        interrupted, or is running)"``."""
        if self.finished:
            return "is finished"
        if not self.started:
            return "does not exist yet"
        of = f" of {self.shards_planned}" if self.shards_planned else ""
        return f"is incomplete ({self.shards_done}{of} shards written: its extraction was interrupted, or is running)"


def store_status(uri: str, filesystem: pafs.FileSystem | None = None) -> StoreStatus:
    return status_at(resolve_location(uri, filesystem))


def status_at(location: Location) -> StoreStatus:
    names = set(location.list_names())
    planned = 0
    if PLAN_NAME in names:
        try:
            planned = int(json.loads(location.read_bytes(PLAN_NAME)).get("num_shards", 0))
        except (ValueError, TypeError, AttributeError):
            planned = 0  # an unreadable plan: the extraction says what is wrong with it
    done = sum(bool(_STATS.match(name)) for name in names)
    return StoreStatus(location.display, MANIFEST_NAME in names, PLAN_NAME in names, done, planned)
