"""``OUT/runs/<run_id>/attempt-<n>.json``: what one attempt did (DESIGN.md run record)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from . import storage
from .layout import OutLayout


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def next_attempt(layout: OutLayout, run_id: str, storage_options: Mapping[str, Any]) -> int:
    found = storage.glob(storage.join(layout.runs, run_id, "attempt-*.json"), storage_options)
    numbers = [int(posixpath.basename(p)[len("attempt-"):-len(".json")]) for p in found
               if posixpath.basename(p)[len("attempt-"):-len(".json")].isdigit()]
    return max(numbers, default=0) + 1


def write_record(layout: OutLayout, record: Mapping[str, Any], storage_options: Mapping[str, Any]) -> str:
    url = layout.attempt(record["run_id"], record["attempt"])
    storage.write_bytes(url, json.dumps(record, indent=2, sort_keys=False, default=str).encode(), storage_options)
    return url


def read_latest(layout: OutLayout, storage_options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The newest attempt record in OUT (by finished_at), or None."""
    records = []
    for url in storage.glob(storage.join(layout.runs, "*", "attempt-*.json"), storage_options):
        records.append(json.loads(storage.read_bytes(url, storage_options)))
    return max(records, key=lambda r: (r.get("finished_at") or "", r.get("attempt", 0)), default=None)
