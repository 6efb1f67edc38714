"""KLARF 1.1 / 1.2 defect files: read into manifests (``manifest from-klarf``), written back with our classes.

Parsing is klarf-reader's (PyPI ``klarf-reader``, MIT): lot, wafers, slots, the defect columns by name. It reads
a defect list only as one line per defect and does not read image lists or image file names, so this module
lays the file out first, narrowly (:func:`layout`): each ``DefectRecordSpec`` and each defect on one line, each
defect's ``IMAGELIST`` (a count, then that many ``image-number image-type`` pairs; image numbers are 1-based
pages of the wafer's ``TiffFileName``) kept aside, and each wafer's ``TiffFileName`` (it may come before or
after its defect list). klarf-reader then parses the laid-out text, and the two are checked against each other
(same wafers, same defect ids in the same order). KLARF 1.8 (``Record FileRecord "1.8"``) is refused in one
line: klarf-reader does not parse it.

Writing (:func:`render`) re-emits a laid-out file with new class numbers, or a new KLARF 1.2 (:func:`new_klarf`);
what is written reads back through the same reader.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from semclip_batch.errors import ConfigError, ManifestError, one_line, show
from semclip_batch.io import storage

log = logging.getLogger(__name__)

IMAGELIST = "IMAGELIST"
STANDARD_COLUMNS = ("DEFECTID", "XREL", "YREL", "XINDEX", "YINDEX", "XSIZE", "YSIZE", "DEFECTAREA", "DSIZE",
                    "CLASSNUMBER", "TEST", "CLUSTERNUMBER", "ROUGHBINNUMBER", "FINEBINNUMBER", "REVIEWSAMPLE",
                    "IMAGECOUNT", IMAGELIST)
UNCLASSIFIED = 0  # KLARF's class number for "not classified"
_QUOTED = re.compile(r'"([^"]*)"')


class KlarfError(ManifestError):
    """A KLARF file that cannot be read (one line naming the file)."""


@dataclass
class DefectList:
    """One wafer's defect list as the file lays it out."""

    wafer_id: str
    columns: list[str]
    records: list[list[str]]  # one per defect: a token per column, IMAGELIST as its image count
    images: list[list[tuple[int, int]]]  # per defect: (image number, image type) pairs
    tiff_file: str = ""

    def column(self, name: str) -> int:
        return self.columns.index(name)

    def defect_ids(self) -> list[str]:
        k = self.column("DEFECTID")
        return [r[k] for r in self.records]


@dataclass
class Layout:
    """A KLARF file as lines and defect lists, in file order."""

    blocks: list[str | DefectList] = field(default_factory=list)

    @property
    def lists(self) -> list[DefectList]:
        return [b for b in self.blocks if isinstance(b, DefectList)]


@dataclass(frozen=True)
class KlarfDefect:
    """One defect of a KLARF file as a manifest needs it."""

    lot_id: str
    wafer_id: str
    defect_id: int
    die_x: int
    die_y: int
    class_number: int
    tiff_file: str
    images: tuple[tuple[int, int], ...]
    result_time: str  # ISO 8601, "" when the file's ResultTimestamp is not a time


