"""``query``: DuckDB over OUT with views ``predictions`` and ``lot_stats`` (lot_id as VARCHAR).

Both views scan an explicit list of Parquet files, found by listing OUT's exact folders through fsspec (the
storage layer), never by a glob pattern: DuckDB's ``read_parquet('<OUT>/predictions/**/*.parquet')`` treats
``*``, ``?`` and ``[`` in OUT's own name as a pattern, so an OUT called ``o*x`` also read ``oZx``'s rows and
one called ``o[x`` read nothing (README "No code path globs on a name"). DuckDB globs every entry of a file
list too, so the files go to it as a pyarrow dataset (hive partitioning, lot_id as text), like ``report``'s.
Object storage is read through fsspec, also registered with DuckDB for paths a user's SQL names itself
(DuckDB's httpfs is not needed).

The result of the last statement is printed; a statement that returns no rows of its own (``SET``,
``CREATE``) prints DuckDB's answer (an empty ``Success`` column, a ``Count``). SQL that holds no statement
(empty, blanks, only comments) is refused in one line, as is SQL holding a statement that writes or loads files
(:data:`WRITES`): nothing is written outside OUT, nor over its outputs.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
import warnings
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from semclip_batch.errors import ConfigError, OutputError, SemclipError, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.manifest_files import hidden

FORMATS = ("table", "csv", "json")
HIVE_LOT_ID = pads.partitioning(pa.schema([("lot_id", pa.string())]), flavor="hive")
NO_LOT_STATS = re.compile(r"Table with name lot_stats does not exist", re.IGNORECASE)  # DuckDB's words before `aggregate`
ALLOWED = frozenset({"SELECT", "EXPLAIN", "CREATE", "DROP", "INSERT", "UPDATE", "DELETE", "SET", "PRAGMA",
                     "TRANSACTION", "VARIABLE_SET"})
"""Statement types ``query`` runs: reads, and changes to the in-memory session. Every other type is refused before
any statement runs (COPY, EXPORT, ATTACH, INSTALL / LOAD, PREPARE / EXECUTE, CALL...): each may write or load files;
``query`` reads OUT and prints (``--format csv > FILE`` writes a result)."""
FILE_SETTINGS = re.compile(r"^\s*(SET|RESET)\s+(GLOBAL\s+|SESSION\s+|LOCAL\s+)?\w*(path|output|directory|repository"
                           r"|extension)\w*\b", re.IGNORECASE)
"""SET / RESET of a setting that names where DuckDB writes (``log_query_path``, ``profiling_output``,
``temp_directory``, ``secret_directory``, ``extension_directory``...) or which extensions it installs."""
EXACT_TYPES = ("HUGEINT",)
"""Result column types that ``fetchdf`` turns into float64 (``sum`` of a BIGINT is one): read exactly instead."""


def connect(out: str, storage_options: Mapping[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-process DuckDB with views over OUT's predictions (and lot_stats once aggregated).

    Raises :class:`OutputError` when OUT holds no prediction files yet, or one of them cannot be read."""
    layout = OutLayout(storage.normalize_root(out))
    predictions = parquet_dataset(layout.predictions, storage_options)
    if predictions is None:
        raise OutputError(f"{layout.root} has no predictions/ yet (run `semclip-batch run ... --out {out}` first)")
    lot_stats = parquet_dataset(layout.lot_stats, storage_options)
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if storage.has_protocol(layout.root):
        fs, _ = storage.filesystem(layout.root, storage_options)
        con.register_filesystem(fs)
    con.register("predictions", predictions)
    if lot_stats is not None:
        con.register("lot_stats", lot_stats)
    return con


