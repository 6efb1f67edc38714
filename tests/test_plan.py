"""The stored plan without Ray: every row once, lot-local shards in image_id order, files that split shards,
and the plan read that keeps only the shards still to do."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.schema import INPUT
from semclip_batch.pipeline import shards
from semclip_batch.pipeline.reader import SHARD_KEY_SEP, read_plan


def _manifest(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [f"{v:016x}" for v in rng.choice(1 << 40, n, replace=False)]
    lots = rng.choice(["001", "1", "L #ü"], n).tolist()
    text = {c: [f"{c}-{i}" for i in range(n)] for c in ("uri", "url", "wafer_id")}
    return pa.table({"image_id": ids, "lot_id": lots, **text, "reference_url": [""] * n,
                     "die_x": pa.array([None] * n, pa.int64()), "die_y": pa.array(range(n), pa.int64()),
                     "page": pa.array([k % 3 if k % 2 else None for k in range(n)], pa.int64()),
                     "defect_id": [str(k) for k in range(n)]})


def _read(url: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(url)))


@pytest.mark.parametrize(("n", "shard_size", "min_rows"), [(1300, 100, 256), (1300, 7, 64), (40, 256, 256)])
def test_plan_files_hold_every_row_once_in_shard_order(tmp_path, monkeypatch, n, shard_size, min_rows):
    monkeypatch.setattr(shards, "MIN_PLAN_FILE_ROWS", min_rows)
    manifest = _manifest(n, seed=n + shard_size)
    plan = shards.store_plan(OutLayout(str(tmp_path)), manifest, run_id="r", shard_size=shard_size, storage_options={})
    table = pa.concat_tables([_read(f) for f in plan.files])
    assert table.schema == INPUT and table.num_rows == n == plan.total_rows
    assert sorted(table.column("image_id").to_pylist()) == sorted(manifest.column("image_id").to_pylist())
    given = {r["image_id"]: (r["page"], r["defect_id"]) for r in manifest.to_pylist()}
    assert {r["image_id"]: (r["page"], r["defect_id"]) for r in table.to_pylist()} == given  # kept for readers
    rows = table.to_pylist()
    assert [(r["lot_id"], r["image_id"]) for r in rows] == sorted((r["lot_id"], r["image_id"]) for r in rows)
    for lot in {r["lot_id"] for r in rows}:
        mine = [r for r in rows if r["lot_id"] == lot]
        assert [r["shard"] for r in mine] == [f"s{k // shard_size:05d}" for k in range(len(mine))]
    for key, count in plan.rows.items():
        held = pa.concat_tables([_read(f) for f in plan.files_of([key])]).to_pylist()
        assert sum((r["lot_id"], r["shard"]) == key for r in held) == count
    assert len(plan.files) > 1 or n <= min_rows


def test_the_plan_read_keeps_only_the_shards_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MIN_PLAN_FILE_ROWS", 64)
    plan = shards.store_plan(OutLayout(str(tmp_path)), _manifest(500, 3), run_id="r", shard_size=50,
                             storage_options={})
    todo = sorted(plan.rows)[1::3]
    files = plan.files_of(todo)
    keep = [f"{lot}{SHARD_KEY_SEP}{shard}" for lot, shard in todo]
    got = read_plan(pa.table({"plan_file": files, "keep": [keep] * len(files)}), storage_options={})
    assert got.schema == INPUT
    assert sorted(zip(got.column("lot_id").to_pylist(), got.column("shard").to_pylist(), strict=True)) == sorted(
        key for key in todo for _ in range(plan.rows[key]))
    everything = read_plan(pa.table({"plan_file": list(plan.files), "keep": pa.array([None] * len(plan.files),
                                                                                     pa.list_(pa.string()))}),
                           storage_options={})
    assert everything.num_rows == 500
