"""Writing KLARF files (``export klarf``): a laid-out file (:func:`.klarf.layout`) re-emitted with our class numbers
(:func:`relabel`, :func:`render`), or a new KLARF 1.2 for a lot that has none (:func:`new_klarf`); and the class map
that says which KLARF class number each of our classes is (``--class-map``, read by ``manifest from-klarf`` too).
What is written reads back through :mod:`.klarf`. Both KLARF commands refuse an ``--out`` that names a file they
read (:func:`~semclip_batch.io.storage.refuse_overwriting_inputs`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from semclip_batch.errors import ConfigError, one_line, show
from semclip_batch.io import storage
from semclip_batch.io.klarf import IMAGELIST, STANDARD_COLUMNS, DefectList, Layout, klarf_int


def render(laid: Layout) -> str:
    """The laid-out file as KLARF text, as it was written except that each defect sits on one line with its
    image list after it (klarf-reader and people read that; so does every KLARF 1.2 reader)."""
    out: list[str] = []
    for block in laid.blocks:
        if isinstance(block, str):
            out.append(block)
            continue
        out.append("DefectList")
        for record, images in zip(block.records, block.images, strict=True):
            out.append(" " + " ".join(_with_images(block, record, images)))
        out[-1] += ";"
    return ("\ufeff" if laid.bom else "") + laid.newline.join(out) + laid.newline


def encode(laid: Layout) -> bytes:
    """:func:`render` in the encoding the file was read with."""
    return render(laid).encode(laid.encoding)


def _with_images(found: DefectList, record: list[str], images: list[tuple[int, int]]) -> list[str]:
    if IMAGELIST not in found.columns:
        return record
    tokens = list(record)
    tokens[found.column(IMAGELIST)] = " ".join([str(len(images)), *(f"{n} {t}" for n, t in images)])
    return tokens


def read_class_map(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[int, str]:
    """A class map file: CSV with columns ``class_number,label`` (or JSON ``{"1": "particle", ...}``), mapping
    KLARF class numbers to our class names. Several numbers may map to one class. Raises :class:`ConfigError`."""
    try:
        text = storage.read_bytes(url, storage_options).decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"class map {storage.redact(url)} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read class map {storage.redact(url)}: {one_line(exc)}") from None
    pairs: list[tuple[str, str]]
    if url.lower().endswith(".json"):
        try:
            loaded = json.loads(text, object_pairs_hook=_Pairs)
        except ValueError as exc:
            raise ConfigError(f"class map {storage.redact(url)} is not JSON: {one_line(exc)}") from None
        if not isinstance(loaded, _Pairs) or any(not isinstance(v, str) for _, v in loaded):
            raise ConfigError(f"class map {storage.redact(url)}: give a JSON object of class number -> class name "
                              '(e.g. {"11": "particle"})')
        pairs = [(str(k), v) for k, v in loaded]
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


class _Pairs(list[tuple[str, Any]]):
    """A JSON object's (key, value) pairs, in order and with repeated keys kept (to refuse them)."""


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
            "SampleType WAFER;", f"ResultTimestamp {when};", f"LotID {_quote(lot_id, 'lot id')};", "SampleSize 1 300;",
            'DeviceID "";', f'SetupID "semclip-batch" {when};', 'StepID "";', "SampleOrientationMarkType NOTCH;",
            "OrientationMarkLocation DOWN;", "DiePitch 1.0 1.0;", "DieOrigin 0.0 0.0;"]
    lookup = [f"ClassLookup {len(class_map)}", *(f" {n} {_quote(name, 'class name')}" for n, name in sorted(class_map.items()))]
    lookup[-1] += ";"
    laid = Layout(blocks=[*head, *(lookup if class_map else [])])
    columns = list(STANDARD_COLUMNS)
    for slot, (wafer_id, rows) in enumerate(wafers.items(), start=1):
        laid.blocks += [f"WaferID {_quote(wafer_id, 'wafer id')};", f"Slot {slot};", "SampleCenterLocation 0.0 0.0;",
                        "InspectionTest 1;", f"DefectRecordSpec {len(columns)} {' '.join(columns)} ;"]
        records = [[str(d), "0.0", "0.0", str(x), str(y), "0.0", "0.0", "0.0", "0.0", str(c), "1", "0", "0", "0",
                    "1", "0", "0"] for d, x, y, c in rows]
        laid.blocks.append(DefectList(wafer_id, columns, records, [[] for _ in records]))
        laid.blocks += ["SummarySpec 5 TESTNO NDEFECT DEFDENSITY NDIE NDEFDIE ;", "SummaryList",
                        f" 1 {len(records)} 0.0 {len({(x, y) for _, x, y, _ in rows})} "
                        f"{len({(x, y) for _, x, y, _ in rows})};"]
    laid.blocks.append("EndOfFile;")
    return laid


def _quote(text: str, what: str) -> str:
    """``text`` as a KLARF string. One holding a double quote or a control character other than a tab (a newline) is
    refused: KLARF has no escape for either, and a changed id would name a lot or wafer the yield tool does not know.
    Raises :class:`ConfigError`."""
    if '"' in text or any((ord(c) < 32 and c != "\t") or ord(c) == 127 for c in text):
        raise ConfigError(f"the {what} {show(text)} holds a double quote or a control character, which a KLARF string "
                          "cannot carry: export another lot, or rerun with ids without them")
    return f'"{text}"'


def relabel(laid: Layout, classes: Mapping[tuple[str, int], int]) -> tuple[int, int]:
    """Set CLASSNUMBER of every defect ``(wafer_id, defect_id)`` in ``classes``; the others keep theirs. Returns
    (defects changed to the given number, defects left as they were)."""
    given = kept = 0
    for found in laid.lists:
        k, ids = found.column("CLASSNUMBER"), found.defect_ids()
        for record, defect_id in zip(found.records, ids, strict=True):
            number = classes.get((found.wafer_id, klarf_int(defect_id, "", "DEFECTID")))
            if number is None:
                kept += 1
                continue
            record[k] = str(number)
            given += 1
    return given, kept

