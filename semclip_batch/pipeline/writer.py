"""The write stage: each call owns the objects it writes (README "Architecture": ownership).

Rows of one batch are grouped by work shard; each group is a *part* named by a hash of its image_ids and
stored as one Parquet file ``_state/parts/<lot>/<shard>/<part>.parquet`` of :data:`~semclip_batch.io.schema.PART`
rows: the prediction row and, for ok rows, its uint8 mask. Parts are whole-object writes, so no two writers
ever write the same object and a retried call rewrites its own. The stage returns one receipt row per image;
once a shard's rows all have receipts, :mod:`semclip_batch.pipeline.finalise` turns its parts into the
shard's final Parquet file and Zarr group.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semclip_batch.config import Thresholds
from semclip_batch.errors import OK, WRITE_ERROR, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.schema import PART, RECEIPTS, missing, to_table
from semclip_batch.methods.decisions import decide, defect_regions, weighed_class_scores, weighs_class_scores

PART_GROUP_BYTES = 32 << 20
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriterSetup:
    out: str
    run_id: str
    model_id: str
    classes: tuple[str, ...]
    thresholds: Thresholds
    storage_options: dict[str, Any]


def part_name(image_ids: list[str]) -> str:
    """Deterministic part id: a retried write of the same rows rewrites the same objects."""
    return hashlib.sha1(",".join(sorted(image_ids)).encode()).hexdigest()[:12]


def write_batch(batch: dict[str, np.ndarray], *, setup: WriterSetup) -> pa.Table:
    """Ray Data map function: write predictions + masks, return one receipt per row
    (:data:`~semclip_batch.io.schema.RECEIPTS`). A part that cannot be stored (after the storage layer's
    retries) gives receipts with ``written`` False, so the driver leaves its shard without a marker."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, (lot, shard) in enumerate(zip(batch["lot_id"], batch["shard"], strict=False)):
        groups[(str(lot), str(shard))].append(i)
    written = np.ones(len(batch["image_id"]), dtype=bool)
    errors = np.full(len(batch["image_id"]), None, dtype=object)
    for (lot, shard), rows in groups.items():
        try:
            _write_part(batch, rows, lot, shard, setup)
        except Exception as exc:
            log.exception("could not store a part of shard %s/%s (%d rows)", lot, shard, len(rows))
            written[rows], errors[rows] = False, one_line(exc)
    receipts = {c: batch[c] for c in ("lot_id", "shard", "image_id", "status", "cell_ref")}
    return to_table({**receipts, "written": written, "error": errors}, RECEIPTS)


def _write_part(batch: dict[str, np.ndarray], rows: list[int], lot: str, shard: str, setup: WriterSetup) -> None:
    part = part_name([str(batch["image_id"][i]) for i in rows])
    table = pa.Table.from_pylist([_record(batch, i, setup) for i in rows], schema=PART)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=_rows_per_group(table))
    storage.write_bytes(OutLayout(setup.out).part_file(lot, shard, part), sink.getvalue(), setup.storage_options)


def _rows_per_group(table: pa.Table) -> int:
    """Row groups of about PART_GROUP_BYTES of masks, so the finaliser streams a part without holding it all."""
    sizes = pc.multiply(table.column("mask_height"), table.column("mask_width"))
    largest = pc.max(sizes).as_py() or 1
    return max(1, min(table.num_rows, PART_GROUP_BYTES // largest))


def _record(batch: dict[str, np.ndarray], i: int, setup: WriterSetup) -> dict[str, Any]:
    row: dict[str, Any] = {
        "image_id": str(batch["image_id"][i]), "uri": str(batch["uri"][i]), "wafer_id": str(batch["wafer_id"][i]),
        "die_x": _opt_int(batch["die_x"][i]), "die_y": _opt_int(batch["die_y"][i]),
        "status": str(batch["status"][i]), "model_id": setup.model_id, "run_id": setup.run_id,
    }
    h, w = int(batch["height"][i]), int(batch["width"][i])
    data = batch["mask"][i] if row["status"] == OK else None
    if not isinstance(data, bytes) or len(data) != h * w or h * w == 0:
        row["error"] = "no mask was produced" if missing(batch["error"][i]) else str(batch["error"][i])
        if row["status"] == OK:
            row["status"] = WRITE_ERROR
        return row
    mask = np.frombuffer(data, dtype=np.uint8).reshape(h, w)
    scores = np.asarray(batch["class_scores"][i], dtype=np.float32)
    score = float(batch["anomaly_score"][i])
    regions = defect_regions(mask, setup.thresholds.pixel, setup.thresholds.min_region_px)
    is_defect, defect_class = decide(score, scores, setup.classes, setup.thresholds)
    if weighs_class_scores(setup.thresholds):
        scores = weighed_class_scores(scores, score, setup.thresholds.image)
    row.update(error=None, anomaly_score=score, is_defect=is_defect, defect_class=defect_class,
               class_scores=scores.tolist(), defect_area_px=regions.area_px, defect_area_frac=regions.area_frac,
               n_regions=regions.n_regions, mask=data, mask_height=h, mask_width=w)
    return row


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else int(f)
