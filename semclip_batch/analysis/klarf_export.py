"""``export klarf``: one lot's classes back to the fab's yield tools as KLARF 1.2 ``CLASSNUMBER`` values.

A defect's class is that of its ok prediction row (``defect_class`` when ``is_defect``, else ``normal``; with
several images per defect, the row with the highest anomaly score). Defects are identified by
(``wafer_id``, ``defect_id``): predictions do not carry ``defect_id``, the stored shard plan does.

- ``--klarf SOURCE`` (the KLARF the manifest was made from): that file comes back with only ``CLASSNUMBER``
  changed, for every defect the run scored; the others keep theirs (each defect on one line, image lists kept).
- Without it: a new KLARF 1.2 listing the lot's scored defects (die indices, class; positions and sizes 0).

Class numbers come from ``--class-map`` (the same file ``manifest from-klarf`` takes; a class several numbers map
to is written as the first of them), else the run record's classes numbered from 1 in their order; either way a
class without a number is written as 0 (unclassified) and counted. The result must read back through
klarf-reader before it is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from semclip_batch.errors import OutputError, show
from semclip_batch.io import storage
from semclip_batch.io.klarf import (
    UNCLASSIFIED,
    KlarfError,
    class_numbers,
    layout,
    new_klarf,
    parse,
    read_text,
    relabel,
    render,
)
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.plan import read_plan_columns
from semclip_batch.io.runrecord import read_latest
from semclip_batch.methods.prompts import NORMAL

PREDICTION_COLUMNS = ["image_id", "wafer_id", "die_x", "die_y", "status", "is_defect", "defect_class", "anomaly_score"]


@dataclass(frozen=True)
class Exported:
    """What ``export klarf`` wrote."""

    defects: int  # defects written with a class from this run
    kept: int  # defects of --klarf SOURCE left with their class (not scored by this run)
    error_rows: int  # rows of the lot that failed (their defects keep / get no class of ours)
    unnumbered: dict[str, int]  # our class without a number in the class map -> defects written as 0
    renumbered: bool  # defect ids were not integers and were numbered 1.. per wafer


def export_klarf(out: str, lot_id: str, dest: str, *, class_map: Mapping[int, str] | None = None,
                 source: str | None = None, storage_options: Mapping[str, Any] | None = None) -> Exported:
    """Write lot ``lot_id`` of OUT as KLARF 1.2 to ``dest``. Raises ``OutputError`` / ``KlarfError`` /
    ``ConfigError`` with one line."""
    so = dict(storage_options or {})
    layout_ = OutLayout(storage.normalize_root(out))
    rows = _lot_rows(layout_, lot_id, so)
    numbers = dict(class_numbers(class_map)) if class_map is not None else _default_numbers(layout_, so)
    unnumbered: Counter[str] = Counter()
    classes: dict[tuple[str, str], int] = {}
    for (wafer, defect), name in _defect_classes(rows).items():
        number = numbers.get(name)
        if number is None:
            unnumbered[name] += 1
        classes[(wafer, defect)] = UNCLASSIFIED if number is None else number
    errors = sum(1 for r in rows if r["status"] != "ok")
    if source is not None:
        laid = layout(read_text(source, so), source)
        content = parse(laid, source)
        if str(content.lot_id) != lot_id:
            raise KlarfError(f"KLARF {storage.redact(source)} is lot {show(str(content.lot_id))}, not {show(lot_id)}")
        given, kept = relabel(laid, _by_integer_id(classes))
        renumbered = False
    else:
        wafers, renumbered = _new_defects(rows, classes)
        lookup = class_map if class_map is not None else {n: c for c, n in numbers.items()}
        laid = new_klarf(lot_id, wafers, {UNCLASSIFIED: "unclassified", **lookup}, datetime.now(UTC))
        given, kept = sum(len(v) for v in wafers.values()), 0
    text = render(laid)
    parse(layout(text, dest), dest)  # what we write reads back through the same reader, or nothing is written
    storage.write_bytes(dest, text.encode(), so)
    return Exported(defects=given, kept=kept, error_rows=errors, unnumbered=dict(sorted(unnumbered.items())),
                    renumbered=renumbered)


def _lot_rows(layout_: OutLayout, lot_id: str, so: Mapping[str, Any]) -> list[dict[str, Any]]:
    folder = layout_.prediction_folder(lot_id)
    fs, path = storage.filesystem(folder, so)
    files = [f"{path}/{n}" for n in storage.list_names(folder, so) if n.endswith(".parquet")]
    if not files:
        lots = [n.split("=", 1)[1] for n in storage.list_names(layout_.predictions, so) if n.startswith("lot_id=")]
        if not lots:
            raise OutputError(f"{layout_.root} has no predictions/ yet (run `semclip-batch run ... --out` first)")
        listed = ", ".join(show(lot) for lot in lots[:10]) + (" ..." if len(lots) > 10 else "")
        raise OutputError(f"{layout_.root} has no predictions for lot {show(lot_id)} (lots: {listed})")
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=PREDICTION_COLUMNS)
    plan = read_plan_columns(layout_, ["defect_id"], so, lot_id=lot_id)
    ids = dict(zip(plan.column("image_id").to_pylist(), plan.column("defect_id").to_pylist(), strict=True))
    table = table.append_column("defect_id", pa.array([ids.get(i) for i in table.column("image_id").to_pylist()],
                                                      pa.string()))
    return table.sort_by([("wafer_id", "ascending"), ("image_id", "ascending")]).to_pylist()


def _default_numbers(layout_: OutLayout, so: Mapping[str, Any]) -> dict[str, int]:
    record = read_latest(layout_, so) or {}
    names = [str(c) for c in record.get("classes") or []]
    return {name: k for k, name in enumerate(names, start=1)}


def _defect_classes(rows: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(wafer_id, defect_id or image_id) -> our class of the defect's most anomalous ok row."""
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        key = (str(row["wafer_id"]), str(row["defect_id"] or row["image_id"]))
        name = str(row["defect_class"]) if row["is_defect"] and row["defect_class"] else NORMAL
        score = float(row["anomaly_score"] if row["anomaly_score"] is not None else -1.0)
        if key not in best or score > best[key][0]:
            best[key] = (score, name)
    return {k: name for k, (_, name) in best.items()}


