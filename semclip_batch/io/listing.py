"""``manifest from-prefix``: list an archive prefix once into a manifest, so runs read the manifest instead of
listing the archive again.

The listing is streamed: ``fs.walk`` yields one folder at a time (S3: one paginated listing per prefix level),
keys are matched against ``--pattern`` (the fields of folder mode, :mod:`semclip_batch.io.manifest_files`) and
written in batches of :data:`BATCH_ROWS` rows to a Parquet or CSV file through fsspec (``OUT.partial``, renamed
onto ``OUT`` once complete), so memory holds one folder's keys and one batch, whatever the archive's size. Uris
are absolute (the prefix, made absolute when local, joined with each key), so the manifest can live anywhere.
Hidden files (a leading dot) are skipped; keys that do not match the pattern are counted and skipped (one
example reported), and so are keys whose fields ``run`` would refuse (:func:`refusal`: a lot id
:func:`~semclip_batch.io.manifest.lot_id_problem` refuses, a ``die_x`` / ``die_y`` that is not an integer, a blank
wafer id): one such key must not stop the listing of an archive, nor make the whole manifest unusable. A prefix
with no matching key is refused; so is one that is a file. The manifest being written is not listed, should it
lie below the prefix.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from semclip_batch.errors import ManifestError, show
from semclip_batch.io import storage, targets
from semclip_batch.io.manifest import lot_id_problem, parse_int
from semclip_batch.io.manifest_files import hidden, manifest_format, pattern_regex

BATCH_ROWS = 50_000
COLUMNS = ("uri", "lot_id", "wafer_id", "die_x", "die_y", "defect_id", "image_id")


@dataclass
class Listed:
    """What ``from_prefix`` wrote, counted as it lists: rows, the keys it skipped as not matching (and one of them),
    hidden files, and the keys whose fields ``run`` would refuse (and one of them with the reason)."""

    rows: int = 0
    unmatched: int = 0
    unmatched_example: str | None = None
    hidden: int = 0
    refused: int = 0
    refused_example: str | None = None  # "KEY: FIELD 'VALUE' REASON"


@functools.lru_cache(maxsize=4096)
def _lot_problem(lot: str) -> str | None:
    """:func:`lot_id_problem`, once per distinct lot (an archive's keys share few lots)."""
    return lot_id_problem(lot)


def refusal(fields: Mapping[str, str]) -> str | None:
    """Why ``run`` would refuse a manifest row made of these pattern fields (``"die_x 'abc' is not an integer"``),
    None when it takes it. The checks are ``run``'s own (:mod:`semclip_batch.io.manifest`, not a second copy):
    :func:`lot_id_problem` on the lot id as written, a wafer id that is not blank, and its integer parser on
    ``die_x`` / ``die_y``, these two trimmed as ``run`` trims them."""
    problem = _lot_problem(fields["lot_id"])
    if problem:
        return f"lot_id {show(fields['lot_id'])} {problem}"
    if not fields["wafer_id"].strip():
        return f"wafer_id {show(fields['wafer_id'])} is blank"
    for column in ("die_x", "die_y"):
        if column in fields:
            try:
                parse_int(fields[column].strip(), column, 0)
            except ManifestError as exc:
                return str(exc).removeprefix("manifest row 1: ")
    return None


def _keys(url: str, storage_options: Mapping[str, Any] | None) -> Iterator[str]:
    """Keys under ``url`` relative to it, one folder at a time, in a stable order. A hidden folder (``.snapshot/``,
    which may hold the whole tree again) is not entered: its own name is yielded, which :func:`_row` counts as
    hidden."""
    fs, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    for folder, subfolders, files in fs.walk(root):
        base = folder.rstrip("/")[len(root):].lstrip("/")
        pruned = sorted(name for name in subfolders if name.startswith("."))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in [*pruned, *sorted(files)]:
            yield posixpath.join(base, name) if base else name


def from_prefix(url: str, pattern: str, out: str, storage_options: Mapping[str, Any] | None = None) -> Listed:
    """List ``url`` into the manifest ``out`` (``.parquet`` or ``.csv``, any fsspec URL)."""
    fmt = manifest_format(out)
    targets.check_target(out, "file", "--out (the manifest to write)", storage_options)
    if not storage.has_protocol(url):
        url = os.path.abspath(url)  # uris must not depend on where the manifest is read from
    regex = pattern_regex(pattern)
    fields = [c for c in COLUMNS if c == "uri" or c in regex.groupindex]
    schema = pa.schema([(c, pa.string()) for c in fields])
    prefix = url.rstrip("/")
    _check_prefix(url, storage_options)
    fs, path = storage.filesystem(out, storage_options)
    partial = f"{path}.partial"  # renamed onto the manifest only once complete: no half listing under its name
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)  # as every other manifest writer does (storage.put_whole)
    own = frozenset({storage.normalize_root(out), f"{storage.normalize_root(out)}.partial"})
    try:
        tally = _write(url, prefix, regex, fields, fs.open(partial, "wb"), fmt, schema, storage_options, skip=own)
    except BaseException:
        if fs.exists(partial):
            fs.rm_file(partial)  # rm_file and move_file: literal names (rm and mv glob on object stores)
        raise
    if not tally.rows:
        fs.rm_file(partial)
        raise ManifestError(f"prefix {storage.redact(url)}: nothing listed ({_nothing_listed(tally, pattern)})")
    storage.move_file(fs, partial, path)
    return tally


