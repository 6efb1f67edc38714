"""``query``: DuckDB over OUT with views ``predictions`` and ``lot_stats`` (lot_id as VARCHAR).

Object storage is read through a registered fsspec filesystem (DuckDB's httpfs is not needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import duckdb
import pandas as pd

from semclip_batch.errors import OutputError, SemclipError
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout

FORMATS = ("table", "csv", "json")


def connect(out: str, storage_options: Mapping[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-process DuckDB with views over OUT's predictions (and lot_stats once aggregated)."""
    layout = OutLayout(storage.normalize_root(out))
    con = duckdb.connect()
    if storage.has_protocol(layout.root):
        fs, _ = storage.filesystem(layout.root, storage_options)
        con.register_filesystem(fs)
    if not storage.exists(layout.predictions, storage_options):
        raise OutputError(f"{layout.root} has no predictions/ yet (run `semclip-batch run ... --out {out}` first)")
    con.execute(f"create view predictions as {_scan(layout.predictions)}")
    if storage.exists(layout.lot_stats, storage_options):
        con.execute(f"create view lot_stats as {_scan(layout.lot_stats)}")
    return con


def _scan(folder: str) -> str:
    glob = storage.join(folder, "**", "*.parquet").replace("'", "''")
    return (f"select * from read_parquet('{glob}', hive_partitioning = true, "
            "hive_types = {'lot_id': VARCHAR}, union_by_name = true)")


def run_query(out: str, sql: str, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    con = connect(out, storage_options)
    try:
        return con.execute(sql).fetchdf()
    except duckdb.CatalogException as exc:
        if "lot_stats" in str(exc):
            raise OutputError(f"{out} has no lot_stats yet: run `semclip-batch aggregate {out}` first") from None
        raise SemclipError(f"query failed: {' '.join(str(exc).split())}") from None
    except duckdb.Error as exc:
        raise SemclipError(f"query failed: {' '.join(str(exc).split())}") from None
    finally:
        con.close()


def _plain(value: Any) -> Any:
    """A JSON-ready value: numpy scalars and arrays to Python, NaN / NaT to null."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NaT or (not isinstance(value, (str, bytes, list, dict)) and pd.isna(value)):
        return None
    return value


def render(df: pd.DataFrame, fmt: str) -> str:
    """The result only: an aligned table, CSV with a header, or one JSON array of objects."""
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        rows = [{k: _plain(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
        return json.dumps(rows, default=str) + "\n"
    if df.empty:
        return " | ".join(df.columns) + "\n(0 rows)\n"
    return df.to_string(index=False) + "\n"
