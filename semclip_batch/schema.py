"""Column names between stages and the Parquet schema of ``OUT/predictions`` (DESIGN.md output contract)."""

from __future__ import annotations

import pyarrow as pa

# Columns the driver sends into the pipeline (one row per manifest row still to do).
INPUT_COLUMNS = ("image_id", "uri", "url", "reference_url", "lot_id", "wafer_id", "die_x", "die_y", "shard")

PREDICTIONS = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("wafer_id", pa.string()),
    ("die_x", pa.int64()),
    ("die_y", pa.int64()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("anomaly_score", pa.float64()),
    ("is_defect", pa.bool_()),
    ("defect_class", pa.string()),
    ("class_scores", pa.list_(pa.float32())),
    ("defect_area_px", pa.int64()),
    ("defect_area_frac", pa.float64()),
    ("n_regions", pa.int64()),
    ("mask_path", pa.string()),
    ("mask_index", pa.int64()),
    ("model_id", pa.string()),
    ("run_id", pa.string()),
])

# The columns that are null on every non-ok row.
RESULT_COLUMNS = ("anomaly_score", "is_defect", "defect_class", "class_scores", "defect_area_px",
                  "defect_area_frac", "n_regions", "mask_path", "mask_index")

RECEIPT_COLUMNS = ("lot_id", "shard", "image_id", "status")
