"""Finalising a shard (README "Architecture": finalised shards): its parts become one Parquet file and one Zarr
group, then the parts are removed; the driver writes the done marker after this returns.

One task owns a shard's finalisation (the driver starts exactly one per shard, once every row of the shard has
a receipt). Each step is safe to repeat after a retry or a kill:

1. the masks go into ``masks.zarr/<lot>/<shard>/<H>x<W>`` (one array per frame size, Zarr's sharding codec,
   each stored shard object at most :data:`SHARD_BYTES` of masks), written whole shard object by whole shard
   object, streamed from the parts so memory stays at one shard object per frame size;
2. the rows go into ``predictions/lot_id=<lot>/<shard>.parquet`` in one whole-object write, *after* the masks
   (so an existing final file means its masks are complete);
3. the parts are removed.

A retry that finds a final file with all of the shard's rows skips to step 3; otherwise the parts are all
still there (they are removed only after step 2) and it starts again from step 1.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zarr

from semclip_batch.errors import OK, OutputError, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.masks import open_masks
from semclip_batch.io.schema import PART, PREDICTIONS

log = logging.getLogger(__name__)
SHARD_BYTES = 256 << 20  # masks per stored Zarr shard object, uncompressed (so the object is at most this)
CHUNK_SIDE = 1024  # inner chunks of a shard: (1, <=1024, <=1024)
ROW_GROUP_ROWS = 16_384
_META = [f.name for f in PART if f.name != "mask"]


@dataclass(frozen=True)
class FinaliseSetup:
    out: str
    storage_options: dict[str, Any]


@dataclass
class Finalised:
    """What finalising one shard gave: its status counts, or why it could not be finalised."""

    lot_id: str
    shard: str
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def finalise_shard(setup: FinaliseSetup, lot: str, shard: str, expected_rows: int) -> Finalised:
    """Ray task body: finalise one shard. Storage failures come back as ``error`` (the shard keeps no marker,
    and a rerun redoes it); only a dying worker makes Ray retry the task."""
    try:
        counts = _finalise(OutLayout(setup.out), lot, shard, expected_rows, setup.storage_options)
    except Exception as exc:
        log.exception("could not finalise shard %s/%s", lot, shard)
        return Finalised(lot, shard, error=one_line(exc))
    return Finalised(lot, shard, counts=counts)


def finaliser_ready() -> bool:
    """A no-op task: running it imports this module (Zarr, Parquet) in a worker before the first shard is due."""
    return True


def _finalise(layout: OutLayout, lot: str, shard: str, expected: int, so: Mapping[str, Any]) -> dict[str, int]:
    final_url = layout.prediction_file(lot, shard)
    stored = _read_final(final_url, so)
    if stored is not None and stored.num_rows == expected:
        _remove_parts(layout, lot, shard, so)
        return _counts(stored)
    parts = _part_urls(layout, lot, shard, so)
    rows, keep = _part_rows(parts, so)
    if rows.num_rows != expected:
        raise OutputError(f"shard {lot}/{shard} has {rows.num_rows} distinct rows in its parts, expected {expected}")
    rows = _assign_masks(rows, f"{lot}/{shard}")
    if pc.any(pc.is_valid(rows.column("mask_path"))).as_py():
        _write_masks(layout, lot, shard, rows, parts, keep, so)
    final = rows.select(PREDICTIONS.names).cast(PREDICTIONS)
    final = final.take(pc.sort_indices(final, sort_keys=[("image_id", "ascending")]))
    sink = io.BytesIO()
    pq.write_table(final, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    storage.write_bytes(final_url, sink.getvalue(), so)
    _remove_parts(layout, lot, shard, so)
    return _counts(final)


def _read_final(url: str, so: Mapping[str, Any]) -> pa.Table | None:
    """The shard's final rows if a complete final file is stored (a damaged one counts as absent)."""
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(url, so)), columns=["image_id", "status"])
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as exc:
        log.warning("final file %s is unreadable (%s); finalising its shard again", url, one_line(exc))
        return None


def _part_urls(layout: OutLayout, lot: str, shard: str, so: Mapping[str, Any]) -> list[str]:
    folder = layout.shard_parts(lot, shard)
    names = [n for n in storage.list_names(folder, so) if n.endswith(".parquet")
             and not n.startswith(storage.TEMP_PREFIX)]
    return [storage.join(folder, n) for n in names]


def _part_rows(parts: list[str], so: Mapping[str, Any]) -> tuple[pa.Table, list[np.ndarray]]:
    """The shard's rows without masks, each image once (first part in name order wins; a retried writer can
    have stored a row twice under another part name), and per part the row positions kept."""
    tables, keep, seen = [], [], set()
    for url in parts:
        fs, path = storage.filesystem(url, so)
        with fs.open(path, "rb") as fh:  # only the row columns are read, not the masks
            table = pq.ParquetFile(fh).read(columns=_META)
        ids = table.column("image_id").to_pylist()
        mine = np.array([i for i, image_id in enumerate(ids) if image_id not in seen], dtype=np.int64)
        seen.update(ids)
        tables.append(table.take(pa.array(mine, pa.int64())))
        keep.append(mine)
    if not tables:
        return pa.table({name: pa.array([], PART.field(name).type) for name in _META}), keep
    return pa.concat_tables(tables), keep


