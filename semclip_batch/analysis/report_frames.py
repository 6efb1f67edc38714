"""The frames and masks behind a lot report's overlays: each top-N row's frame found as the run found it (a
relative ``uri`` against the run's input folder, a TIFF page from the stored shard plan), its mask from
``masks.zarr``, drawn together by :func:`overlay`, which never raises: a row it cannot show gets notes instead."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr

from semclip_batch.analysis.charts import overlay_png
from semclip_batch.config import DEFAULT_PIXEL_THRESHOLD
from semclip_batch.errors import ConfigError, ImageError, one_line
from semclip_batch.io import storage
from semclip_batch.io.frames import load_frame
from semclip_batch.io.layout import OutLayout
from semclip_batch.io.masks import mask_array, open_masks
from semclip_batch.io.plan import read_plan_columns

if TYPE_CHECKING:
    from semclip_batch.analysis.report import TopFrame

log = logging.getLogger(__name__)


def defect_level(record: Mapping[str, Any] | None) -> int:
    """The stored-mask grey level from which a pixel is a defect pixel (ceil(255 * pixel threshold))."""
    pixel = ((record or {}).get("thresholds") or {}).get("pixel", DEFAULT_PIXEL_THRESHOLD)
    return int(np.ceil(255 * float(pixel)))


def frame_base(record: Mapping[str, Any] | None, so: Mapping[str, Any]) -> str | None:
    """The folder relative ``uri`` cells were resolved against by the run (its input, or the manifest's folder),
    from the run record; a relative input is taken from the current directory, as ``run`` took it."""
    config = (record or {}).get("config") or {}
    source = config.get("input")
    if not isinstance(source, str) or not source:
        return None
    source = source if storage.is_absolute(source) else posixpath.abspath(source)
    if config.get("pattern"):
        return source
    try:
        fs, path = storage.filesystem(source, so)
        return source if fs.isdir(path) else storage.parent(source)
    except (OSError, ValueError, ConfigError):
        return storage.parent(source)


@dataclass
class FrameSource:
    """Where overlays come from: frames by their resolved ``uri``, masks from ``masks.zarr`` (opened once)."""

    layout: OutLayout
    so: Mapping[str, Any]
    base: str | None
    level: int
    _root: zarr.Group | None = None
    _pages: dict[str, int] | None = None

    def url(self, uri: str) -> str | None:
        if storage.is_absolute(uri):
            return uri
        return storage.resolve(uri, self.base) if self.base else None

    def mask(self, row: TopFrame) -> np.ndarray:
        if self._root is None:
            self._root = open_masks(self.layout.masks, self.so, mode="r")
        return np.asarray(mask_array(self._root, row.mask_path)[row.mask_index], dtype=np.uint8)

    def frame(self, row: TopFrame) -> np.ndarray:
        url = self.url(row.uri)
        if url is None:
            raise ImageError("read_error", "relative uri, and the run record names no input folder to resolve it")
        if self._pages is None:
            self._pages = plan_pages(self.layout, self.so)
        return load_frame(url, self.so, self._pages.get(row.image_id))


def plan_pages(layout: OutLayout, so: Mapping[str, Any]) -> dict[str, int]:
    """image_id -> TIFF page of the rows whose manifest set a ``page``, from the stored shard plan (predictions
    do not carry it); empty when the plan holds none or is gone."""
    try:
        table = read_plan_columns(layout, ["page"], so)
    except (OSError, ValueError, pa.ArrowException) as exc:  # the overlay then shows the first page
        log.warning("cannot read TIFF pages from the shard plan: %s", exc)
        return {}
    table = table.filter(pc.is_valid(table.column("page")))
    return dict(zip(table.column("image_id").to_pylist(), table.column("page").to_pylist(), strict=True))


def overlay(row: TopFrame, source: FrameSource) -> tuple[bytes | None, list[str]]:
    """A thumbnail of one top-N row and notes on what could not be shown; never raises."""
    notes = []
    mask = frame = None
    try:
        mask = source.mask(row)
    except Exception as exc:  # one thumbnail, never the report (its traceback at -vv)
        log.warning("mask of %s unreadable: %s", row.image_id, one_line(exc))
        log.debug("mask of %s unreadable", row.image_id, exc_info=True)
        notes.append(f"mask not readable: {one_line(exc)}")
    try:
        frame = source.frame(row)
    except Exception as exc:  # noqa: BLE001 - one thumbnail, never the report
        log.info("frame of %s unreadable: %s", row.image_id, exc)
        notes.append(f"frame not readable ({one_line(exc)}); showing the mask alone" if mask is not None
                     else f"frame not readable ({one_line(exc)})")
    if mask is not None:
        return overlay_png(frame, mask, source.level), notes
    if frame is not None:  # the frame alone: an empty mask, no level reached
        return overlay_png(frame, np.zeros(frame.shape, np.uint8), 256), notes
    return None, notes
