"""KLARF 1.1 / 1.2 defect files: read into manifests (``manifest from-klarf``), written back with our classes.

Parsing is klarf-reader's (PyPI ``klarf-reader``, MIT): lot, wafers, slots, the defect columns by name. It reads
a defect list only as one line per defect and does not read image lists or image file names, so this module
lays the file out first, narrowly (:func:`layout`): each ``DefectRecordSpec`` and each defect on one line, each
defect's ``IMAGELIST`` (a count, then that many ``image-number image-type`` pairs; image numbers are 1-based
pages of the wafer's ``TiffFileName``) kept aside, and each wafer's ``TiffFileName`` (it may come before or
after its defect list). klarf-reader then parses the laid-out text, and the two are checked against each other
(same wafers, same defect ids in the same order). KLARF 1.8 (``Record FileRecord "1.8"``) is refused in one
line: klarf-reader does not parse it.

Writing (:mod:`.klarf_write`) re-emits a laid-out file with new class numbers, or a new KLARF 1.2; what is written
reads back through this reader.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from semclip_batch.errors import ManifestError, one_line, show
from semclip_batch.io import storage

IMAGELIST = "IMAGELIST"
STANDARD_COLUMNS = ("DEFECTID", "XREL", "YREL", "XINDEX", "YINDEX", "XSIZE", "YSIZE", "DEFECTAREA", "DSIZE",
                    "CLASSNUMBER", "TEST", "CLUSTERNUMBER", "ROUGHBINNUMBER", "FINEBINNUMBER", "REVIEWSAMPLE",
                    "IMAGECOUNT", IMAGELIST)
UNCLASSIFIED = 0  # KLARF's class number for "not classified"
_QUOTED = re.compile(r'"([^"]*)"')
_KEYWORD = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)")
# The records klarf-reader recognises, each by the start of a line: a vendor record whose name merely starts
# with one (LotIDSuffix, SlotMap) would overwrite it there, so such lines are not shown to the reader.
READER_KEYS = ("fileversion", "filetimestamp", "inspectionstationid", "sampletype", "resulttimestamp", "lotid",
               "samplesize", "deviceid", "setupid", "stepid", "sampleorientationmarktype", "orientationmarklocation",
               "diepitch", "dieorigin", "samplecenterlocation", "waferid", "slot", "inspectiontest", "areapertest",
               "defectrecordspec", "defectlist", "summarylist", "sampletestplan")
_QUOTED_IDS = ("lotid", "waferid", "deviceid", "stepid", "setupid")


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
    """A KLARF file as lines and defect lists, in file order, and how its text was written (for writing it
    back byte for byte where nothing changed)."""

    blocks: list[str | DefectList] = field(default_factory=list)
    newline: str = "\n"
    encoding: str = "utf-8"
    bom: bool = False

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
    index: int = 1  # 1-based position in its wafer's defect list


def read_text(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """The file's text and the encoding it was read with (UTF-8, else Latin-1: tools write ASCII, and a stray
    byte in a free-text field must not stop a lot)."""
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise KlarfError(f"KLARF {storage.redact(url)} does not exist") from None
    except IsADirectoryError:
        raise KlarfError(f"KLARF {storage.redact(url)} is a folder, not a file") from None
    except (OSError, ValueError) as exc:
        raise KlarfError(f"cannot read KLARF {storage.redact(url)}: {one_line(exc)}") from None
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def read_klarf(url: str, storage_options: Mapping[str, Any] | None = None) -> list[KlarfDefect]:
    """Every defect of one KLARF 1.1 / 1.2 file. Raises :class:`KlarfError`."""
    laid = read_layout(url, storage_options)
    return defects(parse(laid, url), laid)


def read_layout(url: str, storage_options: Mapping[str, Any] | None = None) -> Layout:
    text, encoding = read_text(url, storage_options)
    laid = layout(text, url)
    laid.encoding = encoding
    return laid


def layout(text: str, where: str) -> Layout:
    """Lay out a KLARF 1.1 / 1.2 text (see the module docstring). Raises :class:`KlarfError`."""
    out = Layout(newline="\r\n" if "\r\n" in text else "\n", bom=text.startswith("\ufeff"))
    lines = text.removeprefix("\ufeff").splitlines()
    head = next((line.strip() for line in lines if line.strip()), "")
    if head.lower().startswith("record") and "filerecord" in head.lower().replace(" ", ""):
        raise KlarfError(f"KLARF {storage.redact(where)} is KLARF 1.8 (Record FileRecord): klarf-reader, the reader "
                         "used, parses KLARF 1.1 and 1.2; export 1.2 from the inspection or review tool")
    if _key(head) != "fileversion":
        raise KlarfError(f"{storage.redact(where)} is not a KLARF file (it does not start with FileVersion)")
    columns: list[str] = []
    events: list[tuple[str, str | DefectList]] = []  # ("wafer", id) / ("tiff", name) / ("list", DefectList)
    lots: list[str] = []
    wafer = ""
    i = 0
    while i < len(lines):
        key = _key(lines[i])
        if key in ("defectrecordspec", "defectlist"):
            body, i, rest = _statement(lines, i, where)
            if rest.strip():  # another record after the ';' on the same line: read it as a line of its own
                i -= 1
                lines[i] = rest
            if key == "defectrecordspec":
                columns = body.split()[1:]  # the first token is the column count
                out.blocks.append(f"DefectRecordSpec {len(columns)} {' '.join(columns)} ;")
                continue
            found = _defect_list(body.split(), columns, wafer, where)
            events.append(("list", found))
            out.blocks.append(found)
            continue
        line = lines[i]
        if key == "waferid":
            wafer = _value(line).strip()
            events.append(("wafer", wafer))
        elif key == "tifffilename":
            events.append(("tiff", _file_name(_value(line))))
        elif key == "lotid":
            lots.append(_value(line))
        out.blocks.append(line)
        i += 1
    if len(set(lots)) > 1:
        raise KlarfError(f"KLARF {storage.redact(where)} holds several lots ({', '.join(map(show, sorted(set(lots))))}): "
                         "give one file per lot")
    _assign_tiff_files(events)
    return out


def _assign_tiff_files(events: list[tuple[str, str | DefectList]]) -> None:
    """Each defect list's ``TiffFileName``. Tools write it inside the wafer's records (before or after its
    defect list), once before the first WaferID for the whole lot, or before each wafer's WaferID. The last
    layout is recognised when every name sits before the first WaferID or between a defect list and the next
    WaferID, one precedes the first WaferID and none follows the last list; each list then takes the last name
    before it."""
    kinds = [kind for kind, _ in events]
    if "list" not in kinds or "tiff" not in kinds:
        return
    first_wafer = kinds.index("wafer") if "wafer" in kinds else len(kinds)
    last_list = max(k for k, kind in enumerate(kinds) if kind == "list")
    tiffs = [k for k, kind in enumerate(kinds) if kind == "tiff"]
    if tiffs[0] < first_wafer and tiffs[-1] < last_list and all(_previous(kinds, k) in (None, "list") for k in tiffs):
        current = ""
        for kind, value in events:
            if isinstance(value, DefectList):
                value.tiff_file = current
            elif kind == "tiff":
                current = value
        return
    lot_level = next((str(v) for kind, v in reversed(events[:first_wafer]) if kind == "tiff"), "")
    section: list[tuple[str, str | DefectList]] = []
    for kind, value in [*events[first_wafer:], ("wafer", "")]:
        if kind == "wafer":
            _name_lists(section, lot_level)
            section = []
        section.append((kind, value))
    _name_lists(events[:first_wafer], lot_level)


def _previous(kinds: list[str], k: int) -> str | None:
    """The kind of the nearest wafer or list event before ``k``."""
    return next((kinds[j] for j in range(k - 1, -1, -1) if kinds[j] != "tiff"), None)


def _name_lists(section: list[tuple[str, str | DefectList]], lot_level: str) -> None:
    """Within one wafer's records: each list takes the last name before it, else the first after it, else the
    lot's."""
    names = [(k, str(v)) for k, (kind, v) in enumerate(section) if kind == "tiff"]
    for k, (kind, value) in enumerate(section):
        if kind != "list":
            continue
        assert isinstance(value, DefectList)
        before = [n for j, n in names if j < k]
        after = [n for j, n in names if j > k]
        value.tiff_file = before[-1] if before else after[0] if after else lot_level


