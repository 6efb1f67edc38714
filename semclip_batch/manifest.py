"""Input manifests: CSV / Parquet at any fsspec URL, or a folder read through ``--pattern``.

Cells are read as text; only ``die_x`` / ``die_y`` are parsed as integers. The result is one validated
:class:`pandas.DataFrame` with the columns of :data:`COLUMNS`, ``url`` holding each ``uri`` resolved to an
absolute URL. A bad manifest is refused here, up front, with one line.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
import re
from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from . import storage
from .errors import ManifestError

REQUIRED = ("uri", "lot_id", "wafer_id")
OPTIONAL = ("image_id", "die_x", "die_y", "defect_id", "reference_uri", "label", "mask_uri", "caption")
COLUMNS = (*REQUIRED, *OPTIONAL, "url", "reference_url", "mask_url")
DEFAULT_PATTERN = "{lot_id}/{wafer_id}/{name}.{ext}"
PATTERN_FIELDS = frozenset({"lot_id", "wafer_id", "name", "ext", "die_x", "die_y", "defect_id", "image_id"})
_LOT_BAD = re.compile(r"[/\\%\x00-\x1f]|^\.|^$")


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
        raise ManifestError(f"cannot open input {source!r}: {exc}") from exc
    if is_dir:
        raw, base = _from_folder(source, pattern or DEFAULT_PATTERN, storage_options), source
    elif not is_file:
        raise ManifestError(f"input {source!r} does not exist (give a manifest .csv/.parquet or an image folder)")
    else:
        if pattern:
            raise ManifestError("--pattern applies to an input folder, not to a manifest file")
        raw, base = _read_table(source, storage_options), storage.parent(source)
    return normalize(raw, base_folder=base if storage.is_absolute(base) else posixpath.abspath(base),
                     source=source)


def _read_table(source: str, storage_options: Mapping[str, Any] | None) -> pd.DataFrame:
    try:
        data = storage.read_bytes(source, storage_options)
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {source!r}: {exc}") from exc
    lower = source.lower().split("?", 1)[0]
    try:
        if lower.endswith((".parquet", ".pq")) or data[:4] == b"PAR1":
            frame = pq.read_table(io.BytesIO(data)).to_pandas()
            return frame.map(cell_text).astype(object) if len(frame) else frame.astype(object)
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_filter=False).astype(object)
    except Exception as exc:
        raise ManifestError(f"cannot parse manifest {source!r} as CSV or Parquet: {exc}") from exc


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
        raise ManifestError(f"{len(bad)} file(s) under {folder!r} do not match --pattern {pattern!r}, e.g. {bad[0]!r}")
    return pd.DataFrame(rows, dtype=object)


def normalize(raw: pd.DataFrame, *, base_folder: str, source: str) -> pd.DataFrame:
    """Validate columns and values, fill defaults, resolve URLs. Raises :class:`ManifestError`."""
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise ManifestError(f"manifest {source!r} lacks required column {missing[0]!r} (has: {', '.join(map(str, raw.columns))})")
    if len(raw) == 0:
        raise ManifestError(f"manifest {source!r} has no rows")
    df = pd.DataFrame({c: raw[c].map(cell_text).str.strip() if c in raw.columns else "" for c in REQUIRED + OPTIONAL})
    for col in REQUIRED:
        empty = df.index[df[col] == ""]
        if len(empty):
            raise ManifestError(f"manifest row {empty[0] + 1} has an empty {col!r}")
    bad_lot = df.index[df["lot_id"].map(lambda s: bool(_LOT_BAD.search(s)))]
    if len(bad_lot):
        i = bad_lot[0]
        raise ManifestError(f"manifest row {i + 1}: lot_id {df.at[i, 'lot_id']!r} cannot name a folder "
                            "(no '/', '\\', '%', control characters or leading '.')")
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


def _parse_int(value: str, column: str, row: int) -> int | None:
    if value == "":
        return None
    try:
        number = float(value)
        if not number.is_integer():
            raise ValueError
        return int(number)
    except ValueError:
        raise ManifestError(f"manifest row {row + 1}: {column} {value!r} is not an integer") from None


def _refuse_duplicates(df: pd.DataFrame) -> None:
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, "image_id"].iloc[0]
        rows = [str(i + 1) for i in df.index[df["image_id"] == first]]
        raise ManifestError(
            f"{int(dup.sum())} manifest rows share image_ids, e.g. {first!r} on rows {', '.join(rows)} "
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
