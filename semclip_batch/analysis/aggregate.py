"""``aggregate``: per (lot, wafer, class) defect statistics -> ``OUT/lot_stats/`` (hive by lot_id).

One row per (lot_id, wafer_id, class) for every class of the run. A defect class counts ok rows flagged
``is_defect`` with that ``defect_class``; ``normal`` counts ok rows not flagged. ``rate = count / n_ok``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semclip_batch.analysis.excursions import write_excursions
from semclip_batch.analysis.query import connect
from semclip_batch.config import NORMAL
from semclip_batch.errors import OutputError
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.runrecord import read_latest

LOT_STATS = pa.schema([
    ("wafer_id", pa.string()),
    ("class", pa.string()),
    ("n_images", pa.int64()),
    ("n_ok", pa.int64()),
    ("n_error", pa.int64()),
    ("n_defect", pa.int64()),
    ("count", pa.int64()),
    ("rate", pa.float64()),
    ("area_px_mean", pa.float64()),
    ("area_px_p50", pa.float64()),
    ("area_px_p95", pa.float64()),
    ("area_px_max", pa.int64()),
    ("defect_dies", pa.list_(pa.struct([("die_x", pa.int64()), ("die_y", pa.int64())]))),
])


def run_classes(out: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    layout = OutLayout(storage.normalize_root(out))
    record = read_latest(layout, storage_options or {})
    if record is None:
        if any(storage.list_names(storage.join(layout.runs, run_id), storage_options)
               for run_id in storage.list_names(layout.runs, storage_options)):
            raise OutputError(f"{out}: no run record under runs/ can be read (damaged attempt-*.json); run the same "
                              "`semclip-batch run` into it again to write a new one")
        raise OutputError(f"{out} has no run record (runs/*/attempt-*.json); run `semclip-batch run` first")
    return list(record["classes"])


# One row per (lot, wafer, class of the run), computed by DuckDB over predictions/ without loading them: the
# per-wafer totals, crossed with the run's classes, joined with each (lot, wafer, class) group's figures.
# quantile_cont is linear interpolation, as numpy's default percentile.
STATS_SQL = """
with p as (
    select lot_id, wafer_id, status, die_x, die_y, defect_area_px,
           status = 'ok' and coalesce(is_defect, false) as flagged,
           case when status <> 'ok' then null
                when coalesce(is_defect, false) then defect_class
                else $normal end as cls
    from predictions),
wafers as (
    select lot_id, wafer_id, count(*) as n_images, count(*) filter (where status = 'ok') as n_ok,
           count(*) filter (where flagged) as n_defect
    from p group by lot_id, wafer_id),
groups as (
    select lot_id, wafer_id, cls, count(*) as count, avg(defect_area_px) as area_px_mean,
           quantile_cont(defect_area_px, 0.5) as area_px_p50, quantile_cont(defect_area_px, 0.95) as area_px_p95,
           max(defect_area_px) as area_px_max,
           list_sort(list_distinct(list({'die_x': die_x, 'die_y': die_y})
                     filter (where cls <> $normal and die_x is not null and die_y is not null))) as defect_dies
    from p where cls is not null group by lot_id, wafer_id, cls),
classes as (select unnest($classes) as cls, generate_subscripts($classes, 1) as k)
select w.lot_id, w.wafer_id, c.cls as "class", w.n_images, w.n_ok, w.n_error, w.n_defect,
       coalesce(g.count, 0) as count,
       case when w.n_ok > 0 then coalesce(g.count, 0) / w.n_ok end as rate,
       g.area_px_mean, g.area_px_p50, g.area_px_p95, g.area_px_max,
       coalesce(g.defect_dies, []) as defect_dies
from (select *, n_images - n_ok as n_error from wafers) w
cross join classes c
left join groups g on g.lot_id = w.lot_id and g.wafer_id = w.wafer_id and g.cls = c.cls
order by w.lot_id, w.wafer_id, c.k
"""


def aggregate(out: str, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Write ``OUT/lot_stats/lot_id=<lot>/stats.parquet`` and ``OUT/excursions/``
    (:mod:`semclip_batch.analysis.excursions`); return the lot_stats rows (with lot_id).

    DuckDB streams over the predictions; only the result (lots x wafers x classes rows) is held in memory.
    """
    so = dict(storage_options or {})
    layout = OutLayout(storage.normalize_root(out))
    classes = run_classes(out, so)
    con = connect(out, so)
    try:
        stats = con.sql(STATS_SQL, params={"normal": NORMAL, "classes": classes}).to_arrow_table()
    finally:
        con.close()
    storage.remove(layout.lot_stats, so)
    lots = stats.column("lot_id").to_pylist()
    for lot in sorted(set(lots)):
        rows = stats.filter(pc.equal(stats.column("lot_id"), lot)).select(LOT_STATS.names).cast(LOT_STATS)
        sink = io.BytesIO()
        pq.write_table(rows, sink)
        storage.write_bytes(storage.join(layout.lot_stats, f"lot_id={lot}", "stats.parquet"), sink.getvalue(), so)
    rows = stats.select(["lot_id", *LOT_STATS.names]).cast(pa.schema([("lot_id", pa.string()), *LOT_STATS])).to_pandas()
    write_excursions(layout, rows, so)
    return rows
