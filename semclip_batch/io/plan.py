"""Reading the stored shard plan (``_state/plan/``) outside the pipeline: what predictions do not carry."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semclip_batch.errors import OutputError
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.schema import INPUT


def read_plan_columns(layout: OutLayout, columns: list[str], storage_options: Mapping[str, Any],
                      lot_id: str | None = None, required: bool = False) -> pa.Table:
    """``image_id`` and ``columns`` of the stored plan (of one lot when ``lot_id``); a column an older plan lacks
    reads as nulls, unless ``required`` (then, like a missing plan, an ``OutputError``). Empty when there is no
    plan."""
    schema = pa.schema([INPUT.field("image_id"), *(INPUT.field(c) for c in columns)])
    tables = []
    names = sorted(n for n in storage.list_names(layout.plan, storage_options) if n.endswith(".parquet"))
    if required and not names:
        raise OutputError(f"{layout.root} has no shard plan (_state/plan/): rerun `semclip-batch run` into it")
    for name in names:
        data = io.BytesIO(storage.read_bytes(storage.join(layout.plan, name), storage_options))
        table = pq.read_table(data)
        if lot_id is not None:
            table = table.filter(pc.equal(table.column("lot_id"), lot_id))
        for column in columns:
            if column not in table.column_names and required:
                raise OutputError(f"{layout.root}'s shard plan does not record {column} (a run of an earlier release): "
                                  "rerun `semclip-batch run ... --overwrite` into it")
            if column not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows, INPUT.field(column).type))
        tables.append(table.select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()
