"""``manifest from-klarf``: KLARF defect lists -> a manifest for ``run`` / ``train`` / ``eval``.

One row per defect that lists an image (``--all-images``: per listed image): ``uri`` = the wafer's
``TiffFileName`` under ``--images``, ``page`` = image number - 1, ``lot_id`` / ``wafer_id`` from LotID / WaferID,
``die_x`` / ``die_y`` from XINDEX / YINDEX, ``defect_id`` from DEFECTID, ``label`` from CLASSNUMBER through the
class map ("" where the map has no entry or none is given), ``lot_time`` from ResultTimestamp. ``klarf_class``
(the tool's class number) and ``klarf_file`` ride along for people; ``run`` reads only its own columns.

``--images`` may hold ``{lot_id}`` / ``{wafer_id}`` (lots whose files are named alike). Two defects never read
the same image (file and page). Defects without an image list (or whose wafer names no ``TiffFileName``) are
skipped and counted, unless
``--image-name`` names their files (review tools that save one image per defect): a template below ``--images``
with the fields ``{lot_id} {wafer_id} {defect_id} {die_x} {die_y} {index}`` (``index``: the defect's 1-based
position in its wafer's list), e.g. ``{wafer_id}/{defect_id:05d}.tif``.

Every image stays below ``--images``: a ``TiffFileName``, an ``--image-name`` or a ``{wafer_id}`` whose text
climbs out (a ``..`` part) is refused in one line naming the defect (an absolute ``TiffFileName`` is taken below
``--images``, a Windows path by its last part). A local ``--images`` that is a file is refused, and so is an
``--out`` naming a KLARF or the class map the command reads.
"""

from __future__ import annotations

import csv
import io
import os
import posixpath
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from semclip_batch.errors import ConfigError, show
from semclip_batch.io import storage, targets
from semclip_batch.io.klarf import KlarfDefect, KlarfError, read_klarf
from semclip_batch.io.manifest import MAX_PAGE, lot_id_problem, normalize
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
               all_images: bool = False, image_name: str | None = None, class_map_url: str | None = None,
               storage_options: Mapping[str, Any] | None = None) -> FromKlarf:
    """Read ``klarfs``, write the manifest ``out`` (.csv or .parquet, any fsspec URL) in one write.
    ``class_map_url``: the file ``class_map`` was read from (``out`` may not be it, nor a KLARF). Raises
    :class:`~semclip_batch.errors.ManifestError` (a KLARF or the result is unusable),
    :class:`~semclip_batch.errors.ConfigError` or :class:`~semclip_batch.errors.OutputError` (``out`` is a folder)."""
    fmt = manifest_format(out)
    if image_name is not None:
        check_image_name(image_name)
    so = dict(storage_options or {})
    check_images(images)
    targets.refuse_overwriting_inputs(out, {"--class-map file": class_map_url, **{f"KLARF {k}": k for k in klarfs}})
    targets.check_target(out, "file", "--out (the manifest to write, .csv or .parquet)", so)
    rows: list[dict[str, str]] = []
    found = without = 0
    seen: dict[tuple[str, str], str] = {}  # (uri, page) -> the defect reading it
    wafers: set[tuple[str, str]] = set()
    unmapped: Counter[int] = Counter()
    for url in klarfs:
        source = url if storage.is_absolute(url) else posixpath.abspath(url)
        for defect in read_klarf(url, so):
            found += 1
            _check_lot(defect, source)
            wafers.add((defect.lot_id, defect.wafer_id))
            label = (class_map or {}).get(defect.class_number, "")
            if class_map is not None and not label:
                unmapped[defect.class_number] += 1
            made = _rows(defect, _image_folder(images, defect, source), label, source, all_images, image_name)
            without += not made
            _refuse_shared_images(made, defect, source, seen)
            rows += made
    if not rows:
        raise KlarfError(f"no defect in {len(klarfs)} KLARF file(s) lists an image ({found} defects, none with an "
                         "IMAGELIST entry and a TiffFileName): give --image-name to name one file per defect")
    table = pa.Table.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in COLUMNS]))
    normalize(table, base_folder=posixpath.abspath("."), source=out)  # what `run` would refuse, refused now
    storage.write_bytes(out, encode(table, fmt), so)
    return FromKlarf(rows=len(rows), defects=found, wafers=len(wafers), without_images=without,
                     unmapped=dict(sorted(unmapped.items())))


IMAGES_FIELDS = ("lot_id", "wafer_id")


def check_images(images: str) -> None:
    """``--images``: a folder or prefix, optionally with ``{lot_id}`` / ``{wafer_id}`` (lots whose KLARFs name
    their TIFFs alike, e.g. ``W01.tif``, kept apart); a local one without fields may not be a file. Raises
    :class:`ConfigError`."""
    if not images.strip():
        raise ConfigError("--images is empty: give the folder or prefix holding the review TIFFs")
    _check_template(images, "--images", IMAGES_FIELDS, {"lot_id": "L", "wafer_id": "W"})
    if "{" not in images and not storage.has_protocol(images) and os.path.isfile(os.path.expanduser(images)):
        raise ConfigError(f"--images {images!r} is a file: give the folder holding the review TIFFs (every row "
                          "below a file would be a read_error)")


def image_prefix(images: str, defect: KlarfDefect) -> str:
    prefix = images.format(lot_id=defect.lot_id, wafer_id=defect.wafer_id) if "{" in images else images
    if storage.is_absolute(prefix):
        return prefix
    return posixpath.abspath(os.path.expanduser(prefix))


