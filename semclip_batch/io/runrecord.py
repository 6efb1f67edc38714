"""``OUT/runs/<run_id>/attempt-<n>.json``: what one attempt did (README "Architecture": run record).

The record is created when the attempt starts (``status: running``) and rewritten whole when it ends
(``complete | failed``). Attempt numbers are taken by an exclusive create, so two runs into one OUT never
share an ``n``; a reader never sees half a record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout

MAX_ATTEMPT_TRIES = 1000


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _attempt_number(name: str) -> int | None:
    if not (name.startswith("attempt-") and name.endswith(".json")):
        return None
    digits = name[len("attempt-"):-len(".json")]
    return int(digits) if digits.isdigit() else None


def _encode(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, indent=2, sort_keys=False, default=str).encode()


def start_record(layout: OutLayout, record: dict[str, Any], storage_options: Mapping[str, Any]) -> str:
    """Take the next free attempt number for ``record["run_id"]`` and write the record there, atomically.

    Sets ``record["attempt"]`` and ``record["status"] = "running"``. Returns the record's URL.
    """
    folder = storage.join(layout.runs, record["run_id"])
    taken = [n for n in map(_attempt_number, storage.list_names(folder, storage_options)) if n is not None]
    attempt = max(taken, default=0) + 1
    record["status"] = "running"
    for _ in range(MAX_ATTEMPT_TRIES):
        record["attempt"] = attempt
        url = layout.attempt(record["run_id"], attempt)
        if storage.create_exclusive(url, _encode(record), storage_options):
            return url
        attempt += 1
    raise RuntimeError(f"no free attempt number under {folder} after {MAX_ATTEMPT_TRIES} tries")


def write_record(url: str, record: Mapping[str, Any], storage_options: Mapping[str, Any]) -> None:
    """Rewrite an attempt's record whole (its final state)."""
    storage.write_bytes(url, _encode(record), storage_options)


def read_latest(layout: OutLayout, storage_options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The newest readable attempt record in OUT (by started_at, then attempt), or None."""
    records = []
    for run_id in storage.list_names(layout.runs, storage_options):
        folder = storage.join(layout.runs, run_id)
        for name in storage.list_names(folder, storage_options):
            if _attempt_number(name) is None:
                continue
            try:
                body = json.loads(storage.read_bytes(storage.join(folder, name), storage_options))
            except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(body, dict):
                records.append(body)
    return max(records, key=lambda r: (str(r.get("started_at") or ""), int(r.get("attempt") or 0)), default=None)
