"""The work-shard plan, done markers and resume (README "Architecture": Done markers and resume).

Plan: rows of one lot, sorted by image_id, cut into fixed ``shard_size`` shards ``s00000, s00001, ...``, stored
as Parquet under ``_state/plan/`` and read by Ray as the pipeline's input. The first attempt's shard size is
kept by every later one. Once every row of a shard has a receipt from the writers, one task finalises it
(:mod:`semclip_batch.pipeline.finalise`) and the driver then writes its done marker, last.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semclip_batch.errors import OutputError
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.markers import marker_counts
from semclip_batch.io.masks import open_masks
from semclip_batch.io.schema import INPUT

log = logging.getLogger(__name__)
ShardKey = tuple[str, str]
TAKE_ROWS = 1 << 20
# Plan files are the unit of the pipeline's read-and-decode tasks: at least MIN_PLAN_FILE_ROWS rows, so that
# a 1,000-frame run decodes in parallel, and at most about PLAN_FILES of them, so that a million rows are
# stored in seconds and rows that fail at once (missing files) do not cost a task each. Decoded frames leave a
# task in blocks of bounded size (driver.MAX_BLOCK_BYTES) whatever its rows. A shard may span files.
MIN_PLAN_FILE_ROWS = 256
PLAN_FILES = 512
PLAN_WRITERS = 8  # plan files stored concurrently (object-store PUTs are latency-bound)


@dataclass(frozen=True)
class Plan:
    """The stored plan: its Parquet files (whole shards each, in plan order) and every shard's row count."""

    shard_size: int
    files: tuple[str, ...]
    shard_files: dict[ShardKey, tuple[int, ...]]  # shard -> indexes into files of the files holding its rows
    rows: dict[ShardKey, int]

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def files_of(self, shards: Iterable[ShardKey]) -> list[str]:
        """The plan files holding ``shards``, in plan order."""
        return [self.files[k] for k in sorted({k for s in shards for k in self.shard_files[s]})]


def plan_shards(manifest: pa.Table, shard_size: int) -> pa.Table:
    """The manifest's rows as the pipeline's input (:data:`~semclip_batch.io.schema.INPUT`), sorted by
    (lot_id, image_id), each with its lot-local shard ``s00000, s00001, ...`` of ``shard_size`` rows."""
    columns = [c for c in INPUT.names if c != "shard"]
    order = pc.sort_indices(manifest, sort_keys=[("lot_id", "ascending"), ("image_id", "ascending")])
    source = manifest.select(columns)
    # taken in slices: one take of a text column past 2 GiB would overflow its 32-bit offsets
    table = pa.concat_tables([source.take(order.slice(i, TAKE_ROWS)) for i in range(0, len(order), TAKE_ROWS)]
                             or [source.slice(0, 0)])
    lots, n = table.column("lot_id"), table.num_rows
    changes = pc.not_equal(lots.slice(1), lots.slice(0, max(0, n - 1))).to_numpy() if n > 1 else np.zeros(0, bool)
    starts = np.flatnonzero(np.r_[True, changes]) if n else np.zeros(0, np.int64)  # where each lot begins
    first_of_row = np.repeat(starts, np.diff(np.r_[starts, n]))
    numbers = (np.arange(n) - first_of_row) // shard_size
    names = pa.array([f"s{k:05d}" for k in range(int(numbers.max()) + 1 if len(numbers) else 0)], pa.string())
    shard = pa.DictionaryArray.from_arrays(pa.array(numbers, pa.int32()), names).cast(pa.string())
    return table.append_column("shard", shard).cast(INPUT)


def claim_out(layout: OutLayout, *, run_id: str, shard_size: int, overwrite: bool,
              storage_options: Mapping[str, Any]) -> int:
    """Refuse an OUT holding another run unless ``overwrite`` (which first removes that run's outputs); return
    the shard size to plan with: the first attempt's (kept in ``_state/run.json``), else ``shard_size``."""
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
    stored = info.get("shard_size") if info is not None else None
    if isinstance(stored, int) and not isinstance(stored, bool) and stored >= 1 and stored != shard_size:
        log.warning("reusing the first attempt's shard size %s (not %s)", stored, shard_size)
        return stored
    return shard_size


