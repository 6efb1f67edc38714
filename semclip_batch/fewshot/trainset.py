"""Labelled images in memory for ``pretrain`` and ``train``, through the same decoding and preprocessing as
``run`` (whole-frame view at model input size, and the tiles ``run`` scores the frame with; masks as per-pixel
defect fractions at the same size)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from semclip_batch.config import NORMAL, PreprocessConfig
from semclip_batch.errors import DECODE_ERROR, ConfigError, ImageError
from semclip_batch.fewshot.decoded import DecodedRows, active_rows
from semclip_batch.io.cell_reference import cell_reference
from semclip_batch.io.frames import load_frame, load_reference
from semclip_batch.io.preprocess import frame_tiles, grey_views, mask_view, resize, stretch
from semclip_batch.io.schema import missing

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class TrainSet:
    """``views``: ``(N, S, S)`` float16 grey in [0, 1]; ``masks``: ``(N, S, S)`` float16 defect fractions;
    ``labels``: ``(N,)`` class index; ``has_mask``: ``(N,)`` bool; ``captions``: per row, or "";
    ``refs`` / ``has_ref``: reference-frame views ``(N, S, S)`` and which rows have one (when asked for);
    ``frame``: ``(N,)`` the manifest row each view comes from (crops share their frame's), when recorded."""

    views: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    has_mask: torch.Tensor
    captions: list[str]
    classes: tuple[str, ...]
    skipped: int
    refs: torch.Tensor | None = None
    has_ref: torch.Tensor | None = None
    frame: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def first_views(self) -> torch.Tensor:
        """``(N,)`` bool: each frame's whole view (its tiles and crops follow it; every row without ``frame``)."""
        first = torch.ones(len(self), dtype=torch.bool)
        if self.frame is not None:
            first[1:] = self.frame[1:] != self.frame[:-1]
        return first

    def absent_classes(self) -> list[str]:
        """The classes no frame of the set stands for (by its whole view's label; ``normal`` also by a clean tile of
        a defect frame, which trains it as a normal frame does)."""
        present = set(self.labels[self.first_views()].tolist()) | ({0} if bool((self.labels == 0).any()) else set())
        return [name for k, name in enumerate(self.classes) if k not in present]


class Loaded(NamedTuple):
    """One view of a manifest row: the model-input view, its mask view (None: no mask), its reference view
    (None: none) and whether it is a tile without defect pixels (a normal view whatever the frame's label)."""

    view: np.ndarray
    mask: np.ndarray | None
    ref: np.ndarray | None
    clean: bool = False


CROP_SCALES = (1, 2)  # crop sides in model-input sizes: native resolution, then half of it


def row_frame(row: pd.Series, so: Mapping[str, Any] | None) -> np.ndarray:
    """A manifest row's frame as ``run`` decodes it (its ``page`` of a multi-page TIFF where set)."""
    return load_frame(row["url"], so, _page(row))


def row_mask(row: pd.Series, so: Mapping[str, Any] | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """A manifest row's defect mask (bool, the frame's ``shape``), or None where it names none."""
    if not row["mask_url"]:
        return None
    try:
        mask = load_frame(row["mask_url"], so) > 0
    except ImageError as exc:  # a mask too small to be a frame is still a mask: say which file failed
        raise ImageError(exc.kind, f"its mask is unusable: {exc}") from None
    if mask.shape != shape:
        raise ImageError(DECODE_ERROR, f"mask {mask.shape} does not match image {shape}")
    return mask


def _page(row: pd.Series) -> int | None:
    page = row.get("page")
    return None if missing(page) else int(page)


def row_frame_and_mask(row: pd.Series, so: Mapping[str, Any] | None,
                       rows: DecodedRows | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A manifest row's frame and mask (:func:`row_frame`, :func:`row_mask`), decoded once where ``rows`` keeps
    them (:mod:`~semclip_batch.fewshot.decoded`)."""
    def decode() -> tuple[np.ndarray, np.ndarray | None]:
        gray = row_frame(row, so)
        return gray, row_mask(row, so, gray.shape)

    return decode() if rows is None else rows.frame((row["url"], _page(row), row["mask_url"]), decode)


def row_reference(row: pd.Series, gray: np.ndarray, so: Mapping[str, Any] | None, references: bool, register: bool,
                  self_reference: bool, rows: DecodedRows | None = None) -> np.ndarray | None:
    """The reference a row is scored against: its reference file (``references``; registered onto ``gray`` unless
    ``register`` is False), else with ``self_reference`` its frame's cell reference, else None; made once where
    ``rows`` keeps it."""
    def make() -> np.ndarray | None:
        ref = _reference_file(row, gray, so, register) if references else None
        return cell_reference(gray) if ref is None and self_reference else ref

    if not (references or self_reference):
        return None
    key = (row["url"], _page(row), row["reference_url"] if references else "", register and references, self_reference)
    try:
        return make() if rows is None else rows.reference(key, make)
    except ImageError as exc:  # never kept: every load tries the file again
        log.warning("%s: trained without its reference: %s", row["uri"], exc)
        return cell_reference(gray) if self_reference else None


def _load_row(row: pd.Series, prep: PreprocessConfig, so: Mapping[str, Any] | None, references: bool,
              crops: int = 0, seed: int = 0, register: bool = True, self_reference: bool = False,
              rows: DecodedRows | None = None) -> list[Loaded]:
    """The whole frame, then its tiles under ``prep`` (as ``run`` scores it: :func:`frame_views`), then up to
    ``crops`` crops (frame, mask and reference decoded once where ``rows`` keeps them)."""
    gray, mask = row_frame_and_mask(row, so, rows)
    ref = row_reference(row, gray, so, references, register, self_reference, rows)
    views = frame_views(gray, mask, ref, prep, normal=row["label"] == NORMAL)
    if not crops:
        return views
    rng = np.random.default_rng([seed, int(row.name)])  # row.name: the row's position (index reset)
    return [*views, *crop_views(gray, mask, prep, rng, crops)]


def frame_views(gray: np.ndarray, mask: np.ndarray | None, ref: np.ndarray | None, prep: PreprocessConfig,
                normal: bool) -> list[Loaded]:
    """The whole-frame view, then the frame's tiles as ``run`` scores them under ``prep``
    (``io.preprocess.grey_views`` over ``frame_tiles``: with a scale policy, at that fraction of native
    resolution), the reference cut alike. A tile without defect pixels is a normal view; tiles of a defect frame
    without a mask are left out (nothing says which of them holds the defect)."""
    tiles = frame_tiles(gray.shape[0], gray.shape[1], prep)
    if mask is None and not normal:
        tiles = []
    views = grey_views(gray, prep, tiles).numpy()
    refs = None if ref is None else grey_views(ref, prep, tiles).numpy()
    out = [Loaded(views[0], None if mask is None else mask_view(mask, prep.image_size),
                  None if refs is None else refs[0])]
    for k, t in enumerate(tiles, start=1):
        tile_mask = None if mask is None else mask[t.y:t.y + t.height, t.x:t.x + t.width]
        out.append(Loaded(views[k], None if tile_mask is None else mask_view(tile_mask, prep.image_size),
                          None if refs is None else refs[k], clean=tile_mask is None or not tile_mask.any()))
    return out


def crop_views(gray: np.ndarray, mask: np.ndarray | None, prep: PreprocessConfig, rng: np.random.Generator,
               count: int) -> list[Loaded]:
    """Up to ``count`` square crops (sides ``CROP_SCALES`` x the model input, only where the frame is larger)
    around a defect pixel (anywhere without a defect), resized to the model input: small defects of large
    frames seen at native resolution. The stretch is the whole frame's, as ``run`` applies it."""
    h, w = gray.shape
    size = prep.image_size
    sides = [size * k for k in CROP_SCALES if size * k < min(h, w)][:count]
    if not sides:
        return []
    full = stretch(gray, prep.percentile_low, prep.percentile_high)
    points = np.argwhere(mask) if mask is not None and mask.any() else None
    out: list[Loaded] = []
    for side in sides:
        if points is not None:
            cy, cx = points[int(rng.integers(len(points)))] + rng.integers(-side // 3, side // 3 + 1, size=2)
        else:
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y = int(np.clip(cy - side // 2, 0, h - side))
        x = int(np.clip(cx - side // 2, 0, w - side))
        window = torch.from_numpy(np.ascontiguousarray(full[y:y + side, x:x + side]))[None, None]
        crop_mask = None if mask is None else mask_view(mask[y:y + side, x:x + side], size)
        out.append(Loaded(resize(window, (size, size))[0, 0].numpy(), crop_mask, None))
    return out


def _reference_file(row: pd.Series, gray: np.ndarray, so: Mapping[str, Any] | None,
                    register: bool) -> np.ndarray | None:
    """The row's reference frame (None: it names none). Raises ``ImageError`` where it is unusable."""
    return load_reference(row["reference_url"], gray, so, register) if row["reference_url"] else None


def load_trainset(df: pd.DataFrame, classes: tuple[str, ...], prep: PreprocessConfig, *,
                  storage_options: Mapping[str, Any] | None = None, need_labels: bool = True,
                  references: bool = False, threads: int = 4, crops: int = 0, seed: int = 0,
                  register: bool = True, self_reference: bool = False) -> TrainSet:
    """Decode every usable row (its whole-frame view, its tiles where ``prep`` tiles the frame (:func:`frame_views`), then
    up to ``crops`` :func:`crop_views`, each one row of the set; references registered onto their frame unless
    ``register`` is False; with ``self_reference``, rows without one take their frame's cell reference where its
    pattern repeats, as ``run`` does); unreadable rows are skipped with a warning and counted."""
    unknown = sorted(set(df["label"]) - set(classes) - {""})
    if unknown:
        raise ConfigError(f"label {unknown[0]!r} is not a class of the prompt file ({', '.join(classes)})")
    unlabelled = df["label"] == ""
    if need_labels and len(df) and unlabelled.all():
        raise ConfigError("no support row has a label: train reads each frame's class from the manifest's `label` "
                          f"column (missing or empty here; one of: {', '.join(classes)})")
    if need_labels and unlabelled.any():
        raise ConfigError(f"every support row needs a label; {df[unlabelled].iloc[0]['uri']} has none")
    df = df.reset_index(drop=True)
    kept = active_rows()  # read here: the decoding threads do not see the caller's context
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda r: _safe_load(r, prep, storage_options, references, crops, seed, register,
                                                            self_reference, kept),
                                [r for _, r in df.iterrows()]))
    keep = [i for i, r in enumerate(results) for _ in (r or [])]  # the manifest row of every view
    loaded = [view for r in results for view in (r or [])]
    if not keep:
        raise ConfigError("no usable training image (all rows failed to decode)")
    size = prep.image_size
    views = half_stack([v.view for v in loaded], size)
    masks = half_stack([v.mask for v in loaded], size)
    has_mask = torch.tensor([v.mask is not None for v in loaded], dtype=torch.bool)
    labels = torch.tensor([0 if v.clean else classes.index(df["label"].iloc[i]) if df["label"].iloc[i] else IGNORE
                           for i, v in zip(keep, loaded, strict=True)])
    normal = labels == 0
    has_mask |= normal  # a normal image without a mask file is all zeros
    captions = [str(df["caption"].iloc[i]) for i in keep]
    skipped = sum(r is None for r in results)
    data = TrainSet(views, masks, labels, has_mask, captions, classes, skipped=skipped, frame=torch.tensor(keep))
    if references or self_reference:
        refs = [v.ref for v in loaded]
        data.has_ref = torch.tensor([r is not None for r in refs], dtype=torch.bool)
        data.refs = half_stack(refs, size)
    return data


def half_stack(arrays: list[np.ndarray | None], size: int) -> torch.Tensor:
    """``(N, size, size)`` float16 of the views (None: zeros), each converted into its row: no float32 copy of the
    whole set is made first (the same values as stacking, then converting)."""
    out = torch.zeros(len(arrays), size, size, dtype=torch.float16)
    for k, a in enumerate(arrays):
        if a is not None:
            out[k] = torch.from_numpy(a)
    return out


def _safe_load(row: pd.Series, prep: PreprocessConfig, so: Mapping[str, Any] | None, references: bool, crops: int,
               seed: int, register: bool, self_reference: bool = False,
               rows: DecodedRows | None = None) -> list[Loaded] | None:
    try:
        return _load_row(row, prep, so, references, crops, seed, register, self_reference, rows)
    except ImageError as exc:
        log.warning("skipping %s: %s", row["uri"], exc)
        return None


def patch_labels(masks: torch.Tensor, labels: torch.Tensor, has_mask: torch.Tensor, grid: int,
                 defect_frac: float = 0.04, normal_frac: float = 0.01) -> torch.Tensor:
    """Per-patch class targets: the image's class where the patch holds at least ``defect_frac`` defect (thin
    scratches and bridges never fill a patch), normal where clean, ignored in between or without a mask.
    ``(B, S, S)`` -> ``(B, grid * grid)`` long."""
    frac = F.adaptive_avg_pool2d(masks.float()[:, None], grid)[:, 0].flatten(1)
    out = torch.full_like(frac, IGNORE, dtype=torch.long)
    out[frac <= normal_frac] = 0
    defect = (frac >= defect_frac) & (labels[:, None] > 0)
    out[defect] = labels[:, None].expand_as(out)[defect]
    out[~has_mask] = IGNORE
    return out
