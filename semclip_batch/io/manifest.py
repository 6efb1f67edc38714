"""Input manifests: CSV / Parquet at any fsspec URL, or a folder read through ``--pattern``.

Cells are read as text; only ``die_x`` / ``die_y`` are parsed as integers. The result is one validated
:class:`pandas.DataFrame` with the columns of :data:`COLUMNS`, ``url`` holding each ``uri`` resolved to an
absolute URL. A bad manifest is refused here, up front, with one line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import posixpath
import re
import warnings
from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from semclip_batch.errors import ManifestError, one_line, shorten, show
from semclip_batch.io import storage

REQUIRED = ("uri", "lot_id", "wafer_id")
OPTIONAL = ("image_id", "die_x", "die_y", "defect_id", "reference_uri", "label", "mask_uri", "caption")
COLUMNS = (*REQUIRED, *OPTIONAL, "url", "reference_url", "mask_url")
DEFAULT_PATTERN = "{lot_id}/{wafer_id}/{name}.{ext}"
PATTERN_FIELDS = frozenset({"lot_id", "wafer_id", "name", "ext", "die_x", "die_y", "defect_id", "image_id"})
MAX_LOT_BYTES = 128
MAX_CELL_CHARS = 16_384  # object keys are at most 1,024 bytes on S3; a longer cell is a broken file
RESERVED_LOTS = frozenset({"zarr.json", "__HIVE_DEFAULT_PARTITION__"})
_LOT_BAD_CHAR = re.compile(r"[/\\%=*?\[\]\x00-\x1f\x7f-\x9f]")


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
    """Read, normalise and validate a manifest file or an image folder."""
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


def _read_table(source: str, storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
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


def _read_parquet(data: bytes, name: str) -> pd.DataFrame:
    try:
        frame = pq.read_table(io.BytesIO(data)).to_pandas()
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ManifestError(f"cannot parse manifest {name} as Parquet: {one_line(exc)}") from None
    return frame.map(cell_text).astype(object) if len(frame) else frame.astype(object)


def _read_csv(data: bytes, name: str) -> pd.DataFrame:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(f"manifest {name} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                            "save it as UTF-8") from None
    _check_csv_shape(text, name)
    try:
        with warnings.catch_warnings():  # trailing empty fields (checked above) are dropped on purpose
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False,
                               index_col=False).astype(object)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"manifest {name} has no header line (expected CSV with uri, lot_id, wafer_id)") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ManifestError(f"cannot parse manifest {name} as CSV: {one_line(exc)}") from None


def _check_csv_shape(text: str, name: str) -> None:
    """Refuse a header naming a column twice and a row with more values than the header has columns (trailing
    empty fields, as spreadsheets export them, are fine): pandas would drop or shift those values silently."""
    rows = csv.reader(io.StringIO(text))
    try:
        header = next(rows, None)
        if not header:
            return
        seen: set[str] = set()
        for column in (h.strip() for h in header):
            if column in seen:
                raise ManifestError(f"manifest {name} names column {show(column)} twice")
            seen.add(column)
        for number, row in enumerate(rows, start=2):
            if len(row) > len(header) and any(cell.strip() for cell in row[len(header):]):
                raise ManifestError(f"manifest {name} line {number} has {len(row)} values but the header names "
                                    f"{len(header)} columns")
    except csv.Error:
        return  # e.g. a cell over the csv module's size limit: the cell-size check names it later


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


def _from_folder(folder: str, pattern: str, storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
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
    return pd.DataFrame(rows, dtype=object)


def normalize(raw: pd.DataFrame, *, base_folder: str, source: str) -> pd.DataFrame:
    """Validate columns and values, fill defaults, resolve URLs. Raises :class:`ManifestError`."""
    raw = raw.reset_index(drop=True)
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        has = shorten(", ".join(map(str, raw.columns)), 200)
        raise ManifestError(f"manifest {storage.redact(source)} lacks required column {missing[0]!r} (has: {has})")
    if len(raw) == 0:
        raise ManifestError(f"manifest {storage.redact(source)} has no rows (only a header)")
    df = pd.DataFrame({c: _cells(raw[c], strip=c != "lot_id") if c in raw.columns else "" for c in REQUIRED + OPTIONAL})
    for col in REQUIRED:
        empty = df.index[df[col] == ""]
        if len(empty):
            raise ManifestError(f"manifest row {empty[0] + 1} has an empty {col!r}")
    _refuse_huge_cells(df)
    _refuse_bad_lots(df)
    _refuse_url_credentials(df)
    for col in ("die_x", "die_y"):
        df[col] = pd.Series([_parse_int(v, col, i) for i, v in enumerate(df[col])], index=df.index, dtype=object)
    missing_id = df["image_id"] == ""
    df.loc[missing_id, "image_id"] = [default_image_id(u, d) for u, d in
                                      zip(df.loc[missing_id, "uri"], df.loc[missing_id, "defect_id"], strict=False)]
    _refuse_duplicates(df)
    df["url"] = [storage.resolve(u, base_folder) for u in df["uri"]]
    df["reference_url"] = [storage.resolve(u, base_folder) if u else "" for u in df["reference_uri"]]
    df["mask_url"] = [storage.resolve(u, base_folder) if u else "" for u in df["mask_uri"]]
    return df.reset_index(drop=True)


def _cells(column: pd.Series, *, strip: bool) -> pd.Series:
    """A column as text; surrounding spaces dropped, except for lot ids, which are kept as written."""
    text = column.map(cell_text)
    return text.str.strip() if strip else text


def _refuse_huge_cells(df: pd.DataFrame) -> None:
    for col in df.columns:
        sizes = df[col].map(len)
        if len(sizes) and int(sizes.max()) > MAX_CELL_CHARS:
            i = int(sizes.idxmax())
            raise ManifestError(f"manifest row {i + 1}: {col} is {int(sizes.max())} characters long "
                                f"(at most {MAX_CELL_CHARS})")


def _refuse_bad_lots(df: pd.DataFrame) -> None:
    for i, lot in zip(df.index, df["lot_id"], strict=True):
        problem = lot_id_problem(lot)
        if problem is not None:
            raise ManifestError(f"manifest row {i + 1}: lot_id {show(lot)} {problem}")


def _refuse_url_credentials(df: pd.DataFrame) -> None:
    for col in ("uri", "reference_uri", "mask_uri"):
        bad = df.index[df[col].map(storage.has_credentials)]
        if len(bad):
            raise ManifestError(f"manifest row {bad[0] + 1}: {col} carries credentials (user:secret@...); they are "
                                "refused in URLs: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile)")


def _parse_int(value: str, column: str, row: int) -> int | None:
    if value == "":
        return None
    try:
        number = float(value)
        if not number.is_integer():
            raise ValueError
        return int(number)
    except ValueError:
        raise ManifestError(f"manifest row {row + 1}: {column} {show(value)} is not an integer") from None


def _refuse_duplicates(df: pd.DataFrame) -> None:
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, "image_id"].iloc[0]
        rows = [str(i + 1) for i in df.index[df["image_id"] == first]]
        raise ManifestError(
            f"{int(dup.sum())} manifest rows share image_ids, e.g. {show(first)} on rows {', '.join(rows[:10])}"
            f"{' ...' if len(rows) > 10 else ''} "
            "(give a distinct image_id or defect_id per row)"
        )


def content_digest(df: pd.DataFrame) -> str:
    """sha256 over the normalised manifest rows in image_id order (part of run_id)."""
    h = hashlib.sha256()
    cols = [c for c in COLUMNS if c not in ("url", "reference_url", "mask_url")] + ["url", "reference_url"]
    for row in df.sort_values("image_id")[cols].itertuples(index=False):
        h.update("\x1f".join("" if v is None else str(v) for v in row).encode())
        h.update(b"\x1e")
    return h.hexdigest()
