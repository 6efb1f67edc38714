"""``export klarf``: one lot's classes back to the fab's yield tools as KLARF 1.2 ``CLASSNUMBER`` values.

A defect's class is that of its ok prediction row (``defect_class`` when ``is_defect``, else ``normal``; with
several images per defect, the row with the highest anomaly score). Defects are identified by
(``wafer_id``, ``defect_id``): predictions do not carry ``defect_id``, the stored shard plan does.

- ``--klarf SOURCE`` (the KLARF the manifest was made from): that file comes back with only ``CLASSNUMBER``
  changed, for every defect the run scored; the others keep theirs (each defect on one line, image lists kept,
  every other line, the encoding and the line ends as they were). The source must be that lot's file: every
  scored defect must be in it, on the die the run scored.
- Without it: a new KLARF 1.2 listing the lot's scored defects (die indices, class; positions and sizes 0).

Class numbers come from ``--class-map`` (the same file ``manifest from-klarf`` takes; a class several numbers map
to is written as the first of them), else the run record's classes numbered from 1 in their order; either way a
class without a number is written as 0 (unclassified) and counted. The result must read back through
klarf-reader before it is written.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from semclip_batch.config import NORMAL
from semclip_batch.errors import OutputError, show
from semclip_batch.io import storage, targets
from semclip_batch.io.klarf import UNCLASSIFIED, KlarfError, Layout, layout, parse, read_layout
from semclip_batch.io.klarf_write import class_numbers, encode, new_klarf, relabel, render
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.plan import read_plan_columns
from semclip_batch.io.runrecord import read_latest

PREDICTION_COLUMNS = ["image_id", "uri", "wafer_id", "die_x", "die_y", "status", "is_defect", "defect_class",
                      "anomaly_score"]


@dataclass(frozen=True)
class Exported:
    """What ``export klarf`` wrote."""

    defects: int  # defects written with a class from this run
    kept: int  # defects of --klarf SOURCE left with their class (not scored by this run)
    error_rows: int  # rows of the lot that failed (their defects keep / get no class of ours)
    unnumbered: dict[str, int]  # our class without a number in the class map -> defects written as 0
    renumbered: bool  # defect ids were not integers and were numbered 1.. per wafer


@dataclass(frozen=True)
class Scored:
    """One scored defect: its die and our class."""

    die: tuple[int, int]
    name: str
    has_defect_id: bool  # keyed by the manifest's defect_id (else by image_id)


def export_klarf(out: str, lot_id: str, dest: str, *, class_map: Mapping[int, str] | None = None,
                 source: str | None = None, class_map_url: str | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> Exported:
    """Write lot ``lot_id`` of OUT as KLARF 1.2 to ``dest``. ``class_map_url``: the file ``class_map`` was read
    from, refused as ``dest`` like ``source`` is (the export would overwrite it). Raises ``OutputError`` /
    ``KlarfError`` / ``ConfigError`` with one line."""
    so = dict(storage_options or {})
    layout_ = OutLayout(storage.normalize_root(out))
    _check_dest(dest, layout_, {"--klarf source": source, "--class-map file": class_map_url}, so)
    rows = _lot_rows(layout_, lot_id, so)
    errors = sum(1 for r in rows if r["status"] != "ok")
    scored = _scored_defects(rows, lot_id)
    numbers = dict(class_numbers(class_map)) if class_map is not None else _default_numbers(layout_, so)
    unnumbered: Counter[str] = Counter(d.name for d in scored.values() if d.name not in numbers)
    classes = {key: numbers.get(d.name, UNCLASSIFIED) for key, d in scored.items()}
    if source is not None:
        laid = read_layout(source, so)
        content = parse(laid, source)
        if str(content.lot_id) != lot_id:
            raise KlarfError(f"KLARF {storage.redact(source)} is lot {show(str(content.lot_id))}, not {show(lot_id)}")
        by_id = _integer_ids(scored, source)
        _check_source(laid, by_id, scored, source)
        given, kept = relabel(laid, {k: classes[key] for k, key in by_id.items()})
        data, renumbered = encode(laid), False
    else:
        if not scored:
            raise OutputError(f"lot {show(lot_id)} has no scored row ({errors} error row(s)): nothing to export")
        wafers, renumbered = _new_defects(scored, classes)
        lookup = class_map if class_map is not None else {n: c for c, n in numbers.items()}
        laid = new_klarf(lot_id, wafers, {UNCLASSIFIED: "unclassified", **lookup}, datetime.now(UTC))
        given, kept = sum(len(v) for v in wafers.values()), 0
        data = encode(laid)
    parse(layout(render(laid), dest), dest)  # what we write reads back through the same reader, or nothing is
    storage.write_bytes(dest, data, so)
    return Exported(defects=given, kept=kept, error_rows=errors, unnumbered=dict(sorted(unnumbered.items())),
                    renumbered=renumbered)


def _check_dest(dest: str, layout_: OutLayout, inputs: Mapping[str, str | None], so: Mapping[str, Any]) -> None:
    """``dest`` must lie outside OUT and be none of the files the command reads (``inputs``: what each is ->
    its path, None when not given), so the export never overwrites what it reads."""
    targets.refuse_inside_out(dest, layout_.root, "--out (the KLARF to write)")
    targets.refuse_overwriting_inputs(dest, inputs)
    targets.check_target(dest, "file", "--out (the KLARF to write)", so)


def _lot_rows(layout_: OutLayout, lot_id: str, so: Mapping[str, Any]) -> list[dict[str, Any]]:
    folder = layout_.prediction_folder(lot_id)
    fs, path = storage.filesystem(folder, so)
    files = [f"{path}/{n}" for n in storage.list_names(folder, so) if n.endswith(".parquet")]
    if not files and not read_plan_columns(layout_, [], so, lot_id=lot_id).num_rows:
        lots = [n.split("=", 1)[1] for n in storage.list_names(layout_.predictions, so) if n.startswith("lot_id=")]
        if not lots:
            raise OutputError(f"{layout_.root} has no predictions/ yet (run `semclip-batch run ... --out` first)")
        listed = ", ".join(show(lot) for lot in lots[:10]) + (" ..." if len(lots) > 10 else "")
        raise OutputError(f"{layout_.root} has no predictions for lot {show(lot_id)} (lots: {listed})")
    plan = read_plan_columns(layout_, ["defect_id"], so, lot_id=lot_id, required=True)
    if not files:
        raise _unfinished(layout_, lot_id, 0, plan.num_rows)
    table = pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=PREDICTION_COLUMNS)
    ids = dict(zip(plan.column("image_id").to_pylist(), plan.column("defect_id").to_pylist(), strict=True))
    scored = table.column("image_id").to_pylist()
    stored = len(ids.keys() & set(scored))
    if stored < plan.num_rows:
        raise _unfinished(layout_, lot_id, stored, plan.num_rows)
    table = table.append_column("defect_id", pa.array([ids.get(i) or None for i in scored], pa.string()))
    return table.sort_by([("wafer_id", "ascending"), ("image_id", "ascending")]).to_pylist()


def _unfinished(layout_: OutLayout, lot_id: str, stored: int, planned: int) -> OutputError:
    """A lot some of whose rows the run has not stored yet (killed, or failed on a shard): a KLARF of it would
    silently lack defects."""
    return OutputError(f"lot {show(lot_id)} is not finished in {layout_.root}: {stored} of its {planned} rows are "
                       "stored; rerun `semclip-batch run` into it (it resumes), then export")


def _default_numbers(layout_: OutLayout, so: Mapping[str, Any]) -> dict[str, int]:
    record = read_latest(layout_, so) or {}
    names = [str(c) for c in record.get("classes") or []]
    return {name: k for k, name in enumerate(names, start=1)}


def _scored_defects(rows: list[dict[str, Any]], lot_id: str) -> dict[tuple[str, str], Scored]:
    """(wafer_id, defect_id) -> the defect's die and the class of its most anomalous ok row; rows without a
    defect_id are keyed by their image_id. A defect id that names images of two files in one wafer (two
    inspections of it in one run) is refused: the KLARF could not tell them apart."""
    best: dict[tuple[str, str], tuple[float, Scored]] = {}
    files: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in rows:
        if row["status"] != "ok":
            continue
        key = (str(row["wafer_id"]), str(row["defect_id"] or row["image_id"]))
        files[key].add(str(row["uri"]))
        name = str(row["defect_class"]) if row["is_defect"] and row["defect_class"] else NORMAL
        score = float(row["anomaly_score"] if row["anomaly_score"] is not None else -1.0)
        scored = Scored(die=(int(row["die_x"] or 0), int(row["die_y"] or 0)), name=name,
                        has_defect_id=row["defect_id"] is not None)
        if key not in best or score > best[key][0]:
            best[key] = (score, scored)
    for (wafer, defect), uris in files.items():
        if len(uris) > 1:
            raise OutputError(f"lot {show(lot_id)} wafer {show(wafer)}: defect id {show(defect)} names images of "
                              f"{len(uris)} files (two inspections in one run?): export needs one KLARF's defects per "
                              "run")
    return {k: s for k, (_, s) in best.items()}


def _integer_ids(scored: Mapping[tuple[str, str], Scored], source: str) -> dict[tuple[str, int], tuple[str, str]]:
    """(wafer_id, KLARF defect id) -> the scored key, for rows whose defect_id is an integer (a KLARF's)."""
    out = {}
    for (wafer, defect), s in scored.items():
        if not s.has_defect_id:
            continue
        try:
            out[(wafer, int(defect))] = (wafer, defect)
        except ValueError:
            continue
    if scored and not out:
        raise KlarfError(f"no scored row of this lot has a KLARF defect id, so none can be matched in "
                         f"{storage.redact(source)}: run a manifest from `manifest from-klarf`, or export without --klarf")
    return out


def _check_source(laid: Layout, by_id: Mapping[tuple[str, int], tuple[str, str]],
                  scored: Mapping[tuple[str, str], Scored], source: str) -> None:
    """Every scored defect is in the source, on the die the run scored: else it is another inspection's file."""
    dies: dict[tuple[str, int], tuple[int, int]] = {}
    repeated: set[tuple[str, int]] = set()
    for found in laid.lists:
        kx, ky = found.column("XINDEX"), found.column("YINDEX")
        for record, defect_id in zip(found.records, found.defect_ids(), strict=True):
            key = (found.wafer_id, int(float(defect_id)))
            if key in dies:
                repeated.add(key)
            dies[key] = (int(float(record[kx])), int(float(record[ky])))
    ambiguous = sorted(k for k in by_id if k in repeated)
    if ambiguous:
        raise KlarfError(f"KLARF {storage.redact(source)} lists wafer {show(ambiguous[0][0])} defect {ambiguous[0][1]} "
                         "more than once: its records cannot be told apart to relabel (export without --klarf)")
    missing = [k for k in by_id if k not in dies]
    if missing:
        wafers = sorted({w for w, _ in missing})
        raise KlarfError(f"KLARF {storage.redact(source)} lacks {len(missing)} scored defect(s), e.g. wafer "
                         f"{show(missing[0][0])} defect {missing[0][1]} (wafers {', '.join(map(show, wafers[:5]))}): "
                         "not the file the manifest was made from")
    moved = [(k, dies[k]) for k, key in by_id.items() if dies[k] != scored[key].die]
    if moved:
        (wafer, defect), die = moved[0]
        raise KlarfError(f"KLARF {storage.redact(source)}: wafer {show(wafer)} defect {defect} is on die {die}, the run "
                         f"scored it on die {scored[by_id[(wafer, defect)]].die} ({len(moved)} such defect(s)): not the "
                         "file the manifest was made from")


def _new_defects(scored: Mapping[tuple[str, str], Scored], classes: Mapping[tuple[str, str], int]
                 ) -> tuple[dict[str, list[tuple[int, int, int, int]]], bool]:
    """Per wafer, ``(defect_id, die_x, die_y, class_number)`` sorted by id; defect ids numbered 1.. per wafer when
    any is not an integer."""
    renumber = not all(_is_int(d) for _, d in scored)
    wafers: dict[str, list[tuple[int, int, int, int]]] = {}
    for (wafer, defect), s in scored.items():
        listed = wafers.setdefault(wafer, [])
        number = len(listed) + 1 if renumber else int(defect)
        listed.append((number, *s.die, classes[(wafer, defect)]))
    return {w: sorted(listed) for w, listed in wafers.items()}, renumber


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
