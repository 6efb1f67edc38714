"""``aggregate``: per (lot, wafer, class) defect statistics -> ``OUT/lot_stats/`` (hive by lot_id).

One row per (lot_id, wafer_id, class) for every class of the run. A defect class counts ok rows flagged
``is_defect`` with that ``defect_class``; ``normal`` counts ok rows not flagged. ``rate = count / n_ok``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from semclip_batch.analysis.results import read_predictions
from semclip_batch.errors import OutputError
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.runrecord import read_latest
from semclip_batch.methods.prompts import NORMAL

LOT_STATS = pa.schema([
    ("wafer_id", pa.string()),
    ("class", pa.string()),
    ("n_images", pa.int64()),
    ("n_ok", pa.int64()),
    ("n_error", pa.int64()),
    ("n_defect", pa.int64()),
    ("count", pa.int64()),
    ("rate", pa.float64()),
    ("area_px_mean", pa.float64()),
    ("area_px_p50", pa.float64()),
    ("area_px_p95", pa.float64()),
    ("area_px_max", pa.int64()),
    ("defect_dies", pa.list_(pa.struct([("die_x", pa.int64()), ("die_y", pa.int64())]))),
])


def run_classes(out: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    record = read_latest(OutLayout(storage.normalize_root(out)), storage_options or {})
    if record is None:
        raise OutputError(f"{out} has no run record (runs/*/attempt-*.json); run `semclip-batch run` first")
    return list(record["classes"])


def class_stats(group: pd.DataFrame, cls: str) -> dict[str, Any]:
    """The statistics of one class within one (lot, wafer) group of prediction rows."""
    ok = group[group["status"] == "ok"]
    flagged = ok["is_defect"].fillna(False).astype(bool)
    hits = ok[~flagged] if cls == NORMAL else ok[flagged & (ok["defect_class"] == cls)]
    areas = hits["defect_area_px"].to_numpy(dtype=np.float64)
    dies = [] if cls == NORMAL else sorted(
        {(int(x), int(y)) for x, y in zip(hits["die_x"], hits["die_y"], strict=True) if pd.notna(x) and pd.notna(y)}
    )
    return {
        "class": cls, "n_images": len(group), "n_ok": len(ok), "n_error": len(group) - len(ok),
        "n_defect": int(flagged.sum()), "count": len(hits), "rate": len(hits) / len(ok) if len(ok) else None,
        "area_px_mean": float(areas.mean()) if areas.size else None,
        "area_px_p50": float(np.percentile(areas, 50)) if areas.size else None,
        "area_px_p95": float(np.percentile(areas, 95)) if areas.size else None,
        "area_px_max": int(areas.max()) if areas.size else None,
        "defect_dies": [{"die_x": x, "die_y": y} for x, y in dies],
    }


def aggregate(out: str, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Write ``OUT/lot_stats/lot_id=<lot>/stats.parquet`` and return all rows (with lot_id)."""
    so = dict(storage_options or {})
    layout = OutLayout(storage.normalize_root(out))
    classes = run_classes(out, so)
    preds = read_predictions(out, so).to_pandas()
    storage.remove(layout.lot_stats, so)
    frames = []
    for lot, lot_rows in preds.groupby("lot_id", sort=True):
        rows = [{"wafer_id": wafer, **class_stats(g, cls)}
                for wafer, g in lot_rows.groupby("wafer_id", sort=True) for cls in classes]
        table = pa.Table.from_pylist(rows, schema=LOT_STATS)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        storage.write_bytes(storage.join(layout.lot_stats, f"lot_id={lot}", "stats.parquet"), sink.getvalue(), so)
        frames.append(pd.DataFrame(rows).assign(lot_id=lot))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["lot_id", *LOT_STATS.names])
