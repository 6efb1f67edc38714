"""``manifest from-klarf``: KLARF defect lists -> a manifest for ``run`` / ``train`` / ``eval``.

One row per defect that lists an image (``--all-images``: per listed image): ``uri`` = the wafer's
``TiffFileName`` under ``--images``, ``page`` = image number - 1, ``lot_id`` / ``wafer_id`` from LotID / WaferID,
``die_x`` / ``die_y`` from XINDEX / YINDEX, ``defect_id`` from DEFECTID, ``label`` from CLASSNUMBER through the
class map ("" where the map has no entry or none is given), ``lot_time`` from ResultTimestamp. ``klarf_class``
(the tool's class number) and ``klarf_file`` ride along for people; ``run`` reads only its own columns.

Defects without an image list (or whose wafer names no ``TiffFileName``) are skipped and counted, unless
``--image-name`` names their files (review tools that save one image per defect): a template below ``--images``
with the fields ``{lot_id} {wafer_id} {defect_id} {die_x} {die_y}``, e.g. ``{wafer_id}/{defect_id}.tif``.
"""

from __future__ import annotations

import csv
import io
import posixpath
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from semclip_batch.errors import ConfigError
from semclip_batch.io import storage
from semclip_batch.io.klarf import KlarfDefect, KlarfError, read_klarf
from semclip_batch.io.manifest import normalize
from semclip_batch.io.manifest_files import manifest_format

COLUMNS = ("uri", "lot_id", "wafer_id", "die_x", "die_y", "defect_id", "page", "label", "lot_time", "klarf_class",
           "klarf_file")


@dataclass(frozen=True)
class FromKlarf:
    """What ``manifest from-klarf`` wrote and skipped."""

    rows: int
    defects: int
    wafers: int
    without_images: int
    unmapped: dict[int, int]  # class number not in the class map -> defects


def from_klarf(klarfs: Sequence[str], images: str, out: str, class_map: Mapping[int, str] | None = None, *,
               all_images: bool = False, image_name: str | None = None,
               storage_options: Mapping[str, Any] | None = None) -> FromKlarf:
    """Read ``klarfs``, write the manifest ``out`` (.csv or .parquet, any fsspec URL) in one write. Raises
    :class:`~semclip_batch.errors.ManifestError` (a KLARF or the result is unusable) or
    :class:`~semclip_batch.errors.ConfigError`."""
    fmt = manifest_format(out)
    if image_name is not None:
        check_image_name(image_name)
    so = dict(storage_options or {})
    prefix = images if storage.is_absolute(images) else posixpath.abspath(images)
    rows: list[dict[str, str]] = []
    found = without = 0
    wafers: set[tuple[str, str]] = set()
    unmapped: Counter[int] = Counter()
    for url in klarfs:
        for defect in read_klarf(url, so):
            found += 1
            wafers.add((defect.lot_id, defect.wafer_id))
            label = (class_map or {}).get(defect.class_number, "")
            if class_map is not None and not label:
                unmapped[defect.class_number] += 1
            made = _rows(defect, prefix, label, url, all_images, image_name)
            without += not made
            rows += made
    if not rows:
        raise KlarfError(f"no defect in {len(klarfs)} KLARF file(s) lists an image ({found} defects, none with an "
                         "IMAGELIST entry and a TiffFileName): give --image-name to name one file per defect")
    table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in COLUMNS]))
    normalize(table, base_folder=prefix, source=out)  # lot ids, duplicates... refused here, not at `run`
    storage.write_bytes(out, encode(table, fmt), so)
    return FromKlarf(rows=len(rows), defects=found, wafers=len(wafers), without_images=without,
                     unmapped=dict(sorted(unmapped.items())))


def _rows(defect: KlarfDefect, prefix: str, label: str, source: str, all_images: bool,
          image_name: str | None) -> list[dict[str, str]]:
    row = {"lot_id": defect.lot_id, "wafer_id": defect.wafer_id, "die_x": str(defect.die_x),
           "die_y": str(defect.die_y), "defect_id": str(defect.defect_id), "label": label,
           "lot_time": defect.result_time, "klarf_class": str(defect.class_number), "klarf_file": source}
    if not defect.images or not defect.tiff_file:
        if image_name is None:
            return []
        return [{**row, "uri": storage.join(prefix, image_name.format(**_fields(defect))), "page": ""}]
    out = []
    for number, _kind in defect.images if all_images else defect.images[:1]:
        if number < 1:
            raise KlarfError(f"KLARF {storage.redact(source)}: wafer {defect.wafer_id} defect {defect.defect_id} lists "
                             f"image number {number} (image numbers count TIFF pages from 1)")
        out.append({**row, "uri": storage.join(prefix, defect.tiff_file), "page": str(number - 1)})
    return out


IMAGE_NAME_FIELDS = ("lot_id", "wafer_id", "defect_id", "die_x", "die_y")


def _fields(defect: KlarfDefect) -> dict[str, str]:
    return {name: str(getattr(defect, name)) for name in IMAGE_NAME_FIELDS}


def check_image_name(template: str) -> None:
    """``--image-name`` must be a relative path template using only :data:`IMAGE_NAME_FIELDS`. Raises
    :class:`ConfigError`."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"--image-name {template!r}: {exc}") from None
    unknown = sorted(names - set(IMAGE_NAME_FIELDS))
    if unknown:
        raise ConfigError(f"--image-name {template!r}: unknown field {{{unknown[0]}}} (use "
                          f"{' '.join('{' + f + '}' for f in IMAGE_NAME_FIELDS)})")
    if "defect_id" not in names:
        raise ConfigError(f"--image-name {template!r} must contain {{defect_id}} (one file per defect)")
    if template.startswith("/") or "://" in template or ".." in template.split("/"):
        raise ConfigError(f"--image-name {template!r} must be a path below --images")


def encode(table: pa.Table, fmt: str) -> bytes:
    """``table`` (text columns) as Parquet or CSV bytes (header row; empty cells for empty text)."""
    sink = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, sink)
        return sink.getvalue()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(table.column_names)
    writer.writerows(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))
    return text.getvalue().encode()

