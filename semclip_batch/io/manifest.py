"""Input manifests: CSV / Parquet at any fsspec URL, or a folder read through ``--pattern``.

Cells are read as text; only ``die_x`` / ``die_y`` are parsed as integers. The result is one validated Arrow
table with the columns of :data:`COLUMNS`, ``url`` holding each ``uri`` resolved to an absolute URL. A bad
manifest is refused here, up front, with one line. Reading and checks are column-wise (``pyarrow.compute``):
a million-row manifest costs seconds and a few hundred MB, not a Python object per cell.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import math
import posixpath
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from semclip_batch.errors import ManifestError, one_line, shorten, show
from semclip_batch.io import storage

REQUIRED = ("uri", "lot_id", "wafer_id")
OPTIONAL = ("image_id", "die_x", "die_y", "defect_id", "reference_uri", "label", "mask_uri", "caption")
COLUMNS = (*REQUIRED, *OPTIONAL, "url", "reference_url", "mask_url")
INT_COLUMNS = ("die_x", "die_y")
DIGEST_COLUMNS = (*REQUIRED, *OPTIONAL, "url", "reference_url")
DEFAULT_PATTERN = "{lot_id}/{wafer_id}/{name}.{ext}"
PATTERN_FIELDS = frozenset({"lot_id", "wafer_id", "name", "ext", "die_x", "die_y", "defect_id", "image_id"})
MAX_LOT_BYTES = 128
MAX_CELL_CHARS = 16_384  # object keys are at most 1,024 bytes on S3; a longer cell is a broken file
RESERVED_LOTS = frozenset({"zarr.json", "__HIVE_DEFAULT_PARTITION__"})
CSV_BLOCK_BYTES = 32 << 20  # one block holds any cell up to 32 MiB, so a huge cell is parsed, then refused by size
DIGEST_CHUNK_ROWS = 65_536
_LOT_BAD_CHAR = re.compile(r"[/\\%=*?\[\]\x00-\x1f\x7f-\x9f]")
_PLAIN_INT = r"^-?[0-9]{1,18}(\.0*)?$"  # what float() reads as the same integer, within int64 (else: Python)
_NOT_NORMPATH = r"(^|/)\.\.?(/|$)|//|/$"  # a relative path posixpath.normpath would change
_EMPTY = pa.scalar("", pa.string())


def lot_id_problem(lot: str) -> str | None:
    """Why ``lot`` cannot be a lot id (README "Archives as they are"), or None when it can.

    1-128 UTF-8 bytes; no leading ``.``, no control characters, none of ``/ \\ % = * ? [ ]``. Everything else
    (spaces, unicode, ``#``, ``:``, leading zeros) is kept as written: lot ids name folders and are never used
    as glob patterns.
    """
    size = len(lot.encode("utf-8", "surrogatepass"))
    if size == 0:
        return "is empty"
    if size > MAX_LOT_BYTES:
        return f"is {size} bytes long (at most {MAX_LOT_BYTES} UTF-8 bytes)"
    if not lot.strip():
        return "is blank"
    if lot in RESERVED_LOTS:
        return "is a reserved name (Zarr's metadata file / Hive's null partition)"
    if lot.startswith("."):
        return "starts with '.'"
    bad = _LOT_BAD_CHAR.search(lot)
    if bad:
        char = bad.group(0)
        return f"contains {char!r} (not allowed: control characters and / \\ % = * ? [ ])"
    return None


def default_image_id(uri: str, defect_id: str) -> str:
    """First 16 hex of sha256(utf-8(uri + "#" + defect_id))."""
    return hashlib.sha256(f"{uri}#{defect_id}".encode()).hexdigest()[:16]


def cell_text(value: Any) -> str:
    """A cell as text: missing -> "", integral floats without ".0"."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def read_manifest(source: str, *, pattern: str | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """:func:`read_manifest_table` as a DataFrame (text columns; ``die_x`` / ``die_y`` Python ints or None)."""
    table = read_manifest_table(source, pattern=pattern, storage_options=storage_options)
    frame = table.to_pandas()
    for col in INT_COLUMNS:
        frame[col] = pd.Series(table.column(col).to_pylist(), index=frame.index, dtype=object)
    return frame


def read_manifest_table(source: str, *, pattern: str | None = None,
                        storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Read, normalise and validate a manifest file or an image folder.

    Returns the columns of :data:`COLUMNS` in order: ``pa.string()`` without nulls ("" when absent), except
    ``die_x`` / ``die_y``, ``pa.int64()`` (null when absent). Raises :class:`ManifestError`.
    """
    try:
        fs, path = storage.filesystem(source, storage_options)
        is_dir = fs.isdir(path)
        is_file = not is_dir and fs.exists(path)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot open input {storage.redact(source)}: {one_line(exc)}") from None
    if is_dir:
        raw, base = _from_folder(source, pattern or DEFAULT_PATTERN, storage_options), source
    elif not is_file:
        raise ManifestError(f"input {storage.redact(source)} does not exist (give a manifest .csv/.parquet or an image folder)")
    else:
        if pattern:
            raise ManifestError("--pattern applies to an input folder, not to a manifest file")
        raw, base = _read_table(source, storage_options), storage.parent(source)
    return normalize(raw, base_folder=base if storage.is_absolute(base) else posixpath.abspath(base),
                     source=source)


def _read_table(source: str, storage_options: Mapping[str, Any] | None) -> pa.Table:
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
        return column.cast(pa.string()).fill_null(_EMPTY)
    if pa.types.is_floating(kind) and not pa.types.is_float16(kind):
        numbers = pc.if_else(pc.is_nan(column), pa.scalar(None, kind), column)
        integral = pc.and_(pc.equal(pc.floor(numbers), numbers), pc.less(pc.abs(numbers), 2.0 ** 63))
        if pc.all(integral).as_py() is not False:
            return numbers.cast(pa.int64()).cast(pa.string()).fill_null(_EMPTY)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        try:
            return column.cast(pa.string()).fill_null(_EMPTY)
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


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    fields = re.findall(r"{([^{}]*)}", pattern)
    unknown = sorted(set(fields) - PATTERN_FIELDS)
    if unknown or not {"lot_id", "wafer_id"} <= set(fields):
        raise ManifestError(
            f"--pattern {pattern!r} must use {{lot_id}} and {{wafer_id}} and only fields "
            f"{', '.join(sorted(PATTERN_FIELDS))}" + (f" (unknown: {unknown[0]})" if unknown else "")
        )
    out, pos = "", 0
    for m in re.finditer(r"{([^{}]*)}", pattern):
        out += re.escape(pattern[pos:m.start()])
        name = m.group(1)
        out += f"(?P<{name}>[^/.]+)" if name == "ext" else f"(?P<{name}>[^/]+?)"
        pos = m.end()
    return re.compile(out + re.escape(pattern[pos:]) + r"\Z")


def _from_folder(folder: str, pattern: str, storage_options: Mapping[str, Any] | None) -> pa.Table:
    regex = _pattern_regex(pattern)
    fs, root = storage.filesystem(folder, storage_options)
    root = root.rstrip("/")
    rels = sorted(p[len(root) + 1:] for p in fs.find(root) if not posixpath.basename(p).startswith("."))
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


def normalize(raw: pa.Table, *, base_folder: str, source: str) -> pa.Table:
    """Validate columns and values of ``raw`` (text columns), fill defaults, resolve URLs: the table
    :func:`read_manifest_table` describes. Raises :class:`ManifestError`."""
    missing = [c for c in REQUIRED if c not in raw.column_names]
    if missing:
        has = shorten(", ".join(map(str, raw.column_names)), 200)
        raise ManifestError(f"manifest {storage.redact(source)} lacks required column {missing[0]!r} (has: {has})")
    if raw.num_rows == 0:
        raise ManifestError(f"manifest {storage.redact(source)} has no rows (only a header)")
    cols = {c: _cells(raw, c) for c in REQUIRED + OPTIONAL}
    for col in REQUIRED:
        empty = _first(pc.equal(cols[col], ""))
        if empty >= 0:
            raise ManifestError(f"manifest row {empty + 1} has an empty {col!r}")
    _refuse_huge_cells(cols)
    _refuse_bad_lots(cols["lot_id"])
    _refuse_url_credentials(cols)
    for col in INT_COLUMNS:
        cols[col] = _integers(cols[col], col)
    cols["image_id"] = _with_default_ids(cols["image_id"], cols["uri"], cols["defect_id"])
    _refuse_duplicates(cols["image_id"])
    for url, uri in (("url", "uri"), ("reference_url", "reference_uri"), ("mask_url", "mask_uri")):
        cols[url] = _resolve(cols[uri], base_folder)
    return pa.table([cols[c] for c in COLUMNS], names=list(COLUMNS))


def _cells(raw: pa.Table, col: str) -> pa.ChunkedArray:
    """Column ``col`` as text ("" when absent); surrounding whitespace (as str.strip() sees it) dropped,
    except for lot ids, which are kept as written."""
    if col not in raw.column_names:
        return pa.chunked_array([pa.repeat(_EMPTY, raw.num_rows)])
    text = raw.column(col).cast(pa.string())
    return text if col == "lot_id" else pc.utf8_trim_whitespace(text)


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    """The first row (0-based) where ``mask`` is true, -1 when none is."""
    return int(pc.index(mask, True).as_py())


def _refuse_huge_cells(cols: dict[str, pa.ChunkedArray]) -> None:
    for col, values in cols.items():
        if pc.max(pc.binary_length(values)).as_py() <= MAX_CELL_CHARS:  # never more characters than bytes
            continue
        sizes = pc.utf8_length(values)
        longest = pc.max(sizes)
        if longest.as_py() > MAX_CELL_CHARS:
            raise ManifestError(f"manifest row {_first(pc.equal(sizes, longest)) + 1}: {col} is {longest.as_py()} "
                                f"characters long (at most {MAX_CELL_CHARS})")


def _refuse_bad_lots(lots: pa.ChunkedArray) -> None:
    """Each distinct lot id checked once; the first row holding a bad one is named."""
    problems = {lot: p for lot in pc.unique(lots).to_pylist() if (p := lot_id_problem(lot)) is not None}
    if problems:
        row = _first(pc.is_in(lots, value_set=pa.array(list(problems), pa.string())))
        lot = lots[row].as_py()
        raise ManifestError(f"manifest row {row + 1}: lot_id {show(lot)} {problems[lot]}")


def _refuse_url_credentials(cols: dict[str, pa.ChunkedArray]) -> None:
    for col in ("uri", "reference_uri", "mask_uri"):
        row = _first_with_credentials(cols[col])
        if row >= 0:
            raise ManifestError(f"manifest row {row + 1}: {col} carries credentials (user:secret@...); they are "
                                "refused in URLs: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile)")


def _first_with_credentials(urls: pa.ChunkedArray) -> int:
    """The first row whose URL has ``user[:secret]@`` in its authority (:func:`storage.has_credentials`), -1
    when none has: only URLs holding both ``://`` and ``@`` are split."""
    at = pc.match_substring(urls, "@")
    if not pc.any(at).as_py():
        return -1
    rows = pc.indices_nonzero(pc.and_(at, pc.match_substring(urls, "://")))
    if len(rows) == 0:
        return -1
    after = pc.list_element(pc.split_pattern(urls.take(rows), "://", max_splits=1), 1)
    authority = pc.list_element(pc.split_pattern(after, "/", max_splits=1), 0)
    hit = _first(pc.match_substring(authority, "@"))
    return -1 if hit < 0 else int(rows[hit].as_py())


def _integers(text: pa.ChunkedArray, col: str) -> pa.ChunkedArray:
    """``die_x`` / ``die_y`` text as int64, null for "": column-wise for plain integers (``12``, ``-3``,
    ``12.0``); otherwise as :func:`_parse_int` reads each cell, naming the first bad row."""
    given = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    if not pc.any(pc.match_substring(given, "x", ignore_case=True)).as_py():  # Arrow reads 0x1f, float() does not
        try:
            return given.cast(pa.int64())
        except pa.ArrowInvalid:
            pass
    if pc.all(pc.match_substring_regex(given, _PLAIN_INT)).as_py() is not False:
        return pc.replace_substring_regex(given, r"\.0*$", "").cast(pa.int64())
    return pa.chunked_array([pa.array([_parse_int(v, col, i) for i, v in enumerate(text.to_pylist())], pa.int64())])


def _parse_int(value: str, column: str, row: int) -> int | None:
    if value == "":
        return None
    try:
        number = float(value)
        if not number.is_integer():
            raise ValueError
    except ValueError:
        raise ManifestError(f"manifest row {row + 1}: {column} {show(value)} is not an integer") from None
    if not -(2 ** 63) <= number < 2 ** 63:
        raise ManifestError(f"manifest row {row + 1}: {column} {show(value)} is out of range (a 64-bit integer)")
    return int(number)


def _with_default_ids(image_id: pa.ChunkedArray, uri: pa.ChunkedArray, defect_id: pa.ChunkedArray) -> pa.ChunkedArray:
    """``image_id`` with :func:`default_image_id` filled in where it is empty (hashed row by row: sha256 has no
    Arrow kernel; the hashed bytes are built column-wise)."""
    missing = pc.equal(image_id, "")
    rows = pc.indices_nonzero(missing)
    if len(rows) == 0:
        return image_id
    keys = pc.binary_join_element_wise(uri.take(rows), defect_id.take(rows), "#").cast(pa.binary())
    sha256 = hashlib.sha256
    ids = pa.array([sha256(key).digest()[:8].hex() for key in keys.to_pylist()], pa.string())
    if len(rows) == len(image_id):
        return pa.chunked_array([ids])
    return pa.chunked_array([pc.replace_with_mask(image_id.combine_chunks(), missing.combine_chunks(), ids)])


def _refuse_duplicates(image_id: pa.ChunkedArray) -> None:
    counts = pc.value_counts(image_id)
    shared = pc.greater(counts.field("counts"), 1)
    if not pc.any(shared).as_py():
        return
    first = image_id[_first(pc.is_in(image_id, value_set=counts.field("values").filter(shared)))].as_py()
    rows = [str(i + 1) for i in pc.indices_nonzero(pc.equal(image_id, first))[:11].to_pylist()]
    raise ManifestError(
        f"{pc.sum(counts.field('counts').filter(shared)).as_py()} manifest rows share image_ids, e.g. {show(first)} "
        f"on rows {', '.join(rows[:10])}{' ...' if len(rows) > 10 else ''} "
        "(give a distinct image_id or defect_id per row)"
    )


def _resolve(uris: pa.ChunkedArray, base_folder: str) -> pa.ChunkedArray:
    """:func:`storage.resolve` of each non-empty cell ("" stays ""): absolute URLs kept, relative paths joined
    to ``base_folder``; only relative paths that ``posixpath.normpath`` would change go through Python."""
    kept = pc.or_(pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/")), pc.equal(uris, ""))
    if pc.all(kept).as_py():
        return uris
    joined = pc.binary_join_element_wise(base_folder.rstrip("/") + "/", uris, "")
    urls = pc.if_else(kept, uris, joined)
    odd = pc.and_not(pc.match_substring_regex(uris, _NOT_NORMPATH), kept)
    rows = pc.indices_nonzero(odd)
    if len(rows) == 0:
        return urls
    fixed = pa.array([storage.resolve(u, base_folder) for u in uris.take(rows).to_pylist()], pa.string())
    return pa.chunked_array([pc.replace_with_mask(urls.combine_chunks(), odd.combine_chunks(), fixed)])


def content_digest(manifest: pa.Table | pd.DataFrame) -> str:
    """sha256 over the normalised manifest rows in image_id order (part of run_id).

    The same for the same rows however given (CSV or Parquet, any row order, table or DataFrame); any changed
    cell changes it. Cells are hashed column by column in chunks of :data:`DIGEST_CHUNK_ROWS` rows: each
    column's cell lengths, then its bytes.
    """
    table = _digest_table(manifest)
    order = pc.sort_indices(table.column("image_id"))
    columns = list(table.columns)  # taken from chunk by chunk: no combined column past 2 GiB
    digest = hashlib.sha256()
    for start in range(0, table.num_rows, DIGEST_CHUNK_ROWS):
        rows = order.slice(start, DIGEST_CHUNK_ROWS)
        for column in columns:
            for piece in _lengths_and_bytes(column.take(rows).combine_chunks()):
                digest.update(piece)
    return digest.hexdigest()


def _digest_table(manifest: pa.Table | pd.DataFrame) -> pa.Table:
    """The columns of :data:`DIGEST_COLUMNS` as text without nulls (die_x / die_y as decimal integers)."""
    if isinstance(manifest, pd.DataFrame):
        manifest = pa.Table.from_pandas(manifest[list(DIGEST_COLUMNS)], preserve_index=False)
    columns = [manifest.column(c) for c in DIGEST_COLUMNS]
    text = [(col.cast(pa.int64()) if name in INT_COLUMNS else col).cast(pa.string()).fill_null(_EMPTY)
            for name, col in zip(DIGEST_COLUMNS, columns, strict=True)]
    return pa.table(text, names=list(DIGEST_COLUMNS))


def _lengths_and_bytes(values: pa.Array) -> Iterator[bytes | memoryview]:
    """The lengths of the strings ``values`` (int64, little-endian), then their bytes; no nulls."""
    offsets = np.frombuffer(values.buffers()[1], np.int32, len(values) + 1, values.offset * 4)
    yield np.diff(offsets).astype("<i8").tobytes()
    data = values.buffers()[2]
    if data is not None:
        yield memoryview(data)[offsets[0]:offsets[-1]]