def _assign_masks(rows: pa.Table, shard_path: str) -> pa.Table:
    """``mask_path`` / ``mask_index`` of every ok row, in the order the masks are streamed (parts in name order,
    rows in part order): one array ``<shard_path>/<H>x<W>`` per frame size."""
    status = rows.column("status").to_pylist()
    heights, widths = rows.column("mask_height").to_pylist(), rows.column("mask_width").to_pylist()
    next_index: Counter[str] = Counter()
    paths: list[str | None] = []
    indexes: list[int | None] = []
    for s, h, w in zip(status, heights, widths, strict=True):
        if s != OK or not h or not w:
            paths.append(None)
            indexes.append(None)
            continue
        path = f"{shard_path}/{h}x{w}"
        paths.append(path)
        indexes.append(next_index[path])
        next_index[path] += 1
    rows = rows.set_column(rows.schema.get_field_index("mask_path"), "mask_path", pa.array(paths, pa.string()))
    return rows.set_column(rows.schema.get_field_index("mask_index"), "mask_index", pa.array(indexes, pa.int64()))


def _write_masks(layout: OutLayout, lot: str, shard: str, rows: pa.Table, parts: list[str], keep: list[np.ndarray],
                 so: Mapping[str, Any]) -> None:
    """Create the shard's group (replacing any half-written one) and stream every ok row's mask into it."""
    root = open_masks(layout.masks, so)
    group = root.create_group(f"{lot}/{shard}", overwrite=True)
    sizes = Counter(p.rsplit("/", 1)[1] for p in rows.column("mask_path").drop_null().to_pylist())
    buffers = {name: _ShardBuffer(group, name, n) for name, n in sorted(sizes.items())}
    for name, mask in _stream_masks(parts, keep, so):
        buffers[name].add(mask)
    for buffer in buffers.values():
        buffer.flush()
        if buffer.written != buffer.total:
            raise OutputError(f"shard {lot}/{shard}: {buffer.written} masks of size {buffer.name} were streamed, "
                              f"expected {buffer.total}")


def _stream_masks(parts: list[str], keep: list[np.ndarray], so: Mapping[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(array name, mask) for every kept ok row, in the order of :func:`_assign_masks`: one row group of a part
    in memory at a time (the writer sizes them at about 32 MiB of masks), each mask a view of it."""
    for url, mine in zip(parts, keep, strict=True):
        wanted = set(mine.tolist())
        fs, path = storage.filesystem(url, so)
        with fs.open(path, "rb") as fh:
            reader = pq.ParquetFile(fh)
            position = 0
            for group in range(reader.num_row_groups):
                table = reader.read_row_group(group, columns=["status", "mask", "mask_height", "mask_width"])
                status, masks = table.column("status").to_pylist(), table.column("mask")
                sizes = zip(table.column("mask_height").to_pylist(), table.column("mask_width").to_pylist(), strict=True)
                for i, (h, w) in enumerate(sizes):
                    if position + i in wanted and status[i] == OK and h and w:
                        yield f"{h}x{w}", np.frombuffer(masks[i].as_buffer(), dtype=np.uint8).reshape(h, w)
                position += table.num_rows


class _ShardBuffer:
    """Masks of one frame size, gathered until one Zarr shard object is full, then written in one go."""

    def __init__(self, group: zarr.Group, name: str, total: int) -> None:
        h, w = (int(v) for v in name.split("x"))
        # a shard's frame axes must be whole inner chunks: padded up (the padding is never stored)
        ch, cw = min(h, CHUNK_SIDE), min(w, CHUNK_SIDE)
        sh, sw = -(-h // ch) * ch, -(-w // cw) * cw
        self.per_shard = max(1, min(total, SHARD_BYTES // (sh * sw)))
        self.array = group.create_array(
            name=name, shape=(total, h, w), dtype="uint8", fill_value=0,
            shards=(self.per_shard, sh, sw), chunks=(1, ch, cw),
        )
        self.name, self.total, self.written = name, total, 0
        self.block = np.zeros((min(self.per_shard, total), h, w), dtype=np.uint8)
        self.filled = 0

    def add(self, mask: np.ndarray) -> None:
        self.block[self.filled] = mask
        self.filled += 1
        if self.filled == len(self.block):
            self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        self.array[self.written:self.written + self.filled] = self.block[:self.filled]
        self.written += self.filled
        self.filled = 0
        remaining = self.total - self.written
        if 0 < remaining < len(self.block):
            self.block = self.block[:remaining]


def _remove_parts(layout: OutLayout, lot: str, shard: str, so: Mapping[str, Any]) -> None:
    storage.remove(layout.shard_parts(lot, shard), so)


def _counts(table: pa.Table) -> dict[str, int]:
    return {str(k): int(v) for k, v in Counter(table.column("status").to_pylist()).items()}