def parquet_files(folder: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The Parquet files below ``folder`` (paths inside its filesystem, sorted), by listing that exact folder;
    dot-files and dot-folders (writes in progress) left out; ``[]`` when it does not exist."""
    fs, path = storage.filesystem(folder, storage_options)
    base = path.rstrip("/")
    fs.invalidate_cache(base)
    try:
        found = fs.find(base, withdirs=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    files = []
    for file in found:
        rel = str(file)[len(base) + 1:] if str(file).startswith(base + "/") else ""
        if rel.endswith(".parquet") and not hidden(rel):
            files.append(str(file))
    return sorted(files)


def parquet_dataset(folder: str, storage_options: Mapping[str, Any] | None = None) -> pads.Dataset | None:
    """The Parquet files below ``folder`` as one dataset, hive-partitioned by ``lot_id`` (text: ``001`` and
    ``1`` are two lots), columns unified over every file (as DuckDB's ``union_by_name``); None without files.

    Raises :class:`OutputError` when a file cannot be read (not Parquet, or a column's types disagree)."""
    files = parquet_files(folder, storage_options)
    if not files:
        return None
    fs, path = storage.filesystem(folder, storage_options)
    arrow_fs = pafs.LocalFileSystem() if isinstance(fs, LocalFileSystem) else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    options = pads.FileSystemFactoryOptions(partitioning=HIVE_LOT_ID, partition_base_dir=path.rstrip("/"))
    try:
        factory = pads.FileSystemDatasetFactory(arrow_fs, files, pads.ParquetFileFormat(), options)
        return factory.finish(factory.inspect(promote_options="permissive", fragments=None))
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(f"{storage.redact(folder)} holds a file that cannot be read: {one_line(exc)}") from None


def run_query(out: str, sql: str, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The result of ``sql`` over OUT's views. DATE columns hold ``datetime.date`` values, HUGEINT ones Python
    ints (exact). Raises :class:`ConfigError` for SQL that holds no statement, :class:`SemclipError` when
    DuckDB refuses it."""
    if not sql.strip():
        raise ConfigError("query: the SQL is empty; give a statement, e.g. \"select count(*) from predictions\"")
    con = connect(out, storage_options)
    try:
        _refuse_writes(con, sql)
        result = con.execute(sql)
        if result is None:
            raise ConfigError("query: the SQL holds no statement (only comments or ';'); give one, "
                              "e.g. \"select count(*) from predictions\"")
        return _frame(con, result)
    except duckdb.CatalogException as exc:
        if NO_LOT_STATS.search(str(exc)):
            raise OutputError(f"{out} has no lot_stats yet: run `semclip-batch aggregate {out}` first") from None
        raise SemclipError(f"query failed: {' '.join(str(exc).split())}") from None
    except duckdb.Error as exc:
        raise SemclipError(f"query failed: {' '.join(str(exc).split())}") from None
    finally:
        con.close()


def _refuse_writes(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse, before any statement runs, SQL holding a statement outside :data:`ALLOWED`, a SET of one of
    :data:`FILE_SETTINGS`, or a persistent secret: each may write files outside OUT, or into it over the run's own
    outputs. Raises :class:`ConfigError`; DuckDB's parse errors are its own."""
    for statement in con.extract_statements(sql):
        text = " ".join(statement.query.split())[:60]
        try:
            kind = statement.type.name
        except ValueError:  # a statement type this duckdb's Python enum does not name (UPDATE EXTENSIONS)
            kind = "?"
        secret = kind == "CREATE" and re.search(r"\bSECRET\b", statement.query, re.IGNORECASE)
        if kind not in ALLOWED or secret or (kind == "SET" and FILE_SETTINGS.match(statement.query)):
            raise ConfigError(f"query reads OUT: {text!r} is refused (it may write or load files); select the rows "
                              "and write them with --format csv or json and a shell redirect")


def _frame(con: duckdb.DuckDBPyConnection, result: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The pending result as a DataFrame: dates as ``datetime.date``; HUGEINT columns as exact Python ints
    (``fetchdf`` makes them float64: ``sum(n_ok)`` printed ``7.0``, 20-digit values lost digits)."""
    types = [str(column[1]) for column in result.description or ()]
    exact = [k for k, kind in enumerate(types) if kind in EXACT_TYPES]
    if not exact or any("UHUGEINT" in kind for kind in types):  # Arrow carries UHUGEINT wrongly: fetchdf refuses it
        return result.fetchdf(date_as_object=True)
    with warnings.catch_warnings():  # "an extra copy of the rows": a result to print is small
        warnings.filterwarnings("ignore", "Arrow output on a DB-API result", UserWarning)
        table = result.to_arrow_table()
    if table is None:  # no pending result (DuckDB's stubs allow it)
        return pd.DataFrame()
    frame = con.from_arrow(table).df(date_as_object=True)
    frame.columns = pd.Index(table.column_names)
    for k in exact:
        frame.isetitem(k, pd.Series([None if v is None else int(v) for v in table.column(k).to_pylist()],
                                    index=frame.index, dtype=object))
    return frame


def _plain(value: Any) -> Any:
    """A JSON-ready value: numpy scalars and arrays to Python; NaN, ±inf and NaT to null; dates, times and
    timestamps as ISO 8601 text; an integral decimal as an int, others as a float."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return _decimal(value)
    if value is pd.NaT or (not isinstance(value, (str, bytes, list, dict)) and pd.isna(value)):
        return None
    if isinstance(value, (dt.date, dt.time)):  # datetime and pandas' Timestamp are dates too
        return value.isoformat()
    return value


def _decimal(value: Decimal) -> int | float | None:
    if not value.is_finite():
        return None
    exponent = value.as_tuple().exponent
    return int(value) if isinstance(exponent, int) and exponent >= 0 else float(value)


def _nested(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict, bytes, bytearray, memoryview)) \
        or (hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0)


def _cell(value: Any) -> Any:
    """A list, struct or map value as compact JSON text (every element, one line: what CSV and the table hold),
    a BLOB as base64; other values as they are."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if _nested(value):
        return json.dumps(_plain(value), default=_cell, allow_nan=False, separators=(",", ":"))
    return value


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every column that holds a list, struct, map or BLOB value written as :func:`_cell` text."""
    out = df.copy()
    for k in range(out.shape[1]):
        column = out.iloc[:, k]
        if column.dtype == object and column.map(_nested).any():
            out.isetitem(k, column.map(_cell))
    return out


def render(df: pd.DataFrame, fmt: str) -> str:
    """The result only: an aligned table, CSV with a header, or one JSON array of objects (valid JSON: no NaN
    nor Infinity). In CSV and the table a list, struct or map is one cell of compact JSON text (all its elements)
    and a BLOB base64 text, as in JSON."""
    if fmt == "json":
        rows = [{k: _plain(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
        return json.dumps(rows, default=_cell, allow_nan=False) + "\n"
    flat = _flat(df)
    if fmt == "csv":
        return flat.to_csv(index=False)
    if flat.empty:
        return " | ".join(map(str, flat.columns)) + "\n(0 rows)\n"
    return flat.to_string(index=False) + "\n"
