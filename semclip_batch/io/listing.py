"""``manifest from-prefix``: list an archive prefix once into a manifest, so runs read the manifest instead of
listing the archive again.

The listing is streamed: ``fs.walk`` yields one folder at a time (S3: one paginated listing per prefix level),
keys are matched against ``--pattern`` (the fields of folder mode, :mod:`semclip_batch.io.manifest_files`) and
written in batches of :data:`BATCH_ROWS` rows to a Parquet or CSV file through fsspec (``OUT.partial``, renamed
onto ``OUT`` once complete), so memory holds one folder's keys and one batch, whatever the archive's size. Uris
are absolute (the prefix, made absolute when local, joined with each key), so the manifest can live anywhere.
Hidden files (a leading dot) are skipped; keys that do not match the pattern are counted and skipped (one
example reported), and a prefix with no matching key is refused.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from semclip_batch.errors import ManifestError, show
from semclip_batch.io import storage
from semclip_batch.io.manifest_files import manifest_format, pattern_regex

BATCH_ROWS = 50_000
COLUMNS = ("uri", "lot_id", "wafer_id", "die_x", "die_y", "defect_id", "image_id")


@dataclass(frozen=True)
class Listed:
    """What ``from_prefix`` wrote: rows, the keys it skipped as not matching (and one of them), hidden files."""

    rows: int
    unmatched: int
    unmatched_example: str | None
    hidden: int


def _keys(url: str, storage_options: Mapping[str, Any] | None) -> Iterator[str]:
    """Keys under ``url`` relative to it, one folder at a time, in a stable order."""
    fs, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    for folder, subfolders, files in fs.walk(root):
        subfolders.sort()
        base = folder.rstrip("/")[len(root):].lstrip("/")
        for name in sorted(files):
            yield posixpath.join(base, name) if base else name


def from_prefix(url: str, pattern: str, out: str, storage_options: Mapping[str, Any] | None = None) -> Listed:
    """List ``url`` into the manifest ``out`` (``.parquet`` or ``.csv``, any fsspec URL)."""
    fmt = manifest_format(out)
    storage.check_target(out, "file", "--out (the manifest to write)", storage_options)
    if not storage.has_protocol(url):
        url = os.path.abspath(url)  # uris must not depend on where the manifest is read from
    regex = pattern_regex(pattern)
    fields = [c for c in COLUMNS if c == "uri" or c in regex.groupindex]
    schema = pa.schema([(c, pa.string()) for c in fields])
    prefix = url.rstrip("/")
    source, root = storage.filesystem(url, storage_options)
    if not source.exists(root.rstrip("/")):
        raise ManifestError(f"prefix {storage.redact(url)} does not exist")
    fs, path = storage.filesystem(out, storage_options)
    partial = f"{path}.partial"  # renamed onto the manifest only once complete: no half listing under its name
    try:
        rows, unmatched, hidden, example = _write(url, prefix, regex, fields, fs.open(partial, "wb"), fmt, schema,
                                                  storage_options)
    except BaseException:
        if fs.exists(partial):
            fs.rm(partial)
        raise
    if not rows:
        fs.rm(partial)
        reason = f"{unmatched} key(s) do not match --pattern {pattern!r}, e.g. {show(example or '', 200)}" \
            if unmatched else "no files"
        raise ManifestError(f"prefix {storage.redact(url)}: nothing listed ({reason})")
    fs.mv(partial, path)
    return Listed(rows=rows, unmatched=unmatched, unmatched_example=example, hidden=hidden)


def _write(url: str, prefix: str, regex: re.Pattern[str], fields: list[str], handle: Any, fmt: str,
           schema: pa.Schema, storage_options: Mapping[str, Any] | None = None) -> tuple[int, int, int, str | None]:
    """Stream the matching keys of ``url`` into ``handle``: (rows, unmatched, hidden, an unmatched key)."""
    rows = unmatched = hidden = 0
    example: str | None = None
    batch: list[dict[str, str]] = []
    with handle as sink, _Writer(sink, fmt, schema) as writer:
        for key in _keys(url, storage_options):
            if posixpath.basename(key).startswith("."):
                hidden += 1
                continue
            m = regex.match(key)
            if m is None:
                unmatched += 1
                example = example or key
                continue
            batch.append({"uri": f"{prefix}/{key}", **{k: v for k, v in m.groupdict().items() if k in fields}})
            if len(batch) >= BATCH_ROWS:
                rows += writer.write(batch)
                batch = []
        rows += writer.write(batch)
    return rows, unmatched, hidden, example


class _Writer:
    """Batches of rows into an open binary file, as Parquet (one row group per batch) or CSV."""

    def __init__(self, sink: Any, fmt: str, schema: pa.Schema) -> None:
        self.sink, self.fmt, self.schema = sink, fmt, schema
        self.parquet: pq.ParquetWriter | None = None
        if fmt == "csv":
            self._csv_rows([list(schema.names)])

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.parquet is not None:
            self.parquet.close()

    def _csv_rows(self, rows: list[list[str]]) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        self.sink.write(text.getvalue().encode())

    def write(self, batch: list[dict[str, str]]) -> int:
        if self.fmt == "csv":
            self._csv_rows([[row.get(c, "") for c in self.schema.names] for row in batch])
            return len(batch)
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.sink, self.schema)
        if batch:
            self.parquet.write_table(pa.Table.from_pylist(batch, schema=self.schema))
        return len(batch)
