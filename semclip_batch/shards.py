"""The work-shard plan, done markers and resume (DESIGN.md "Done markers and resume").

Plan: rows of one lot, sorted by image_id, cut into fixed ``shard_size`` shards ``s00000, s00001, ...``. It is
written by the first attempt and reused by every later one. A shard's marker is written last, by the driver,
once every one of its rows has a receipt from the writers.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import OutputError
from .layout import OutLayout
from .writer import open_masks

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
    """Reuse the plan of this run_id, or start fresh; refuse another run's OUT unless ``overwrite``."""
    info = _read_json(layout.run_info, storage_options)
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
    if info is not None and storage.exists(layout.plan, storage_options):
        plan = pq.read_table(io.BytesIO(storage.read_bytes(layout.plan, storage_options))).to_pandas()
        if set(plan["image_id"]) == set(df["image_id"]):
            if int(info["shard_size"]) != shard_size:
                log.warning("reusing the first attempt's shard size %s (not %s)", info["shard_size"], shard_size)
            return plan, int(info["shard_size"])
    plan = plan_shards(df, shard_size)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(plan, preserve_index=False), sink)
    storage.write_bytes(layout.plan, sink.getvalue(), storage_options)
    storage.write_bytes(layout.run_info, json.dumps({"run_id": run_id, "shard_size": shard_size}).encode(),
                        storage_options)
    return plan, shard_size


def _read_json(url: str, storage_options: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(url, storage_options))
    except FileNotFoundError:
        return None


def done_shards(layout: OutLayout, storage_options: Mapping[str, Any]) -> set[ShardKey]:
    found = storage.glob(storage.join(layout.markers, "*", "*.json"), storage_options)
    return {(posixpath.basename(posixpath.dirname(p)), posixpath.basename(p)[: -len(".json")]) for p in found}


def write_marker(layout: OutLayout, key: ShardKey, counts: Mapping[str, int],
                 storage_options: Mapping[str, Any]) -> None:
    body = {"lot_id": key[0], "shard": key[1], "rows": sum(counts.values()), "counts": dict(counts)}
    storage.write_bytes(layout.marker(*key), json.dumps(body).encode(), storage_options)


def clear_partial(layout: OutLayout, todo: Iterable[ShardKey], storage_options: Mapping[str, Any]) -> int:
    """Remove parts of shards that are not done (left by an interrupted attempt). Returns files removed."""
    by_lot: dict[str, set[str]] = {}
    for lot, shard in todo:
        by_lot.setdefault(lot, set()).add(shard)
    removed = 0
    for lot, shards in by_lot.items():
        for url in storage.glob(storage.join(layout.predictions, f"lot_id={lot}", "*.parquet"), storage_options):
            if posixpath.basename(url).split("-", 1)[0] in shards:
                storage.remove(url, storage_options)
                removed += 1
        for url in storage.glob(storage.join(layout.masks, lot, "s*"), storage_options):
            if posixpath.basename(url) in shards:
                storage.remove(url, storage_options)
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