def _check_prefix(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """The prefix must exist and be a folder or prefix, not a file (a manifest given here by mistake is `run`'s
    input as it is). Raises :class:`ManifestError`."""
    source, root = storage.filesystem(url, storage_options)
    root = root.rstrip("/")
    if not source.exists(root):
        raise ManifestError(f"prefix {storage.redact(url)} does not exist")
    if source.isfile(root) and not source.isdir(root):
        raise ManifestError(f"prefix {storage.redact(url)} is a file, not a folder or prefix: give the folder "
                            "holding the images (a manifest file is read by `run` as it is)")


def _nothing_listed(tally: Listed, pattern: str) -> str:
    """Why a listing wrote no row, for the one-line refusal."""
    reasons = []
    if tally.unmatched:
        reasons.append(f"{tally.unmatched} key(s) do not match --pattern {pattern!r}, e.g. "
                       f"{show(tally.unmatched_example or '', 200)}")
    if tally.refused:
        reasons.append(f"{tally.refused} key(s) have fields `run` refuses, e.g. {tally.refused_example}")
    return "; ".join(reasons) or "no files"


def _write(url: str, prefix: str, regex: re.Pattern[str], fields: list[str], handle: Any, fmt: str,
           schema: pa.Schema, storage_options: Mapping[str, Any] | None = None, skip: frozenset[str] = frozenset()
           ) -> Listed:
    """Stream the matching keys of ``url`` into ``handle``, skipping the uris in ``skip`` (the manifest being
    written); hidden, unmatched and refused keys counted in the returned tally."""
    tally = Listed()
    batch: list[dict[str, str]] = []
    with handle as sink, _Writer(sink, fmt, schema) as writer:
        for key in _keys(url, storage_options):
            if f"{prefix}/{key}" in skip:
                continue
            row = _row(key, prefix, regex, fields, tally)
            if row is None:
                continue
            batch.append(row)
            if len(batch) >= BATCH_ROWS:
                tally.rows += writer.write(batch)
                batch = []
        tally.rows += writer.write(batch)
    return tally


def _row(key: str, prefix: str, regex: re.Pattern[str], fields: list[str], tally: Listed) -> dict[str, str] | None:
    """The manifest row of ``key``, or None for a key skipped (hidden, not matching, refused: counted in
    ``tally``, the first of each kind kept as its example)."""
    if hidden(key):
        tally.hidden += 1
        return None
    m = regex.match(key)
    if m is None:
        tally.unmatched += 1
        tally.unmatched_example = tally.unmatched_example or key
        return None
    found = m.groupdict()
    why = refusal(found)
    if why is not None:
        tally.refused += 1
        tally.refused_example = tally.refused_example or f"{show(key, 200)}: {why}"
        return None
    return {"uri": f"{prefix}/{key}", **{k: v for k, v in found.items() if k in fields}}


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
