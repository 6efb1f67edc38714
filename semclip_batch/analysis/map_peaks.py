"""What a finished run's record and stored masks say of each frame beyond its prediction row, for ``suggest``:
the preprocessing the run used (:func:`preprocess_of`) and each frame's map peak ``max A`` (:func:`map_peaks`).

The peak follows exactly from ``anomaly_score`` and the class scores' normal entry where that is the whole view's
p(normal); a frame that took a defect view holds the mean of two views' p(normal) there, and a run whose class
scores weigh the image decision (rule 29) no p(normal) at all, so there the peak is read from the stored mask in
``masks.zarr`` (:func:`mask_peaks`; 32 MB of masks a read, to 1/255).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from semclip_batch.analysis.suggest_rule import map_peak
from semclip_batch.config import PreprocessConfig
from semclip_batch.errors import ConfigError, SemclipError, one_line
from semclip_batch.io import storage
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.masks import mask_array, open_masks
from semclip_batch.io.preprocess import needs_defect_view
from semclip_batch.methods.decisions import CLASS_SCORES_WEIGHED

log = logging.getLogger(__name__)
MASK_BLOCK_BYTES = 32 << 20  # stored masks read at a time: 32 of 1024 x 1024, 2 of 4096 x 4096
_SIZE = re.compile(r"(\d+)x(\d+)$")  # a mask array's name: <H>x<W>


def preprocess_of(record: Mapping[str, Any], backbone: str) -> PreprocessConfig:
    """The preprocessing a run record names (its defect view left off), else ``backbone``'s default."""
    from semclip_batch.methods.weights import preprocess_config

    rec = dict(record.get("preprocessing") or {})
    try:
        return PreprocessConfig(image_size=int(rec["image_size"]), mean=tuple(rec["mean"]), std=tuple(rec["std"]),
                                percentile_low=float(rec.get("percentile_low", 0.5)),
                                percentile_high=float(rec.get("percentile_high", 99.5)))
    except (KeyError, TypeError, ValueError, ConfigError):
        return preprocess_config(backbone, tile_above=10**9)


def map_peaks(layout: OutLayout, rows: pd.DataFrame, score: np.ndarray, p_normal: np.ndarray,
              record: Mapping[str, Any], so: Mapping[str, Any]) -> np.ndarray:
    """Each candidate's map peak ``max A``. With the image score ``max`` it is ``anomaly_score`` itself. With
    ``mean``, ``anomaly_score`` reads the whole view's p(normal): a frame without a defect view has that as its
    class scores' normal entry, and its peak follows exactly from the two (:func:`map_peak`); a frame that took a
    defect view has the mean of two views' there instead, and its peak is read from its stored mask
    (:func:`mask_peaks`), as is every frame of a run whose class scores weigh in the image decision (rule 29).
    ``score`` and ``p_normal``: the rows' ``anomaly_score`` and class scores' normal entry."""
    mode = str(((record.get("config") or {}).get("model") or {}).get("score_mode") or "mean")
    peaks = map_peak(score, p_normal, mode)
    if mode != "max":
        weighed = record.get("class_scores") == CLASS_SCORES_WEIGHED  # normal's entry is no longer p(normal)
        read = np.ones(len(rows), dtype=bool) if weighed else took_defect_view(rows["mask_path"], record)
        if read.any():
            peaks[read] = mask_peaks(layout, rows[read], so)
    return peaks


def took_defect_view(mask_paths: pd.Series, record: Mapping[str, Any]) -> np.ndarray:
    """Whether each row's frame took a defect view, from the run record's preprocessing and the frame size in its
    mask array's name (``<H>x<W>``). Where the record cannot say (no preprocessing recorded) or the name has no
    size, it counts as taken, so the mask is read."""
    preprocessing = record.get("preprocessing")
    if not preprocessing:
        return np.ones(len(mask_paths), dtype=bool)
    if not preprocessing.get("defect_view"):  # recorded only when on
        return np.zeros(len(mask_paths), dtype=bool)
    backbone = str(((record.get("config") or {}).get("model") or {}).get("backbone") or "")
    try:
        prep = replace(preprocess_of(record, backbone), defect_view=True)
    except SemclipError:  # neither the record's preprocessing nor the backbone's: read every mask
        return np.ones(len(mask_paths), dtype=bool)

    def took(path: str) -> bool:
        size = _SIZE.search(str(path))
        return size is None or needs_defect_view(int(size[1]), int(size[2]), prep)

    return np.array([took(path) for path in mask_paths], dtype=bool)


def mask_peaks(layout: OutLayout, rows: pd.DataFrame, so: Mapping[str, Any]) -> np.ndarray:
    """Each row's map peak ``max A`` read from its stored mask (``mask_path``, ``mask_index``): its largest level
    over 255, so to 1/255. NaN where the store, the array or the mask cannot be read, or the index is past the
    array (logged; the pixel term ranks such a frame last). A stored shard object that is gone is no error: Zarr
    fills a missing chunk with zeros, so its masks give peak 0."""
    peaks = np.full(len(rows), np.nan)
    try:
        root = open_masks(layout.masks, so, mode="r")
    except Exception as exc:  # noqa: BLE001 - any store or format failure: the term goes without peaks, not suggest
        log.warning("cannot open %s; no map peak is read: %s", storage.redact(layout.masks), one_line(exc))
        return peaks
    index = rows["mask_index"].to_numpy(dtype=np.int64)
    for path, members in rows.groupby("mask_path", sort=True).indices.items():
        try:
            masks = mask_array(root, str(path))
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("cannot open masks.zarr/%s; %d frames get no map peak: %s", path, len(members), one_line(exc))
            continue
        inside = members[(index[members] >= 0) & (index[members] < masks.shape[0])]
        if len(inside) < len(members):
            log.warning("masks.zarr/%s holds %d masks; %d rows index past it", path, masks.shape[0],
                        len(members) - len(inside))
        order = inside[np.argsort(index[inside], kind="stable")]  # sorted: neighbouring masks share stored shards
        step = max(1, MASK_BLOCK_BYTES // max(1, int(np.prod(masks.shape[1:]))))
        for start in range(0, len(order), step):
            _read_peaks(masks, order[start:start + step], index, peaks, str(path))
    return peaks


def _read_peaks(masks: Any, part: np.ndarray, index: np.ndarray, peaks: np.ndarray, path: str) -> None:
    """Write ``peaks[part]`` from one read of their masks; where that read fails, read them again one mask at a time,
    so one bad stored shard costs only its own masks (each failure logged)."""
    try:
        block = np.asarray(masks.oindex[index[part]], dtype=np.uint8)
        peaks[part] = block.reshape(len(part), -1).max(axis=1) / 255.0
        return
    except Exception:  # noqa: BLE001 - one bad stored shard: the others in the block are still read below
        pass
    for row in part:
        try:
            peaks[row] = float(np.asarray(masks[int(index[row])], dtype=np.uint8).max()) / 255.0
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("cannot read mask %d of masks.zarr/%s: %s", int(index[row]), path, one_line(exc))
