"""Input manifests: CSV / Parquet at any fsspec URL, or a folder read through ``--pattern``.

Cells are read as text; only ``die_x`` / ``die_y`` are parsed as integers. The result is one validated Arrow
table with the columns of :data:`COLUMNS`, ``url`` holding each ``uri`` resolved to an absolute URL. A bad
manifest is refused here, up front, with one line. Reading and checks are column-wise (``pyarrow.compute``):
a million-row manifest costs seconds and a few hundred MB, not a Python object per cell.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from semclip_batch.errors import ManifestError, one_line, shorten, show
from semclip_batch.io import storage
from semclip_batch.io.manifest_files import DEFAULT_PATTERN, EMPTY, cell_text, from_folder, read_table

__all__ = ["COLUMNS", "DEFAULT_PATTERN", "cell_text", "content_digest", "default_image_id", "lot_id_problem",
           "read_manifest", "read_manifest_table"]

REQUIRED = ("uri", "lot_id", "wafer_id")
SCORED = ("image_id", "die_x", "die_y", "defect_id", "reference_uri", "label", "mask_uri", "caption")
# page: 0-based TIFF page (KLARF image lists name pages of one multi-page TIFF); part of run_id and of the
# default image_id only where a row sets it, so manifests without it keep their ids and run ids.
# lot_time orders lots for excursion limits only: not part of run_id.
OPTIONAL = (*SCORED, "page", "lot_time")
COLUMNS = (*REQUIRED, *OPTIONAL, "url", "reference_url", "mask_url")
INT_COLUMNS = ("die_x", "die_y", "page")
DIGEST_COLUMNS = (*REQUIRED, *SCORED, "url", "reference_url")
MAX_PAGE = 65_535  # TIFF files past this many pages are not review images
MAX_LOT_BYTES = 128
MAX_CELL_CHARS = 16_384  # object keys are at most 1,024 bytes on S3; a longer cell is a broken file
RESERVED_LOTS = frozenset({"zarr.json", "__HIVE_DEFAULT_PARTITION__"})
DIGEST_CHUNK_ROWS = 65_536
_LOT_BAD_CHAR = re.compile(r"[/\\%=*?\[\]\x00-\x1f\x7f-\x9f]")
_DECIMAL = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")
_PLAIN_INT = r"^-?[0-9]{1,18}(\.0*)?$"  # what float() reads as the same integer, within int64 (else: Python)
_NOT_NORMPATH = r"(^|/)\.\.?(/|$)|//|/$"  # a relative path posixpath.normpath would change


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


def default_image_id(uri: str, defect_id: str, page: int | None = None) -> str:
    """First 16 hex of sha256(utf-8(uri + "#" + defect_id)), or of uri + "#" + defect_id + "#" + page where the
    row sets a page."""
    key = f"{uri}#{defect_id}" if page is None else f"{uri}#{defect_id}#{page}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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
    ``die_x`` / ``die_y`` / ``page``, ``pa.int64()`` (null when absent). Raises :class:`ManifestError`.
    """
    try:
        fs, path = storage.filesystem(source, storage_options)
        is_dir = fs.isdir(path)
        is_file = not is_dir and fs.exists(path)
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot open input {storage.redact(source)}: {one_line(exc)}") from None
    if is_dir:
        raw, base = from_folder(source, pattern or DEFAULT_PATTERN, storage_options), source
    elif not is_file:
        raise ManifestError(f"input {storage.redact(source)} does not exist (give a manifest .csv/.parquet or an image folder)")
    else:
        if pattern:
            raise ManifestError("--pattern applies to an input folder, not to a manifest file")
        raw, base = read_table(source, storage_options), storage.parent(source)
    return normalize(raw, base_folder=base if storage.is_absolute(base) else posixpath.abspath(base),
                     source=source)


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
    _refuse_bad_times(cols["lot_time"])
    for col in INT_COLUMNS:
        cols[col] = _integers(cols[col], col)
    _refuse_bad_pages(cols["page"])
    cols["image_id"] = _with_default_ids(cols["image_id"], cols["uri"], cols["defect_id"], cols["page"])
    _refuse_duplicates(cols["image_id"])
    for url, uri in (("url", "uri"), ("reference_url", "reference_uri"), ("mask_url", "mask_uri")):
        cols[url] = _resolve(cols[uri], base_folder)
    return pa.table([cols[c] for c in COLUMNS], names=list(COLUMNS))


def _cells(raw: pa.Table, col: str) -> pa.ChunkedArray:
    """Column ``col`` as text ("" when absent); surrounding whitespace (as str.strip() sees it) dropped,
    except for lot ids, which are kept as written."""
    if col not in raw.column_names:
        return pa.chunked_array([pa.repeat(EMPTY, raw.num_rows)])
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