def store_plan(layout: OutLayout, manifest: pa.Table, *, run_id: str, shard_size: int,
               storage_options: Mapping[str, Any]) -> Plan:
    """Plan the manifest and store the plan under ``_state/plan/`` (then ``_state/run.json``).

    The plan is a pure function of the manifest and the shard size, so every attempt writes the same files again
    (whole-object writes): a damaged or missing plan file is simply replaced.
    """
    table = plan_shards(manifest, shard_size)
    keys, first, sizes = _shard_runs(table)
    rows = dict(zip(keys, sizes, strict=True))
    per_file = max(MIN_PLAN_FILE_ROWS, -(-table.num_rows // PLAN_FILES))
    starts = range(0, table.num_rows, per_file)
    with ThreadPoolExecutor(PLAN_WRITERS, thread_name_prefix="plan-write") as pool:
        files = list(pool.map(lambda k: _write_plan_file(layout, k, table.slice(starts[k], per_file), storage_options),
                              range(len(starts))))
    shard_files = {key: tuple(range(int(a) // per_file, (int(a) + n - 1) // per_file + 1))
                   for key, a, n in zip(keys, first, sizes, strict=True)}
    storage.write_bytes(layout.run_info, json.dumps({"run_id": run_id, "shard_size": shard_size,
                                                     "plan_files": len(files)}).encode(), storage_options)
    return Plan(shard_size=shard_size, files=tuple(files), shard_files=shard_files, rows=rows)


def _shard_runs(table: pa.Table) -> tuple[list[ShardKey], list[int], list[int]]:
    """The shards of a plan in plan order, with each one's first row and row count (shards are contiguous)."""
    n = table.num_rows
    if n == 0:
        return [], [], []
    key = pc.binary_join_element_wise(table.column("lot_id"), table.column("shard"), "\x00")
    changes = pc.not_equal(key.slice(1), key.slice(0, n - 1)).to_numpy() if n > 1 else np.zeros(0, bool)
    starts = np.flatnonzero(np.r_[True, changes])
    sizes = np.diff(np.r_[starts, n])
    heads = table.select(["lot_id", "shard"]).take(pa.array(starts)).to_pylist()
    return [(h["lot_id"], h["shard"]) for h in heads], starts.tolist(), sizes.tolist()


def _write_plan_file(layout: OutLayout, number: int, chunk: pa.Table, storage_options: Mapping[str, Any]) -> str:
    sink = io.BytesIO()
    pq.write_table(chunk, sink, compression="zstd")
    url = layout.plan_file(number)
    storage.write_bytes(url, sink.getvalue(), storage_options)
    return url


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
    """Each done shard of ``lots`` with its status counts: one listing per lot and its markers fetched together
    (concurrently on object stores), every marker checked on read (a damaged, unreadable or foreign marker does
    not count, so its shard runs again)."""
    done: dict[ShardKey, dict[str, int]] = {}
    for lot in sorted(set(lots)):
        folder = storage.join(layout.markers, lot)
        shards = [n[: -len(".json")] for n in storage.list_names(folder, storage_options) if n.endswith(".json")]
        if not shards:
            continue
        fs, path = storage.filesystem(folder, storage_options)
        paths = [f"{path.rstrip('/')}/{shard}.json" for shard in shards]
        # cat_ranges reads each path as named (cat expands * ? [ in an OUT's name on an object store)
        bodies = dict(zip(paths, fs.cat_ranges(paths, None, None, on_error="return"), strict=True))
        for shard, key in zip(shards, paths, strict=True):
            data = bodies.get(key)
            counts = marker_counts(data, lot, shard)
            if counts is not None:
                done[(lot, shard)] = counts
            elif isinstance(data, bytes):
                log.warning("done marker %s/%s is damaged or not this shard's (%d bytes); its shard runs again", lot,
                            shard, len(data))
    return done


def write_marker(layout: OutLayout, key: ShardKey, counts: Mapping[str, int],
                 storage_options: Mapping[str, Any]) -> None:
    body = {"lot_id": key[0], "shard": key[1], "rows": sum(counts.values()), "counts": dict(counts)}
    storage.write_bytes(layout.marker(*key), json.dumps(body).encode(), storage_options)


def clear_partial(layout: OutLayout, todo: Iterable[ShardKey], storage_options: Mapping[str, Any]) -> int:
    """Remove whatever an interrupted attempt left of shards that are not done: their parts, and their final
    Parquet file and Zarr group if finalising had begun. Returns the number of entries removed.

    Three listings per lot (parts, predictions, masks); names are compared, a lot's name is never a pattern.
    """
    by_lot: dict[str, set[str]] = {}
    for lot, shard in todo:
        by_lot.setdefault(lot, set()).add(shard)
    removed = 0
    for lot, shards in by_lot.items():
        folders = {
            storage.join(layout.parts, lot): lambda name, s=shards: name in s,
            layout.prediction_folder(lot): lambda name, s=shards: (name.removesuffix(".parquet") in s
                                                                   or name.startswith(storage.TEMP_PREFIX)),
            storage.join(layout.masks, lot): lambda name, s=shards: name in s,
        }
        for folder, doomed in folders.items():
            for name in storage.list_names(folder, storage_options):
                if doomed(name):
                    storage.remove(storage.join(folder, name), storage_options)
                    removed += 1
    return removed


def create_mask_groups(layout: OutLayout, lots: Iterable[str], storage_options: Mapping[str, Any]) -> None:
    """Driver-side: the Zarr root and one group per lot, before any shard is finalised (each finaliser creates
    only its own shard's group under them)."""
    root = open_masks(layout.masks, storage_options, mode="a")
    for lot in sorted(set(lots)):
        if lot not in root:
            root.create_group(lot)