def _key(line: str) -> str:
    found = _KEYWORD.match(line)
    return found.group(1).lower() if found else ""


def _value(line: str) -> str:
    """A one-value record's value: the first quoted string, else the first word after the keyword."""
    quoted = _QUOTED.search(line)
    if quoted:
        return quoted.group(1)
    parts = line.strip().split(";", 1)[0].split(None, 1)
    return parts[1].strip() if len(parts) > 1 else ""


def _file_name(name: str) -> str:
    """A ``TiffFileName`` as a name below ``--images``: a Windows or UNC path written by the review station
    (``C:\\Review\\x.tif``, ``\\\\server\\share\\x.tif``) gives its last part."""
    if "\\" in name or re.match(r"^[A-Za-z]:", name):
        return re.split(r"[\\/]", name)[-1]
    return name


def _statement(lines: Sequence[str], start: int, where: str) -> tuple[str, int, str]:
    """The text of the statement starting at ``lines[start]`` after its keyword, up to its ``;`` (across lines);
    the index of the line after it; and what follows the ``;`` on its last line."""
    found = _KEYWORD.match(lines[start])
    keyword = found.group(1) if found else ""
    parts = [lines[start][found.end():] if found else lines[start]]
    i = start
    while ";" not in parts[-1]:
        i += 1
        if i >= len(lines):
            raise KlarfError(f"KLARF {storage.redact(where)}: {keyword} on line {start + 1} never ends (no ';')")
        parts.append(lines[i])
    parts[-1], rest = parts[-1].split(";", 1)
    return " ".join(parts), i + 1, rest


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
            count = klarf_int(tokens[pos], where, f"{IMAGELIST} count")
            pairs = tokens[pos + 1: pos + 1 + 2 * count]
            if len(pairs) < 2 * count:
                raise KlarfError(f"KLARF {storage.redact(where)}: wafer {show(wafer)}: an {IMAGELIST} of {count} images "
                                 "is cut short")
            images = [(klarf_int(a, where, "image number"), klarf_int(b, where, "image type"))
                      for a, b in zip(pairs[::2], pairs[1::2], strict=True)]
            record.append(tokens[pos])
            pos += 1 + 2 * count
        found.records.append(record)
        found.images.append(images)
    return found