def _refuse_bad_times(times: pa.ChunkedArray) -> None:
    """``lot_time`` cells must be empty or ISO 8601 times (a date, or a date and time)."""
    filled = [(row, value) for row, value in enumerate(times.to_pylist()) if value]
    if not filled:
        return
    parsed = pd.to_datetime(pd.Series([v for _, v in filled]), format="ISO8601", errors="coerce", utc=True)
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        row, value = filled[int(bad[0])]
        raise ManifestError(f"manifest row {row + 1}: lot_time {show(value, 40)} is not an ISO 8601 time "
                            "such as 2024-03-01 or 2024-03-01T14:05:00")


def _refuse_bad_pages(pages: pa.ChunkedArray) -> None:
    """``page`` cells must be empty or 0 .. :data:`MAX_PAGE` (0-based)."""
    bad = pc.or_(pc.less(pages, 0), pc.greater(pages, MAX_PAGE))
    row = _first(bad.fill_null(False))
    if row >= 0:
        raise ManifestError(f"manifest row {row + 1}: page {pages[row].as_py()} is out of range (a 0-based TIFF page, "
                            f"0 to {MAX_PAGE})")


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
    ``12.0``); otherwise as :func:`parse_int` reads each cell, naming the first bad row."""
    given = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    if not pc.any(pc.match_substring(given, "x", ignore_case=True)).as_py():  # Arrow reads 0x1f, float() does not
        try:
            return given.cast(pa.int64())
        except pa.ArrowInvalid:
            pass
    if pc.all(pc.match_substring_regex(given, _PLAIN_INT)).as_py() is not False:
        return pc.replace_substring_regex(given, r"\.0*$", "").cast(pa.int64())
    return pa.chunked_array([pa.array([parse_int(v, col, i) for i, v in enumerate(text.to_pylist())], pa.int64())])


def parse_int(value: str, column: str, row: int) -> int | None:
    if value == "":
        return None
    try:
        if not _DECIMAL.match(value):  # float() would also read 1_0, Arabic-Indic digits, inf
            raise ValueError
        number = float(value)
        if not number.is_integer():
            raise ValueError
    except ValueError:
        raise ManifestError(f"manifest row {row + 1}: {column} {show(value)} is not an integer") from None
    if not -(2 ** 63) <= number < 2 ** 63:
        raise ManifestError(f"manifest row {row + 1}: {column} {show(value)} is out of range (a 64-bit integer)")
    return int(number)


def _with_default_ids(image_id: pa.ChunkedArray, uri: pa.ChunkedArray, defect_id: pa.ChunkedArray,
                      page: pa.ChunkedArray) -> pa.ChunkedArray:
    """``image_id`` with :func:`default_image_id` filled in where it is empty (hashed row by row: sha256 has no
    Arrow kernel; the hashed bytes are built column-wise)."""
    missing = pc.equal(image_id, "")
    rows = pc.indices_nonzero(missing)
    if len(rows) == 0:
        return image_id
    keys = pc.binary_join_element_wise(uri.take(rows), defect_id.take(rows), "#")
    pages = page.take(rows)
    if pages.null_count < len(pages):  # "#<page>" only where a row sets one
        suffix = pc.binary_join_element_wise("#", pages.cast(pa.string()), "").fill_null("")
        keys = pc.binary_join_element_wise(keys, suffix, "")
    keys = keys.cast(pa.binary())
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
    """The columns of :data:`DIGEST_COLUMNS` as text without nulls (die_x / die_y as decimal integers), and
    ``page`` where any row sets one (so manifests without pages keep the digest they always had)."""
    names = list(DIGEST_COLUMNS)
    if "page" in _column_names(manifest) and _any_set(manifest, "page"):
        names.append("page")
    if isinstance(manifest, pd.DataFrame):
        manifest = pa.Table.from_pandas(manifest[names], preserve_index=False)
    columns = [manifest.column(c) for c in names]
    text = [(col.cast(pa.int64()) if name in INT_COLUMNS else col).cast(pa.string()).fill_null(EMPTY)
            for name, col in zip(names, columns, strict=True)]
    return pa.table(text, names=names)


def _column_names(manifest: pa.Table | pd.DataFrame) -> list[str]:
    return [str(c) for c in manifest.columns] if isinstance(manifest, pd.DataFrame) else manifest.column_names


def _any_set(manifest: pa.Table | pd.DataFrame, column: str) -> bool:
    if isinstance(manifest, pd.DataFrame):
        return bool(manifest[column].notna().any())
    return manifest.column(column).null_count < manifest.num_rows


def _lengths_and_bytes(values: pa.Array) -> Iterator[bytes | memoryview]:
    """The lengths of the strings ``values`` (int64, little-endian), then their bytes; no nulls."""
    offsets = np.frombuffer(values.buffers()[1], np.int32, len(values) + 1, values.offset * 4)
    yield np.diff(offsets).astype("<i8").tobytes()
    data = values.buffers()[2]
    if data is not None:
        yield memoryview(data)[offsets[0]:offsets[-1]]