def read_text(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise KlarfError(f"KLARF {storage.redact(url)} does not exist") from None
    except (OSError, ValueError) as exc:
        raise KlarfError(f"cannot read KLARF {storage.redact(url)}: {one_line(exc)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # tools write ASCII; a stray byte in a free-text field must not stop a lot


def read_klarf(url: str, storage_options: Mapping[str, Any] | None = None) -> list[KlarfDefect]:
    """Every defect of one KLARF 1.1 / 1.2 file. Raises :class:`KlarfError`."""
    text = read_text(url, storage_options)
    laid = layout(text, url)
    content = parse(laid, url)
    return defects(content, laid, url)


def layout(text: str, where: str) -> Layout:
    """Lay out a KLARF 1.1 / 1.2 text (see the module docstring). Raises :class:`KlarfError`."""
    lines = text.splitlines()
    head = next((line.strip() for line in lines if line.strip()), "")
    if head.lower().startswith("record") and "filerecord" in head.lower().replace(" ", ""):
        raise KlarfError(f"KLARF {storage.redact(where)} is KLARF 1.8 (Record FileRecord): klarf-reader, the reader "
                         "used, parses KLARF 1.1 and 1.2; export 1.2 from the inspection or review tool")
    if not head.lower().startswith("fileversion"):
        raise KlarfError(f"{storage.redact(where)} is not a KLARF file (it does not start with FileVersion)")
    out = Layout()
    columns: list[str] = []
    wafer, tiff_lot, tiff_wafer = "", "", ""
    pending: list[DefectList] = []  # this wafer's lists still without a TiffFileName
    i = 0
    while i < len(lines):
        key = _key(lines[i])
        if key in ("defectrecordspec", "defectlist"):
            body, i = _statement(lines, i, where)
            if key == "defectrecordspec":
                columns = body.split()[1:]  # the first token is the column count
                out.blocks.append(f"DefectRecordSpec {len(columns)} {' '.join(columns)} ;")
                continue
            found = _defect_list(body.split(), columns, wafer, where)
            found.tiff_file = tiff_wafer
            if not tiff_wafer:
                pending.append(found)
            out.blocks.append(found)
            continue
        line = lines[i]
        if key == "waferid":
            wafer, tiff_wafer = _first_quoted(line), ""
            for orphan in pending:
                orphan.tiff_file = tiff_lot
            pending = []
        elif key == "tifffilename":
            name = _value(line)
            if wafer:
                tiff_wafer = name
                for orphan in pending:
                    orphan.tiff_file = name
                pending = []
            else:
                tiff_lot = name
        out.blocks.append(line)
        i += 1
    for orphan in pending:
        orphan.tiff_file = tiff_lot
    return out


def _key(line: str) -> str:
    stripped = line.lstrip()
    return stripped.split(None, 1)[0].rstrip(";").lower() if stripped else ""


def _first_quoted(line: str) -> str:
    found = _QUOTED.search(line)
    return found.group(1) if found else _value(line)


def _value(line: str) -> str:
    parts = line.strip().rstrip(";").split(None, 1)
    return parts[1].strip().strip('"') if len(parts) > 1 else ""


def _statement(lines: Sequence[str], start: int, where: str) -> tuple[str, int]:
    """The text of the statement starting at ``lines[start]`` after its keyword, up to its ``;`` (across lines),
    and the index of the line after it."""
    first = lines[start].lstrip()
    parts = [first.split(None, 1)[1] if len(first.split(None, 1)) > 1 else ""]
    i = start
    while ";" not in parts[-1]:
        i += 1
        if i >= len(lines):
            raise KlarfError(f"KLARF {storage.redact(where)}: {first.split(None, 1)[0]} on line {start + 1} never ends "
                             "(no ';')")
        parts.append(lines[i])
    parts[-1] = parts[-1].split(";", 1)[0]
    return " ".join(parts), i + 1


def _defect_list(tokens: list[str], columns: list[str], wafer: str, where: str) -> DefectList:
    if not columns:
        raise KlarfError(f"KLARF {storage.redact(where)}: a DefectList before any DefectRecordSpec")
    found = DefectList(wafer, columns, [], [])
    pos = 0
    while pos < len(tokens):
        record, images = [], []
        for column in columns:
            if pos >= len(tokens):
                raise KlarfError(f"KLARF {storage.redact(where)}: wafer {show(wafer)}'s defect list ends inside a "
                                 f"defect (no {column} for defect {len(found.records) + 1})")
            if column != IMAGELIST:
                record.append(tokens[pos])
                pos += 1
                continue
            count = _int(tokens[pos], where, f"{IMAGELIST} count")
            pairs = tokens[pos + 1: pos + 1 + 2 * count]
            if len(pairs) < 2 * count:
                raise KlarfError(f"KLARF {storage.redact(where)}: wafer {show(wafer)}: an {IMAGELIST} of {count} images "
                                 "is cut short")
            images = [(_int(a, where, "image number"), _int(b, where, "image type"))
                      for a, b in zip(pairs[::2], pairs[1::2], strict=True)]
            record.append(tokens[pos])
            pos += 1 + 2 * count
        found.records.append(record)
        found.images.append(images)
    return found


def _int(token: str, where: str, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        try:
            number = float(token)
        except ValueError:
            number = float("nan")
        if number.is_integer():
            return int(number)
        raise KlarfError(f"KLARF {storage.redact(where)}: {what} {show(token)} is not an integer") from None


def render(laid: Layout, *, with_images: bool = True) -> str:
    """The laid-out file as KLARF text: each defect on one line, its image list after it when ``with_images``
    (as the file gave it), else only the image count in the IMAGELIST column (what klarf-reader reads)."""
    out: list[str] = []
    for block in laid.blocks:
        if isinstance(block, str):
            out.append(block)
            continue
        out.append("DefectList")
        for record, images in zip(block.records, block.images, strict=True):
            tokens = list(record)
            if with_images and IMAGELIST in block.columns:
                k = block.column(IMAGELIST)
                tokens[k] = " ".join([str(len(images)), *(f"{n} {t}" for n, t in images)])
            out.append(" " + " ".join(tokens))
        out[-1] += ";"
    return "\n".join(out) + "\n"


def parse(laid: Layout, where: str) -> Any:
    """klarf-reader's ``KlarfContent`` of the laid-out text, checked against the layout. Raises
    :class:`KlarfError`."""
    from klarf_reader.readers.klarf_file_reader import convert_raw_to_klarf_content

    try:
        content = convert_raw_to_klarf_content(raw_content=iter(render(laid, with_images=False).splitlines(True)))
    except Exception as exc:  # noqa: BLE001 - the reader's errors are bare Exceptions, NameErrors on missing fields
        raise KlarfError(f"KLARF {storage.redact(where)} could not be parsed by klarf-reader: {_reader_reason(exc)}"
                         ) from None
    lists = laid.lists
    if len(content.wafers) != len(lists):
        raise KlarfError(f"KLARF {storage.redact(where)}: klarf-reader read {len(content.wafers)} wafers, the file has "
                         f"{len(lists)} defect lists")
    for wafer, found in zip(content.wafers, lists, strict=True):
        if [str(d.id) for d in wafer.defects] != [str(_int(t, where, "DEFECTID")) for t in found.defect_ids()]:
            raise KlarfError(f"KLARF {storage.redact(where)}: wafer {show(wafer.id)}: klarf-reader's defects differ from "
                             "the file's defect list")
    return content


def _reader_reason(exc: BaseException) -> str:
    missing = re.search(r"local variable '(\w+)'", str(exc))
    if isinstance(exc, (NameError, UnboundLocalError)) and missing:
        return f"a record it requires is missing ({missing.group(1)})"
    if isinstance(exc, (TypeError, KeyError)):
        return (f"a defect column it requires is missing ({one_line(exc)}); it needs DEFECTID XREL YREL XINDEX YINDEX "
                "XSIZE YSIZE DEFECTAREA DSIZE CLASSNUMBER TEST")
    return one_line(exc) or type(exc).__name__


def defects(content: Any, laid: Layout, where: str) -> list[KlarfDefect]:
    """The defects of a parsed file, each with its wafer's image file and image list."""
    when = result_time(str(getattr(content, "result_timestamp", "") or ""))
    out = []
    for wafer, found in zip(content.wafers, laid.lists, strict=True):
        for defect, images in zip(wafer.defects, found.images, strict=True):
            out.append(KlarfDefect(lot_id=str(content.lot_id), wafer_id=str(wafer.id), defect_id=int(defect.id),
                                   die_x=int(defect.x_index), die_y=int(defect.y_index),
                                   class_number=int(defect.class_number), tiff_file=found.tiff_file,
                                   images=tuple(images), result_time=when))
    return out


def result_time(stamp: str) -> str:
    """KLARF's ``MM-DD-YY HH:MM:SS`` as ISO 8601 (``20YY-MM-DDTHH:MM:SS``), "" when it is not one."""
    for fmt in ("%m-%d-%y %H:%M:%S", "%m-%d-%Y %H:%M:%S"):
        try:
            return datetime.strptime(stamp.strip().rstrip(";"), fmt).isoformat()
        except ValueError:
            continue
    return ""


def read_class_map(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[int, str]:
    """A class map file: CSV with columns ``class_number,label`` (or JSON ``{"1": "particle", ...}``), mapping
    KLARF class numbers to our class names. Several numbers may map to one class. Raises :class:`ConfigError`."""
    import csv
    import io
    import json

    try:
        text = storage.read_bytes(url, storage_options).decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"class map {storage.redact(url)} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read class map {storage.redact(url)}: {one_line(exc)}") from None
    pairs: list[tuple[str, str]]
    if url.lower().endswith(".json"):
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"class map {storage.redact(url)} is not JSON: {one_line(exc)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"class map {storage.redact(url)}: give a JSON object of class number -> class name")
        pairs = [(str(k), str(v)) for k, v in loaded.items()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or not {"class_number", "label"} <= set(rows[0]):
            raise ConfigError(f"class map {storage.redact(url)}: give a CSV with columns class_number,label")
        pairs = [(r["class_number"] or "", r["label"] or "") for r in rows]
    out: dict[int, str] = {}
    for number, label in pairs:
        try:
            key = int(number.strip())
        except ValueError:
            raise ConfigError(f"class map {storage.redact(url)}: class number {show(number)} is not an integer") from None
        if not label.strip():
            raise ConfigError(f"class map {storage.redact(url)}: class number {key} has no label")
        if key in out:
            raise ConfigError(f"class map {storage.redact(url)}: class number {key} is given twice")
        out[key] = label.strip()
    return out


def class_numbers(class_map: Mapping[int, str]) -> dict[str, int]:
    """Our class name -> the KLARF class number written for it: the first number the map gives it."""
    out: dict[str, int] = {}
    for number, label in class_map.items():
        out.setdefault(label, number)
    return out


def new_klarf(lot_id: str, wafers: Mapping[str, Sequence[tuple[int, int, int, int]]],
              class_map: Mapping[int, str], stamp: datetime) -> Layout:
    """A new KLARF 1.2 for one lot: per wafer, defects ``(defect_id, die_x, die_y, class_number)``; positions
    inside the die and sizes unknown (0), no images. ``ClassLookup`` lists ``class_map``."""
    when = stamp.strftime("%m-%d-%y %H:%M:%S")
    head = ["FileVersion 1 2;", f"FileTimestamp {when};", 'InspectionStationID "semclip-batch" "SEM-CLIP" "ADC";',
            "SampleType WAFER;", f"ResultTimestamp {when};", f"LotID {_quote(lot_id)};", "SampleSize 1 300;",
            'DeviceID "";', f'SetupID "semclip-batch" {when};', 'StepID "";', "SampleOrientationMarkType NOTCH;",
            "OrientationMarkLocation DOWN;", "DiePitch 1.0 1.0;", "DieOrigin 0.0 0.0;"]
    lookup = [f"ClassLookup {len(class_map)}", *(f" {n} {_quote(name)}" for n, name in sorted(class_map.items()))]
    lookup[-1] += ";"
    laid = Layout(blocks=[*head, *(lookup if class_map else [])])
    columns = list(STANDARD_COLUMNS)
    for slot, (wafer_id, rows) in enumerate(wafers.items(), start=1):
        laid.blocks += [f"WaferID {_quote(wafer_id)};", f"Slot {slot};", "SampleCenterLocation 0.0 0.0;",
                        "InspectionTest 1;", f"DefectRecordSpec {len(columns)} {' '.join(columns)} ;"]
        records = [[str(d), "0.0", "0.0", str(x), str(y), "0.0", "0.0", "0.0", "0.0", str(c), "1", "0", "0", "0",
                    "1", "0", "0"] for d, x, y, c in rows]
        laid.blocks.append(DefectList(wafer_id, columns, records, [[] for _ in records]))
        laid.blocks += ["SummarySpec 5 TESTNO NDEFECT DEFDENSITY NDIE NDEFDIE ;", "SummaryList",
                        f" 1 {len(records)} 0.0 {len({(x, y) for _, x, y, _ in rows})} "
                        f"{len({(x, y) for _, x, y, _ in rows})};"]
    laid.blocks.append("EndOfFile;")
    return laid


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def relabel(laid: Layout, classes: Mapping[tuple[str, int], int]) -> tuple[int, int]:
    """Set CLASSNUMBER of every defect ``(wafer_id, defect_id)`` in ``classes``; the others keep theirs. Returns
    (defects changed to the given number, defects left as they were)."""
    given = kept = 0
    for found in laid.lists:
        k, ids = found.column("CLASSNUMBER"), found.defect_ids()
        for record, defect_id in zip(found.records, ids, strict=True):
            number = classes.get((found.wafer_id, _int(defect_id, "", "DEFECTID")))
            if number is None:
                kept += 1
                continue
            record[k] = str(number)
            given += 1
    return given, kept

