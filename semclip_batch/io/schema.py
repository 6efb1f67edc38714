"""Column names and Arrow types between stages, and the Parquet schema of ``OUT/predictions``.

Every stage returns a table of its fixed schema, for ok and error rows alike: nullable columns are typed
here, never inferred from a batch (an all-ok batch's ``error`` column would otherwise be Arrow's null type,
and two batches of one task could not be combined).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

# What the driver sends into the pipeline: one row per manifest row still to do.
INPUT = pa.schema([
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("url", pa.string()),
    ("reference_url", pa.string()),
    ("page", pa.int64()),  # 0-based TIFF page; null = the first
    ("defect_id", pa.string()),  # kept in the plan for `export klarf` (predictions do not carry it)
    ("lot_id", pa.string()),
    ("wafer_id", pa.string()),
    ("die_x", pa.int64()),
    ("die_y", pa.int64()),
    ("shard", pa.string()),
])
INPUT_COLUMNS = tuple(INPUT.names)

_FRAME = [("status", pa.string()), ("error", pa.string()), ("height", pa.int64()), ("width", pa.int64()),
          ("n_views", pa.int64())]

# Decode stage out: the model views as uint16 grey levels, bytes of (n_views, S, S) (io/preprocess.pack_views);
# the reference views alike; for a frame that gets a defect view or whose model fuses a grey-level memory, the
# stretched frame as uint8 bytes of (H, W) (io/preprocess.pack_frame), else empty; for such a frame, where its model's
# memory keeps the die-to-die residual (rule 27), its registered reference_uri frame alike, else empty.
# ``cell_ref``: the reference views are the frame's cell reference.
DECODED = pa.schema([*INPUT, *_FRAME, ("pixels", pa.large_binary()), ("ref_pixels", pa.large_binary()),
                     ("has_ref", pa.bool_()), ("cell_ref", pa.bool_()), ("frame_pixels", pa.large_binary()),
                     ("ref_frame_pixels", pa.large_binary())])
SHIPPED_PIXELS = ("pixels", "ref_pixels", "frame_pixels", "ref_frame_pixels")  # DECODED's bytes the model stage reads

# Model stage out: the uint8 mask at H x W as bytes, the image score and the class probabilities (and
# ``cell_ref`` passed on, for the run record's count).
SCORED = pa.schema([*INPUT, *_FRAME, ("mask", pa.large_binary()), ("anomaly_score", pa.float64()),
                    ("class_scores", pa.list_(pa.float32())), ("cell_ref", pa.bool_())])

# Write stage out: one receipt per row; ``written`` is False (and ``error`` says why) when the row's part could
# not be stored; ``cell_ref``: the row was scored against its cell reference.
RECEIPTS = pa.schema([("lot_id", pa.string()), ("shard", pa.string()), ("image_id", pa.string()),
                      ("status", pa.string()), ("written", pa.bool_()), ("error", pa.string()),
                      ("cell_ref", pa.bool_())])

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

# A writer's part of a shard (``_state/parts/``): the prediction rows, each ok row with its uint8 mask; the
# shard's finaliser moves the masks into Zarr and fills ``mask_path`` / ``mask_index``.
PART = pa.schema([*PREDICTIONS, ("mask", pa.large_binary()), ("mask_height", pa.int64()),
                  ("mask_width", pa.int64())])

# The columns that are null on every non-ok row.
RESULT_COLUMNS = ("anomaly_score", "is_defect", "defect_class", "class_scores", "defect_area_px",
                  "defect_area_frac", "n_regions", "mask_path", "mask_index")


def missing(value: Any) -> bool:
    """None, or a float NaN (what a null can become on its way through numpy)."""
    return value is None or (isinstance(value, float) and value != value)


def _column(values: Any, dtype: pa.DataType) -> pa.Array:
    if pa.types.is_list(dtype):
        items = [None if v is None or (np.ndim(v) == 0 and missing(v)) else np.asarray(v, dtype=np.float32)
                 for v in values]
        return pa.array([None if v is None or np.isnan(v).all() else v.tolist() for v in items], type=dtype)
    cleaned = [None if missing(v) else v for v in (values.tolist() if isinstance(values, np.ndarray) else values)]
    if pa.types.is_string(dtype):
        cleaned = [None if v is None else str(v) for v in cleaned]
    return pa.array(cleaned, type=dtype)


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A table as the numpy batch Ray Data hands a ``batch_format="numpy"`` stage (benchmarks call the stages'
    functions without Ray through it; :func:`to_table` is the way back)."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def to_table(columns: Mapping[str, Any], schema: pa.Schema) -> pa.Table:
    """A table of exactly ``schema`` from column values (numpy arrays or sequences; NaN in a non-float column
    and None become null). Extra columns are dropped; a missing one is a bug and raises KeyError."""
    arrays = []
    for field in schema:
        values = columns[field.name]
        if pa.types.is_floating(field.type):
            arrays.append(pa.array(np.asarray(values, dtype=np.float64), type=field.type, from_pandas=True))
        else:
            arrays.append(_column(values, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)

