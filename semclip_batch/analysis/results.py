"""Reading what a run wrote: the predictions dataset (hive by lot_id) and a per-lot summary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from semclip_batch.errors import OutputError
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout


def read_predictions(out: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """All prediction rows of OUT with ``lot_id`` (string) from the partition folders."""
    layout = OutLayout(storage.normalize_root(out))
    fs, path = storage.filesystem(layout.predictions, storage_options)
    if not fs.exists(path):
        raise OutputError(f"{layout.root} has no predictions/ yet (run `semclip-batch run ... --out {out}` first)")
    part = pads.partitioning(pa.schema([("lot_id", pa.string())]), flavor="hive")
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning=part).to_table()


def lot_summary(out: str, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Per lot: images, ok, errors, defective, and the defect classes found (count per class)."""
    df = read_predictions(out, storage_options).to_pandas()
    rows = []
    for lot, g in df.groupby("lot_id", sort=True):
        ok = g[g["status"] == "ok"]
        defects = ok[ok["is_defect"].fillna(False).astype(bool)]
        classes = defects["defect_class"].value_counts().sort_index()
        rows.append({"lot_id": lot, "images": len(g), "ok": len(ok), "errors": len(g) - len(ok),
                     "defective": len(defects),
                     "classes": ", ".join(f"{c}={n}" for c, n in classes.items()) or "-"})
    return pd.DataFrame(rows)
