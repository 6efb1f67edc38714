"""Manifest files as tables of text: CSV and Parquet at any fsspec URL, and image folders read through
``--pattern``. Every cell comes back as text exactly as written (:func:`cell_text`); checking and normalising
the rows is :mod:`semclip_batch.io.manifest`'s job.
"""

from __future__ import annotations

import codecs
import csv
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from semclip_batch.errors import ConfigError, ManifestError, one_line, show
from semclip_batch.io import storage

DEFAULT_PATTERN = "{lot_id}/{wafer_id}/{name}.{ext}"
PATTERN_FIELDS = frozenset({"lot_id", "wafer_id", "name", "ext", "die_x", "die_y", "defect_id", "image_id"})
CSV_BLOCK_BYTES = 32 << 20  # one block holds any cell up to 32 MiB, so a huge cell is parsed, then refused by size
EMPTY = pa.scalar("", pa.string())


def cell_text(value: Any) -> str:
    """A cell as text: missing (None, NaN, pandas' NaT of a null timestamp) -> "", integral floats without ".0"."""
    if value is None or value is pd.NaT:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def read_table(source: str, storage_options: Mapping[str, Any] | None) -> pa.Table:
    name = storage.redact(source)
    try:
        data = storage.read_bytes(source, storage_options)
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {name}: {one_line(exc)}") from None
    if not data:
        raise ManifestError(f"manifest {name} is empty (0 bytes)")
    lower = source.lower().split("?", 1)[0]
    if lower.endswith((".parquet", ".pq")) or data[:4] == b"PAR1":
        return _read_parquet(data, name)
    return _read_csv(data, name)


