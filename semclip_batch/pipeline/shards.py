"""The work-shard plan, done markers and resume (README "Architecture": Done markers and resume).

Plan: rows of one lot, sorted by image_id, cut into fixed ``shard_size`` shards ``s00000, s00001, ...``. It is
written by the first attempt and reused by every later one. A shard's marker is written last, by the driver,
once every one of its rows has a receipt from the writers.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from semclip_batch.errors import OutputError, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.masks import open_masks

log = logging.getLogger(__name__)
ShardKey = tuple[str, str]


def plan_shards(df: pd.DataFrame, shard_size: int) -> pd.DataFrame:
    """``image_id, lot_id, shard`` for every row: lot-local, image_id order, fixed size."""
    parts = []
    for _lot, rows in df[["image_id", "lot_id"]].groupby("lot_id", sort=True):
        rows = rows.sort_values("image_id").reset_index(drop=True)
        rows["shard"] = [f"s{k // shard_size:05d}" for k in range(len(rows))]
        parts.append(rows)
    return pd.concat(parts, ignore_index=True)


def prepare_plan(layout: OutLayout, df: pd.DataFrame, *, run_id: str, shard_size: int, overwrite: bool,
                 storage_options: Mapping[str, Any]) -> tuple[pd.DataFrame, int]:
    """Reuse the plan of this run_id, or start fresh; refuse another run's OUT unless ``overwrite``.

    State files are written whole (write-then-rename, or one PUT) and checked on read: a damaged run info or
    plan is rebuilt from the manifest, never trusted and never a traceback.
    """
    info = read_json(layout.run_info, storage_options)
    if info is not None and info.get("run_id") != run_id:
        if not overwrite:
            raise OutputError(
                f"{layout.root} holds run {info.get('run_id')}, not {run_id} (other manifest, model or settings); "
                "pass --overwrite to replace its outputs, or choose another --out"
            )
        log.warning("--overwrite: removing the outputs of run %s from %s", info.get("run_id"), layout.root)
        for url in layout.owned_outputs():
            storage.remove(url, storage_options)
        info = None
    if info is not None:
        plan = _read_plan(layout, storage_options)
        stored_size = info.get("shard_size")
        if plan is not None and isinstance(stored_size, int) and set(plan["image_id"]) == set(df["image_id"]):
            if stored_size != shard_size:
                log.warning("reusing the first attempt's shard size %s (not %s)", stored_size, shard_size)
            return plan, stored_size
    plan = plan_shards(df, shard_size)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(plan, preserve_index=False), sink)
    storage.write_bytes(layout.plan, sink.getvalue(), storage_options)
    storage.write_bytes(layout.run_info, json.dumps({"run_id": run_id, "shard_size": shard_size}).encode(),
                        storage_options)
    return plan, shard_size


def _read_plan(layout: OutLayout, storage_options: Mapping[str, Any]) -> pd.DataFrame | None:
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(layout.plan, storage_options)))
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as exc:
        log.warning("shard plan %s is unreadable (%s); planning again", layout.plan, one_line(exc))
        return None
    if not {"image_id", "lot_id", "shard"} <= set(table.column_names):
        return None
    return table.to_pandas()


def read_json(url: str, storage_options: Mapping[str, Any]) -> dict[str, Any] | None:
    """A JSON object stored at ``url``; None when missing or damaged (a damaged file is logged, not trusted)."""
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s is damaged (%d bytes of invalid JSON); ignoring it", url, len(data))
        return None
    return value if isinstance(value, dict) else None


def done_shards(layout: OutLayout, lots: Iterable[str], storage_options: Mapping[str, Any]) -> dict[ShardKey, dict[str, int]]:
    """Each done shard of ``lots`` with its status counts: one listing per lot, every marker checked on read
    (a damaged or foreign marker does not count, so its shard runs again)."""
    done: dict[ShardKey, dict[str, int]] = {}
    for lot in sorted(set(lots)):
        folder = storage.join(layout.markers, lot)
        for name in storage.list_names(folder, storage_options):
            if not name.endswith(".json"):
                continue
            shard = name[: -len(".json")]
            body = read_json(storage.join(folder, name), storage_options)
            if body is None or body.get("lot_id") != lot or body.get("shard") != shard:
                continue
            counts = body.get("counts")
            if isinstance(counts, dict) and sum(counts.values()) == body.get("rows"):
                done[(lot, shard)] = {str(k): int(v) for k, v in counts.items()}
    return done


def write_marker(layout: OutLayout, key: ShardKey, counts: Mapping[str, int],
                 storage_options: Mapping[str, Any]) -> None:
    body = {"lot_id": key[0], "shard": key[1], "rows": sum(counts.values()), "counts": dict(counts)}
    storage.write_bytes(layout.marker(*key), json.dumps(body).encode(), storage_options)


def clear_partial(layout: OutLayout, todo: Iterable[ShardKey], storage_options: Mapping[str, Any]) -> int:
    """Remove parts of shards that are not done (left by an interrupted attempt). Returns objects removed.

    Lists each lot's exact folders and compares names; a lot's name is never used as a pattern.
    """
    by_lot: dict[str, set[str]] = {}
    for lot, shard in todo:
        by_lot.setdefault(lot, set()).add(shard)
    removed = 0
    for lot, shards in by_lot.items():
        folder = storage.join(layout.predictions, f"lot_id={lot}")
        for name in storage.list_names(folder, storage_options):
            if name.split("-", 1)[0] in shards or name.startswith(storage.TEMP_PREFIX):
                storage.remove(storage.join(folder, name), storage_options)
                removed += 1
        lot_masks = storage.join(layout.masks, lot)
        for name in storage.list_names(lot_masks, storage_options):
            if name in shards:
                storage.remove(storage.join(lot_masks, name), storage_options)
                removed += 1
    return removed


def create_mask_groups(layout: OutLayout, lots: Iterable[str], todo: Iterable[ShardKey],
                       storage_options: Mapping[str, Any]) -> None:
    """Driver-side: the Zarr root, one group per lot and per shard to run, before any writer starts."""
    root = open_masks(layout.masks, storage_options, mode="a")
    for lot in sorted(set(lots)):
        if lot not in root:
            root.create_group(lot)
    for lot, shard in sorted(todo):
        root.create_group(f"{lot}/{shard}", overwrite=True)
