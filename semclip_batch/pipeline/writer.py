"""The write stage: each call owns the objects it writes (README "Architecture": ownership).

Rows of one batch are grouped by work shard; each group is a *part* named by a hash of its image_ids. A part
writes one Parquet file ``predictions/lot_id=<lot>/<shard>-<part>.parquet`` and, for its ok rows, one Zarr
group ``masks.zarr/<lot>/<shard>/<part>`` holding one array per frame size ``<H>x<W>``. The driver made the
root, lot and shard groups beforehand, so no two writers ever write the same object. The stage returns one
receipt row per image; the driver writes a shard's done marker once all its rows have receipts.
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
import pyarrow.parquet as pq
import zarr

from semclip_batch.config import Thresholds
from semclip_batch.errors import OK, WRITE_ERROR, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.masks import open_masks
from semclip_batch.io.schema import PREDICTIONS, RECEIPTS, missing, to_table
from semclip_batch.methods.decisions import decide, defect_regions

CHUNK_SIDE = 1024
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
    root = None
    for (lot, shard), rows in groups.items():
        try:
            if any(batch["status"][i] == OK for i in rows) and root is None:
                root = open_masks(OutLayout(setup.out).masks, setup.storage_options)
            _write_part(batch, rows, lot, shard, setup, root)
        except Exception as exc:
            log.exception("could not store a part of shard %s/%s (%d rows)", lot, shard, len(rows))
            written[rows], errors[rows] = False, one_line(exc)
    receipts = {c: batch[c] for c in ("lot_id", "shard", "image_id", "status")}
    return to_table({**receipts, "written": written, "error": errors}, RECEIPTS)


def _write_part(batch: dict[str, np.ndarray], rows: list[int], lot: str, shard: str, setup: WriterSetup,
                root: zarr.Group | None) -> None:
    part = part_name([str(batch["image_id"][i]) for i in rows])
    mask_refs = _write_masks(batch, rows, f"{lot}/{shard}/{part}", root) if root is not None else {}
    records = [_record(batch, i, mask_refs.get(i), setup) for i in rows]
    table = pa.Table.from_pylist(records, schema=PREDICTIONS)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(OutLayout(setup.out).prediction_part(lot, shard, part), sink.getvalue(),
                        setup.storage_options)


def _write_masks(batch: dict[str, np.ndarray], rows: list[int], group_path: str,
                 root: zarr.Group) -> dict[int, tuple[str, int]]:
    """One array per frame size under this part's own group. Returns row -> (mask_path, mask_index)."""
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in rows:
        if batch["status"][i] == OK:
            by_size[(int(batch["height"][i]), int(batch["width"][i]))].append(i)
    if not by_size:
        return {}
    group = root.create_group(group_path, overwrite=True)
    refs: dict[int, tuple[str, int]] = {}
    for (h, w), members in sorted(by_size.items()):
        name = f"{h}x{w}"
        arr = group.create_array(name=name, shape=(len(members), h, w), dtype="uint8",
                                 chunks=(1, min(h, CHUNK_SIDE), min(w, CHUNK_SIDE)), fill_value=0)
        arr[:] = np.stack([np.frombuffer(batch["mask"][i], dtype=np.uint8).reshape(h, w) for i in members])
        refs.update({i: (f"{group_path}/{name}", k) for k, i in enumerate(members)})
    return refs


def _record(batch: dict[str, np.ndarray], i: int, ref: tuple[str, int] | None, setup: WriterSetup) -> dict[str, Any]:
    row: dict[str, Any] = {
        "image_id": str(batch["image_id"][i]), "uri": str(batch["uri"][i]), "wafer_id": str(batch["wafer_id"][i]),
        "die_x": _opt_int(batch["die_x"][i]), "die_y": _opt_int(batch["die_y"][i]),
        "status": str(batch["status"][i]), "model_id": setup.model_id, "run_id": setup.run_id,
    }
    if row["status"] != OK or ref is None:
        row["error"] = "no mask was produced" if missing(batch["error"][i]) else str(batch["error"][i])
        if row["status"] == OK:
            row["status"] = WRITE_ERROR
        return row
    h, w = int(batch["height"][i]), int(batch["width"][i])
    mask = np.frombuffer(batch["mask"][i], dtype=np.uint8).reshape(h, w)
    scores = np.asarray(batch["class_scores"][i], dtype=np.float32)
    score = float(batch["anomaly_score"][i])
    regions = defect_regions(mask, setup.thresholds.pixel, setup.thresholds.min_region_px)
    is_defect, defect_class = decide(score, scores, setup.classes, setup.thresholds)
    row.update(error=None, anomaly_score=score, is_defect=is_defect, defect_class=defect_class,
               class_scores=scores.tolist(), defect_area_px=regions.area_px, defect_area_frac=regions.area_frac,
               n_regions=regions.n_regions, mask_path=ref[0], mask_index=ref[1])
    return row


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if np.isnan(f) else int(f)