def klarf_int(token: str, where: str, what: str) -> int:
    """A KLARF integer token (``7`` or ``7.0``); one line naming the file and the field where it is not one."""
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


def reader_text(laid: Layout) -> list[str]:
    """The lines klarf-reader is given: records one per line with single spaces, continuation lines indented by
    one space (how it tells them apart), ids quoted, blank lines and records it would mistake for its own left
    out; each defect on one line with IMAGELIST as its image count."""
    out: list[str] = []
    for block in laid.blocks:
        if isinstance(block, DefectList):
            out += ["DefectList\n", *(f" {' '.join(r)}\n" for r in block.records)]
            out[-1] = out[-1][:-1] + ";\n"
        elif (line := _for_reader(block)) is not None:
            out.append(line + "\n")
    return out


def _for_reader(line: str) -> str | None:
    text = _collapse(line)
    if not text:
        return None
    key = _key(text)
    if not key:
        return " " + text  # a continuation line: numbers or quoted names
    if key not in READER_KEYS and any(key.startswith(k) for k in READER_KEYS):
        return None
    if key in _QUOTED_IDS and '"' not in text:
        value = text.split(None, 1)[1].rstrip(";").strip() if " " in text else ""
        first, _, rest = value.partition(" ")
        text = f'{text.split(None, 1)[0]} "{first if key == "setupid" else value}"'
        text += f" {rest};" if key == "setupid" and rest else ";"
    if key == "inspectionstationid":
        fields = _QUOTED.findall(text)
        if 0 < len(fields) < 3:
            text = text.split(None, 1)[0] + " " + " ".join(f'"{f}"' for f in [*fields, "", ""][:3]) + ";"
    return text


