"""The CPU stages: read the stored plan; read each image's bytes through fsspec, decode, preprocess.

Every input row leaves as exactly one output row: ``status`` ``ok`` with the model views in ``pixels``
(uint16 bytes of ``(n_views, S, S)``: one grey channel, expanded and normalised in the model actor), or an error
kind with a one-line ``error``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from semclip_batch.config import PreprocessConfig
from semclip_batch.errors import DECODE_ERROR, OK, ImageError, one_line
from semclip_batch.io import storage
from semclip_batch.io.cell_reference import cell_reference
from semclip_batch.io.frames import load_frame, load_reference
from semclip_batch.io.schema import DECODED, INPUT, missing, to_table

log = logging.getLogger(__name__)
SHARD_KEY_SEP = "\x00"  # lot ids hold no control characters, so lot + SEP + shard names one shard


def read_plan(batch: pa.Table, *, storage_options: Mapping[str, Any] | None) -> pa.Table:
    """Ray Data map function: the :data:`~semclip_batch.io.schema.INPUT` rows of the plan files named in
    ``batch["plan_file"]``; where ``batch["keep"]`` lists shards (``lot_id + SHARD_KEY_SEP + shard``), only
    their rows."""
    tables = []
    for url, keep in zip(batch.column("plan_file").to_pylist(), batch.column("keep").to_pylist(), strict=True):
        table = _as_input(pq.read_table(io.BytesIO(storage.read_bytes(str(url), storage_options))))
        if keep is not None:
            keys = pc.binary_join_element_wise(table.column("lot_id"), table.column("shard"), SHARD_KEY_SEP)
            table = table.filter(pc.is_in(keys, value_set=pa.array(keep, pa.string())))
        tables.append(table)
    return pa.concat_tables(tables) if tables else INPUT.empty_table()


def _as_input(plan: pa.Table) -> pa.Table:
    """A plan file's rows as :data:`~semclip_batch.io.schema.INPUT`; plans written before the plan kept
    ``page`` and ``defect_id`` read with them null (the first page; no defect id)."""
    for name in ("page", "defect_id"):
        if name not in plan.column_names:
            plan = plan.append_column(name, pa.nulls(plan.num_rows, INPUT.field(name).type))
    return plan.select(INPUT.names).cast(INPUT)


def _decoded_views(gray: np.ndarray, prep: PreprocessConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`semclip_batch.io.preprocess.decoded_views`, imported on the first frame that was read: preprocessing
    needs torch (seconds and ~600 MB per worker to import), and a task whose rows all fail to read (missing
    files, a dead bucket) then never pays for it."""
    from semclip_batch.io.preprocess import decoded_views

    return decoded_views(gray, prep)


def _shipped_levels(gray: np.ndarray, prep: PreprocessConfig) -> np.ndarray:
    """:func:`semclip_batch.io.preprocess.shipped_levels` at ``prep``'s percentiles, imported as late as
    :func:`_decoded_views`."""
    from semclip_batch.io.preprocess import shipped_levels

    return shipped_levels(gray, (prep.percentile_low, prep.percentile_high))


def _page(value: Any) -> int | None:
    return None if missing(value) else int(value)


def decode_batch(batch: dict[str, np.ndarray], *, prep: PreprocessConfig,
                 storage_options: Mapping[str, Any] | None = None, references: bool = False,
                 register: bool = True, self_reference: bool = False, reference_levels: bool = False) -> pa.Table:
    """Ray Data map function: the input columns plus ``status, error, height, width, n_views, pixels,
    ref_pixels, has_ref, cell_ref, frame_pixels, ref_frame_pixels`` (references read from each row's
    ``reference_url`` when ``references``, registered onto the frame when ``register``; with ``self_reference``, a
    row without one takes its frame's cell reference where the pattern repeats, flagged in ``cell_ref``:
    :mod:`semclip_batch.io.cell_reference`; with ``reference_levels``, a row with a ``reference_url`` whose frame's
    levels are shipped also ships its registered reference's, for a grey-level memory's die-to-die residual), as a
    table of :data:`~semclip_batch.io.schema.DECODED` whatever failed."""
    n = len(batch["image_id"])
    status, error = np.full(n, OK, dtype=object), np.full(n, None, dtype=object)
    height, width, views = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    pixels, ref_pixels, frames, ref_frames = (np.full(n, b"", dtype=object) for _ in range(4))
    has_ref, cell_ref = np.zeros(n, bool), np.zeros(n, bool)
    ref_prep = replace(prep, defect_view=False, frame_levels=False)  # a reference ships its views only
    for i, url in enumerate(batch["url"]):
        listed = batch["reference_url"][i]
        listed = None if missing(listed) or not str(listed) else str(listed)
        try:
            gray = load_frame(str(url), storage_options, _page(batch["page"][i]))
            x, frame = _decoded_views(gray, prep)
            ref, cell, registered = None, False, None
            if listed is not None and reference_levels and frame is not None:  # levels shipped: the memory fuses it
                registered = load_reference(listed, gray, storage_options)
                ref_frames[i] = _shipped_levels(registered, prep).tobytes()
            if listed is not None and references:
                ref = registered if register and registered is not None else load_reference(listed, gray,
                                                                                            storage_options, register)
            elif self_reference:
                ref = cell_reference(gray)
                cell = ref is not None
            if ref is not None:
                ref_pixels[i], has_ref[i], cell_ref[i] = _decoded_views(ref, ref_prep)[0].tobytes(), True, cell
        except ImageError as exc:
            status[i], error[i] = exc.kind, one_line(exc)
            continue
        except Exception as exc:
            log.exception("unexpected failure preparing %s", storage.redact(str(url)))
            status[i], error[i] = DECODE_ERROR, one_line(exc)
            continue
        height[i], width[i] = gray.shape
        views[i], pixels[i] = x.shape[0], x.tobytes()
        if frame is not None:
            frames[i] = frame.tobytes()
    out = dict(batch)
    out.update(status=status, error=error, height=height, width=width, n_views=views, pixels=pixels,
               ref_pixels=ref_pixels, has_ref=has_ref, cell_ref=cell_ref, frame_pixels=frames,
               ref_frame_pixels=ref_frames)
    return to_table(out, DECODED)