def _read_parquet(data: bytes, name: str) -> pa.Table:
    try:
        table = pq.read_table(pa.BufferReader(data))
        index = {c for c in (table.schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
        names = [n for n in table.column_names if n not in index]  # a stored pandas index is not a column
        columns = [_text_column(table.column(n)) for n in names]
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ManifestError(f"cannot parse manifest {name} as Parquet: {one_line(exc)}") from None
    _refuse_duplicate_columns(names, name)
    return pa.Table.from_arrays(columns, names=names)


def _text_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A Parquet column as :func:`cell_text` writes its cells: column-wise for text, integers and integral
    floats; value by value (as pandas gives them) for anything else."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        return _text_column(column.cast(kind.value_type))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind) \
            or pa.types.is_integer(kind):
        return column.cast(pa.string()).fill_null(EMPTY)
    if pa.types.is_floating(kind) and not pa.types.is_float16(kind):
        numbers = pc.if_else(pc.is_nan(column), pa.scalar(None, kind), column)
        integral = pc.and_(pc.equal(pc.floor(numbers), numbers), pc.less(pc.abs(numbers), 2.0 ** 63))
        if pc.all(integral).as_py() is not False:
            return numbers.cast(pa.int64()).cast(pa.string()).fill_null(EMPTY)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        try:
            return column.cast(pa.string()).fill_null(EMPTY)
        except pa.ArrowInvalid:  # not UTF-8: decoded with replacement characters below
            pass
    return pa.chunked_array([pa.array([cell_text(v) for v in column.to_pandas()], pa.string())], pa.string())


def _read_csv(data: bytes, name: str) -> pa.Table:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(f"manifest {name} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                            "save it as UTF-8") from None
    table = _read_csv_with_arrow(data, text, name)
    return table if table is not None else _read_csv_with_pandas(text, name)


def _read_csv_with_arrow(data: bytes, text: str, name: str) -> pa.Table | None:
    """A well-formed CSV, every column as text; None for anything pyarrow cannot read as such (a row with
    fewer or more values than the header, a quirk of the header): :func:`_read_csv_with_pandas` judges it."""
    try:
        header = next((row for row in csv.reader(_lines(text)) if row), None)
    except csv.Error:
        return None
    if header is None:
        return None
    _refuse_duplicate_columns([h.strip() for h in header], name)
    body = pa.py_buffer(data)
    if data.startswith(codecs.BOM_UTF8):
        body = body.slice(len(codecs.BOM_UTF8))
    try:
        table = pacsv.read_csv(
            pa.BufferReader(body),
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(newlines_in_values=_quoted_values(data)),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()), null_values=[],
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False,
                                                 check_utf8=False),
        )
    except pa.ArrowInvalid:
        return None
    return table if table.column_names == header else None


def _quoted_values(data: bytes) -> bool:
    """Whether a quote follows the first line: only then may a value hold a line break (pyarrow reads
    quote-free data three times as fast when told so)."""
    return data.find(b'"', data.find(b"\n") + 1) >= 0


def _read_csv_with_pandas(text: str, name: str) -> pa.Table:
    _check_csv_shape(text, name)
    try:
        with warnings.catch_warnings():  # trailing empty fields (checked above) are dropped on purpose
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            frame = pd.read_csv(_TextReader(text), dtype=str, keep_default_na=False, na_filter=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"manifest {name} has no header line (expected CSV with uri, lot_id, wafer_id)") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ManifestError(f"cannot parse manifest {name} as CSV: {one_line(exc)}") from None
    return pa.Table.from_arrays([pa.array(frame[c], pa.string()) for c in frame.columns], names=list(frame.columns))


class _TextReader:
    """``text`` as a file for pandas, without io.StringIO's copy of it at 4 bytes a character."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def read(self, size: int = -1) -> str:
        end = len(self.text) if size < 0 else min(self.pos + size, len(self.text))
        chunk, self.pos = self.text[self.pos:end], end
        return chunk


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text``, each with its ``\\n``, as io.StringIO would give them, one at a time."""
    start = 0
    while start < len(text):
        end = text.find("\n", start) + 1 or len(text)
        yield text[start:end]
        start = end


def _check_csv_shape(text: str, name: str) -> None:
    """Refuse a header naming a column twice and a row with more values than the header has columns (trailing
    empty fields, as spreadsheets export them, are fine): pandas would drop or shift those values silently."""
    rows = csv.reader(_lines(text))
    try:
        header = next(rows, None)
        if not header:
            return
        _refuse_duplicate_columns([h.strip() for h in header], name)
        for number, row in enumerate(rows, start=2):
            if len(row) > len(header) and any(cell.strip() for cell in row[len(header):]):
                raise ManifestError(f"manifest {name} line {number} has {len(row)} values but the header names "
                                    f"{len(header)} columns")
    except csv.Error:
        return  # e.g. a cell over the csv module's size limit: the cell-size check names it later


def _refuse_duplicate_columns(names: list[str], name: str) -> None:
    seen: set[str] = set()
    for column in names:
        if column in seen:
            raise ManifestError(f"manifest {name} names column {show(column)} twice")
        seen.add(column)


def pattern_regex(pattern: str) -> re.Pattern[str]:
    fields = re.findall(r"{([^{}]*)}", pattern)
    unknown = sorted(set(fields) - PATTERN_FIELDS)
    if unknown or not {"lot_id", "wafer_id"} <= set(fields):
        raise ManifestError(
            f"--pattern {pattern!r} must use {{lot_id}} and {{wafer_id}} and only fields "
            f"{', '.join(sorted(PATTERN_FIELDS))}" + (f" (unknown: {unknown[0]})" if unknown else "")
        )
    twice = sorted({f for f in fields if fields.count(f) > 1})
    if twice:
        raise ManifestError(f"--pattern {pattern!r} names {{{twice[0]}}} twice: each field may appear once")
    out, pos = "", 0
    for m in re.finditer(r"{([^{}]*)}", pattern):
        out += re.escape(pattern[pos:m.start()])
        name = m.group(1)
        out += f"(?P<{name}>[^/.]+)" if name == "ext" else f"(?P<{name}>[^/]+?)"
        pos = m.end()
    return re.compile(out + re.escape(pattern[pos:]) + r"\Z")


def hidden(rel: str) -> bool:
    """Whether a key below the input folder or prefix is hidden: its name or a folder on its way there starts with a
    dot (``.snapshot/``, ``.Trash-1000/``, an editor's ``.x.png.swp``), skipped by folder inputs and listings."""
    return any(part.startswith(".") for part in rel.split("/"))


def from_folder(folder: str, pattern: str, storage_options: Mapping[str, Any] | None) -> pa.Table:
    regex = pattern_regex(pattern)
    fs, root = storage.filesystem(folder, storage_options)
    root = root.rstrip("/")
    rels = sorted(rel for rel in (p[len(root) + 1:] for p in fs.find(root)) if not hidden(rel))
    if not rels:
        raise ManifestError(f"input folder {folder!r} holds no files")
    rows, bad = [], []
    for rel in rels:
        m = regex.match(rel)
        if m is None:
            bad.append(rel)
            continue
        row = {k: v for k, v in m.groupdict().items() if k not in ("name", "ext")}
        rows.append({"uri": rel, **row})
    if bad:
        raise ManifestError(f"{len(bad)} file(s) under {folder!r} do not match --pattern {pattern!r}, e.g. {show(bad[0], 200)}")
    return pa.Table.from_pylist(rows)


def manifest_format(out: str) -> str:
    """``parquet`` or ``csv`` by the name of a manifest to write. Raises :class:`ConfigError`."""
    name = out.lower().rstrip("/")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    raise ConfigError(f"--out {out!r}: name the manifest .csv or .parquet")