def _collapse(line: str) -> str:
    """Whitespace runs outside double quotes as one space, none before ';', and nothing after the last ';'."""
    pieces = line.split('"')
    pieces[::2] = [re.sub(r"\s+", " ", p) for p in pieces[::2]]  # the even pieces lie outside quotes
    text = '"'.join(pieces).strip().replace(" ;", ";")
    return text[: text.rfind(";") + 1] if ";" in text and text.count('"') % 2 == 0 else text


def parse(laid: Layout, where: str) -> Any:
    """klarf-reader's ``KlarfContent`` of the laid-out text, checked against the layout (same wafers, same defect
    ids in order). Raises :class:`KlarfError`."""
    from klarf_reader.readers.klarf_file_reader import convert_raw_to_klarf_content

    try:
        content = convert_raw_to_klarf_content(raw_content=iter(reader_text(laid)))
    except Exception as exc:  # noqa: BLE001 - the reader's errors are bare Exceptions, NameErrors on missing fields
        raise KlarfError(f"KLARF {storage.redact(where)} could not be parsed by klarf-reader: {_reader_reason(exc)}"
                         ) from None
    lists = laid.lists
    if len(content.wafers) != len(lists):
        raise KlarfError(f"KLARF {storage.redact(where)}: klarf-reader read {len(content.wafers)} wafers, the file has "
                         f"{len(lists)} defect lists")
    for wafer, found in zip(content.wafers, lists, strict=True):
        if str(wafer.id).strip() != found.wafer_id:
            raise KlarfError(f"KLARF {storage.redact(where)}: klarf-reader read wafer {show(str(wafer.id))} where the "
                             f"file has {show(found.wafer_id)}")
        if [str(d.id) for d in wafer.defects] != [str(klarf_int(t, where, "DEFECTID")) for t in found.defect_ids()]:
            raise KlarfError(f"KLARF {storage.redact(where)}: wafer {show(found.wafer_id)}: klarf-reader's defects "
                             "differ from the file's defect list")
    return content


def _reader_reason(exc: BaseException) -> str:
    missing = re.search(r"local variable '(\w+)'", str(exc))
    if isinstance(exc, (NameError, UnboundLocalError)) and missing:
        return f"a record it requires is missing ({missing.group(1)})"
    if isinstance(exc, (TypeError, KeyError)):
        return (f"a defect column it requires is missing ({one_line(exc)}); it needs DEFECTID XREL YREL XINDEX YINDEX "
                "XSIZE YSIZE DEFECTAREA DSIZE CLASSNUMBER TEST")
    return one_line(exc) or type(exc).__name__


def defects(content: Any, laid: Layout) -> list[KlarfDefect]:
    """The defects of a parsed file, each with its wafer's image file and image list."""
    when = result_time(str(getattr(content, "result_timestamp", "") or ""))
    out = []
    for wafer, found in zip(content.wafers, laid.lists, strict=True):
        for index, (defect, images) in enumerate(zip(wafer.defects, found.images, strict=True), start=1):
            out.append(KlarfDefect(lot_id=str(content.lot_id), wafer_id=found.wafer_id, defect_id=int(defect.id),
                                   die_x=int(defect.x_index), die_y=int(defect.y_index),
                                   class_number=int(defect.class_number), tiff_file=found.tiff_file,
                                   images=tuple(images), result_time=when, index=index))
    return out


def result_time(stamp: str) -> str:
    """KLARF's ``MM-DD-YY HH:MM:SS`` as ISO 8601 (``20YY-MM-DDTHH:MM:SS``), "" when it is not one."""
    for fmt in ("%m-%d-%y %H:%M:%S", "%m-%d-%Y %H:%M:%S"):
        try:
            return datetime.strptime(stamp.strip().rstrip(";"), fmt).isoformat()
        except ValueError:
            continue
    return ""