def _by_integer_id(classes: Mapping[tuple[str, str], int]) -> dict[tuple[str, int], int]:
    out = {}
    for (wafer, defect), number in classes.items():
        try:
            out[(wafer, int(defect))] = number
        except ValueError:
            continue  # not a KLARF defect id: such a row did not come from this KLARF
    return out


def _new_defects(rows: list[dict[str, Any]], classes: Mapping[tuple[str, str], int]
                 ) -> tuple[dict[str, list[tuple[int, int, int, int]]], bool]:
    """Per wafer, ``(defect_id, die_x, die_y, class_number)`` of the scored defects; defect ids numbered 1.. per
    wafer when any is not an integer."""
    dies: dict[tuple[str, str], tuple[int, int]] = {}
    for row in rows:
        key = (str(row["wafer_id"]), str(row["defect_id"] or row["image_id"]))
        dies.setdefault(key, (int(row["die_x"] or 0), int(row["die_y"] or 0)))
    keys = [k for k in dies if k in classes]
    renumber = not all(_is_int(d) for _, d in keys)
    wafers: dict[str, list[tuple[int, int, int, int]]] = {}
    for wafer, defect in keys:
        listed = wafers.setdefault(wafer, [])
        number = len(listed) + 1 if renumber else int(defect)
        listed.append((number, *dies[(wafer, defect)], classes[(wafer, defect)]))
    return {w: sorted(listed) for w, listed in wafers.items()}, renumber


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True

