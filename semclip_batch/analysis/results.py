"""Reading what a run wrote: the predictions dataset (hive by lot_id) and a per-lot summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow as pa

from semclip_batch.analysis.query import connect, parquet_dataset
from semclip_batch.errors import OutputError, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout


def read_predictions(out: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """All prediction rows of OUT with ``lot_id`` (string) from the partition folders: the files ``query`` reads
    (:func:`~semclip_batch.analysis.query.parquet_dataset`). Raises :class:`OutputError` (one line) where there
    are none yet or one cannot be read (a truncated or damaged file: rerun the run into OUT)."""
    layout = OutLayout(storage.normalize_root(out))
    dataset = parquet_dataset(layout.predictions, storage_options)
    if dataset is None:
        raise OutputError(f"{layout.root} has no predictions/ yet (run `semclip-batch run ... --out {out}` first)")
    try:
        return dataset.to_table()
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{storage.redact(layout.predictions)} holds a file that cannot be read: {one_line(exc)}") \
            from None


SUMMARY_SQL = """
with p as (select lot_id, status, status = 'ok' and coalesce(is_defect, false) as flagged, defect_class
           from predictions),
classes as (select lot_id, string_agg(defect_class || '=' || n, ', ' order by defect_class) as classes
            from (select lot_id, defect_class, count(*) as n from p where flagged and defect_class is not null
                  group by lot_id, defect_class) group by lot_id)
select l.lot_id, l.images, l.ok, l.images - l.ok as errors, l.defective, coalesce(c.classes, '-') as classes
from (select lot_id, count(*) as images, count(*) filter (where status = 'ok') as ok,
             count(*) filter (where flagged) as defective from p group by lot_id) l
left join classes c using (lot_id)
order by l.lot_id
"""


def lot_summary(out: str, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Per lot: images, ok, errors, defective, and the defect classes found (count per class), computed by
    DuckDB over the predictions without loading them."""
    con = connect(out, storage_options)
    try:
        return con.sql(SUMMARY_SQL).df()
    finally:
        con.close()