def _image_folder(images: str, defect: KlarfDefect, source: str) -> str:
    """:func:`image_prefix` for ``defect``, refused in one line when its ids lead out of ``--images`` (a WaferID
    ``..`` filling ``{wafer_id}``)."""
    prefix = image_prefix(images, defect)
    if "{" in images and any(leaves_folder(v) for v in (defect.lot_id, defect.wafer_id)):
        raise KlarfError(f"KLARF {_defect_name(defect, source)}: --images {images!r} with its ids is {show(prefix)}, "
                         "which leaves --images")
    return prefix


def leaves_folder(name: str) -> bool:
    """Whether the relative name ``name`` (``/`` or ``\\`` separated) climbs out of the folder it is joined to:
    a ``..`` part. Absolute names are not: they are taken below it (``storage.join``)."""
    return ".." in name.replace("\\", "/").split("/")


def _defect_name(defect: KlarfDefect, source: str) -> str:
    return f"{storage.redact(source)} wafer {defect.wafer_id} defect {defect.defect_id} (#{defect.index})"


def _check_lot(defect: KlarfDefect, source: str) -> None:
    problem = lot_id_problem(defect.lot_id)
    if problem:
        raise KlarfError(f"KLARF {storage.redact(source)}: lot id {show(defect.lot_id)} {problem}")


def _refuse_shared_images(rows: list[dict[str, str]], defect: KlarfDefect, source: str,
                          seen: dict[tuple[str, str], str]) -> None:
    """Two defects may not read the same image (file and page): the same KLARF given twice, or an --image-name
    that does not tell defects apart."""
    for row in rows:
        key = (row["uri"], row["page"])
        this = _defect_name(defect, source)
        if key in seen:
            raise KlarfError(f"KLARF {this} reads the image {storage.redact(row['uri'])}"
                             f"{' page ' + row['page'] if row['page'] else ''} that {seen[key]} reads too: give each "
                             "KLARF once, or name files per defect ({index} numbers a wafer's defects)")
        seen[key] = this


def _rows(defect: KlarfDefect, prefix: str, label: str, source: str, all_images: bool,
          image_name: str | None) -> list[dict[str, str]]:
    row = {"lot_id": defect.lot_id, "wafer_id": defect.wafer_id, "die_x": str(defect.die_x),
           "die_y": str(defect.die_y), "defect_id": str(defect.defect_id), "label": label,
           "lot_time": defect.result_time, "klarf_class": str(defect.class_number), "klarf_file": source}
    if not defect.images or not defect.tiff_file:
        if image_name is None:
            return []
        name = image_name.format(**_fields(defect))
        if leaves_folder(name):
            raise KlarfError(f"KLARF {_defect_name(defect, source)}: --image-name {image_name!r} gives {show(name)}, "
                             "which leaves --images")
        return [{**row, "uri": storage.join(prefix, name), "page": ""}]
    if leaves_folder(defect.tiff_file):
        raise KlarfError(f"KLARF {_defect_name(defect, source)}: TiffFileName {show(defect.tiff_file)} leaves --images "
                         "(a '..' part): name the file below --images")
    out = []
    for number, _kind in defect.images if all_images else defect.images[:1]:
        if not 1 <= number <= MAX_PAGE + 1:
            raise KlarfError(f"KLARF {storage.redact(source)}: wafer {defect.wafer_id} defect {defect.defect_id} lists "
                             f"image number {number} (image numbers count TIFF pages from 1, up to {MAX_PAGE + 1})")
        out.append({**row, "uri": storage.join(prefix, defect.tiff_file), "page": str(number - 1)})
    return out


IMAGE_NAME_FIELDS = ("lot_id", "wafer_id", "defect_id", "die_x", "die_y", "index")


def _fields(defect: KlarfDefect) -> dict[str, str | int]:
    """The template fields: ids as text, die indices and the defect id as numbers (``{defect_id:05d}`` works)."""
    return {"lot_id": defect.lot_id, "wafer_id": defect.wafer_id, "defect_id": defect.defect_id,
            "die_x": defect.die_x, "die_y": defect.die_y, "index": defect.index}


def check_image_name(template: str) -> None:
    """``--image-name`` must be a relative path template using only :data:`IMAGE_NAME_FIELDS`, with
    ``{defect_id}`` or ``{index}``. Raises :class:`ConfigError`."""
    names = _check_template(template, "--image-name", IMAGE_NAME_FIELDS,
                            {"lot_id": "L", "wafer_id": "W", "defect_id": 1, "die_x": -1, "die_y": 2, "index": 1})
    if not names & {"defect_id", "index"}:
        raise ConfigError(f"--image-name {template!r} must contain {{defect_id}} or {{index}} (one file per defect)")
    if template.startswith("/") or "://" in template or leaves_folder(template):
        raise ConfigError(f"--image-name {template!r} must be a path below --images")


def _check_template(template: str, flag: str, fields: tuple[str, ...], sample: Mapping[str, str | int]) -> set[str]:
    """The field names of a ``str.format`` template, checked: known fields, no conversions, a format that
    formats ``sample``. Raises :class:`ConfigError`."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{flag} {template!r}: {exc}") from None
    names = {f for _, f, _, _ in parsed if f is not None}
    unknown = sorted(names - set(fields))
    if unknown:
        raise ConfigError(f"{flag} {template!r}: unknown field {{{unknown[0]}}} (use "
                          f"{' '.join('{' + f + '}' for f in fields)})")
    if any(conversion for _, _, _, conversion in parsed):
        raise ConfigError(f"{flag} {template!r}: no !r / !s / !a conversions")
    try:
        template.format(**sample)
    except (ValueError, TypeError, IndexError) as exc:
        raise ConfigError(f"{flag} {template!r}: {exc}") from None
    return names


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

