"""The one preprocessing function shared by run, train, pretrain and eval, and its inverse for maps.

grey frame ``(H, W)`` -> percentile stretch -> 3 channels -> resize (no crop, no pad) to the model input ->
normalise with the backbone's mean/std. Frames whose longer side exceeds the tile side (``tile_above``, or with
a scale policy the frame pixels the model input covers at that fraction of native resolution:
:attr:`~semclip_batch.config.PreprocessConfig.tile_side`) are also cut into overlapping square tiles; model maps
of those tiles are averaged back at ``H x W``. At most :data:`MAX_TILES`
tiles per frame: where more would be needed (extreme aspect ratios, huge frames), the tiles grow and are scored at
reduced resolution, and stop being square once they reach the frame's short side.

One addition for class scores only, in ``run`` only: the *defect view* (:func:`defect_view`), a crop of the
stretched frame at native resolution around the anomaly map's maximum, for frames of at least
:data:`DEFECT_VIEW_ABOVE` model inputs when the model asks for it (``PreprocessConfig.defect_view``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from semclip_batch.config import PreprocessConfig
from semclip_batch.io.levels import stretch

MAX_TILES = 63  # so that a frame is at most 1 + 63 = 64 model views
VIEW_LEVELS = 65535  # grey levels of a packed view (uint16)
FRAME_LEVELS = 255  # grey levels of a packed frame (uint8), shipped for the defect view and the grey-level memory
DEFECT_VIEW_ABOVE = 2  # frames whose longer side is at least this many model inputs get a defect view
FRAME_MAX_PIXELS = 4096 * 4096  # frames whose levels cross the object store: up to 16 MB of uint8 levels each
DEFECT_VIEW_MAX_PIXELS = FRAME_MAX_PIXELS  # larger frames take no defect view (their class scores: the whole view's)


@dataclass(frozen=True)
class Tile:
    """A window of the original frame: rows ``y:y+height``, columns ``x:x+width`` (square unless capped)."""

    y: int
    x: int
    height: int
    width: int

    @property
    def side(self) -> int:
        """The side of a square tile; a rectangular one has none."""
        if self.height != self.width:
            raise ValueError(f"tile {self.height}x{self.width} is not square")
        return self.height


def tile_grid(height: int, width: int, tile_above: int, overlap: float = 0.25) -> list[Tile]:
    """Overlapping tiles covering the frame, or ``[]`` when the frame is not tiled.

    Tiles are squares of side ``min(tile_above, height, width)``. Where that would take more than
    :data:`MAX_TILES`, the side grows to the smallest that fits (each tile dimension capped by the frame's).
    """
    if max(height, width) <= tile_above:
        return []
    side = min(tile_above, height, width)
    if _tile_count(height, width, side, overlap) > MAX_TILES:
        side = _capped_side(height, width, side, overlap)
    tile_h, tile_w = min(side, height), min(side, width)
    ys = _starts(height, tile_h, _stride(tile_h, overlap))
    xs = _starts(width, tile_w, _stride(tile_w, overlap))
    return [Tile(y, x, tile_h, tile_w) for y in ys for x in xs]


def frame_tiles(height: int, width: int, cfg: PreprocessConfig) -> list[Tile]:
    """The tiles a frame is scored with under ``cfg`` (its tile side and overlap); ``[]``: the whole view only."""
    return tile_grid(height, width, cfg.tile_side, cfg.tile_overlap)


def _stride(side: int, overlap: float) -> int:
    return max(1, round(side * (1.0 - overlap)))


def _n_starts(length: int, side: int, stride: int) -> int:
    return 1 if length <= side else math.ceil((length - side) / stride) + 1


def _tile_count(height: int, width: int, side: int, overlap: float) -> int:
    """Tiles needed with windows of ``min(side, height) x min(side, width)``; never increases with ``side``."""
    tile_h, tile_w = min(side, height), min(side, width)
    return (_n_starts(height, tile_h, _stride(tile_h, overlap))
            * _n_starts(width, tile_w, _stride(tile_w, overlap)))


def _capped_side(height: int, width: int, side: int, overlap: float) -> int:
    """The smallest side above ``side`` (which needs too many tiles) giving at most :data:`MAX_TILES` tiles."""
    too_small, enough = side, max(height, width)  # a whole-frame window is one tile
    while enough - too_small > 1:
        mid = (too_small + enough) // 2
        if _tile_count(height, width, mid, overlap) <= MAX_TILES:
            enough = mid
        else:
            too_small = mid
    return enough


def _starts(length: int, side: int, stride: int) -> list[int]:
    n = _n_starts(length, side, stride)
    if n == 1:
        return [0]
    return [round(k * (length - side) / (n - 1)) for k in range(n)]


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(N, C, H, W)``; antialiased when shrinking; to its own size, a copy of the input (what
    bilinear sampling at unit scale returns; a native tile is one)."""
    if (img.shape[-2], img.shape[-1]) == size:
        return img.clone()
    shrink = size[0] < img.shape[-2] or size[1] < img.shape[-1]
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def model_inputs(gray: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """All model views of one frame: the whole frame first, then its tiles.

    Args:
        gray: ``(H, W)`` float frame from :func:`semclip_batch.io.decode.decode_image`.
    Returns:
        ``(1 + n_tiles, 3, S, S)`` float32, normalised with the backbone's mean/std.
    """
    return normalize(grey_views(gray, cfg, frame_tiles(gray.shape[0], gray.shape[1], cfg)), cfg).numpy()


def packed_views(gray: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The views :func:`model_inputs` normalises, as ``run``'s decode stage ships them to the model actor: one
    grey channel in uint16 (:func:`pack_views`). ``(H, W)`` -> ``(1 + n_tiles, S, S)`` uint16."""
    return pack_views(grey_views(gray, cfg, frame_tiles(gray.shape[0], gray.shape[1], cfg)))


def decoded_views(gray: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """What ``run``'s decode stage ships for one frame: :func:`packed_views`, and for a frame that gets a defect
    view (:func:`needs_defect_view`) or whose model reads every frame's levels (``cfg.frame_levels``: a grey-level
    memory) the whole stretched frame in uint8 (:func:`pack_frame`), else None."""
    frame = stretch(gray, cfg.percentile_low, cfg.percentile_high)
    views = pack_views(stretched_views(frame, cfg, frame_tiles(gray.shape[0], gray.shape[1], cfg)))
    shipped = ships_levels(gray.shape[0], gray.shape[1], cfg) or needs_defect_view(gray.shape[0], gray.shape[1], cfg)
    return views, pack_frame(frame) if shipped else None


def ships_levels(height: int, width: int, cfg: PreprocessConfig) -> bool:
    """Whether a frame's levels are shipped for a grey-level memory (``cfg.frame_levels``): frames within
    :func:`fuses_levels`' limit."""
    return cfg.frame_levels and fuses_levels(height, width)


def fuses_levels(height: int, width: int) -> bool:
    """Whether a model with a grey-level memory fuses a frame's map: frames of up to :data:`FRAME_MAX_PIXELS` (a
    larger frame's levels are not shipped and its map stays as it is; ``train`` fits its thresholds alike)."""
    return height * width <= FRAME_MAX_PIXELS


def needs_defect_view(height: int, width: int, cfg: PreprocessConfig) -> bool:
    """Whether a frame's class scores also read its defect view: with ``cfg.defect_view``, frames whose longer
    side is at least :data:`DEFECT_VIEW_ABOVE` model inputs (below that the whole view is already near native
    resolution), up to :data:`DEFECT_VIEW_MAX_PIXELS` (the uint8 frame crosses the object store)."""
    return (cfg.defect_view and max(height, width) >= DEFECT_VIEW_ABOVE * cfg.image_size
            and height * width <= DEFECT_VIEW_MAX_PIXELS)


def unpack_frame(packed: bytes, height: int, width: int) -> torch.Tensor:
    """:func:`pack_frame`'s bytes -> ``(H, W)`` uint8 levels (a writable copy, as torch wants)."""
    return torch.from_numpy(np.frombuffer(packed, dtype=np.uint8).reshape(height, width).copy())


def pack_frame(stretched: np.ndarray) -> np.ndarray:
    """A stretched frame in [0, 1] to uint8 levels: 1 byte a pixel, half the views' 2, because the whole frame
    crosses the object store; a step of 1/255 is coarser than the views' but finer than bf16's near 1 and than a
    stretched SEM frame's noise (the grey-level memory is fitted on levels rounded alike). ``(H, W)`` float -> ``(H, W)``
    uint8."""
    return np.rint(np.clip(stretched, 0.0, 1.0) * np.float32(FRAME_LEVELS)).astype(np.uint8)


def shipped_levels(gray: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """A frame's uint8 levels as ``run``'s decode stage ships them (:func:`decoded_views`): stretched between
    ``percentiles`` and packed (:func:`pack_frame`); ``train`` reads its support frames and their references alike."""
    return pack_frame(stretch(gray, *percentiles))


def defect_view(frame: torch.Tensor, frame_map: torch.Tensor, size: int) -> torch.Tensor:
    """The square window of ``size`` frame pixels (native resolution; of the frame's short side where that is
    shorter, resized) centred on the anomaly map's maximum (the frame's centre where the map is flat or not
    finite) and kept inside the frame, in [0, 1].
    ``frame`` ``(H, W)`` uint8 levels, ``frame_map`` ``(H, W)`` -> ``(size, size)`` float32, on their device."""
    h, w = frame.shape
    lo, hi = frame_map.aminmax()
    if bool(torch.isfinite(lo) & torch.isfinite(hi) & (hi > lo)):
        cy, cx = divmod(int(frame_map.argmax()), w)
    else:
        cy, cx = h // 2, w // 2
    side = min(size, h, w)
    y = min(max(cy - side // 2, 0), h - side)
    x = min(max(cx - side // 2, 0), w - side)
    window = frame[y:y + side, x:x + side].to(torch.float32) / FRAME_LEVELS
    if side != size:
        window = resize(window[None, None], (size, size))[0, 0]
    return window


def pack_views(views: torch.Tensor) -> np.ndarray:
    """Grey views in [0, 1] to uint16 levels (rounded; a step of 1/65535, far below bf16's resolution and any
    SEM detector's noise): 2 bytes a pixel through the object store instead of the 12 of three normalised float32
    channels. ``(N, S, S)`` float -> ``(N, S, S)`` uint16."""
    levels = np.rint(views.float().clamp(0.0, 1.0).numpy() * np.float32(VIEW_LEVELS))
    return levels.astype(np.uint16)


def unpack_views(levels: torch.Tensor) -> torch.Tensor:
    """:func:`pack_views`' inverse, on the tensor's device. ``(N, S, S)`` uint16 -> ``(N, S, S)`` float32 in
    [0, 1]."""
    return levels.to(torch.float32) / VIEW_LEVELS


def grey_views(gray: np.ndarray, cfg: PreprocessConfig, tiles: list[Tile]) -> torch.Tensor:
    """The frame stretched once, then the whole frame and each of ``tiles`` resized to the model input, before
    normalisation (what ``run`` scores and ``train`` fits on). ``(H, W)`` -> ``(1 + len(tiles), S, S)`` float32."""
    return stretched_views(stretch(gray, cfg.percentile_low, cfg.percentile_high), cfg, tiles)


def stretched_views(stretched: np.ndarray, cfg: PreprocessConfig, tiles: list[Tile]) -> torch.Tensor:
    """:func:`grey_views` of a frame already stretched to [0, 1]."""
    frame = torch.from_numpy(stretched)[None, None]
    size = (cfg.image_size, cfg.image_size)
    views = [resize(frame, size)]
    for t in tiles:
        views.append(resize(frame[..., t.y:t.y + t.height, t.x:t.x + t.width], size))
    return torch.cat(views)[:, 0]


def normalize(views: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Grey views in [0, 1] to 3 normalised channels, on the views' device. ``(N, S, S)`` -> ``(N, 3, S, S)``
    float32."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=views.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=views.device).view(1, 3, 1, 1)
    # the grey channel broadcast against (1, 3, 1, 1) writes the 3 channels in one pass, then divides in place:
    # the same values as expanding to 3 channels first, at half the cost (a step of pretrain spent ~15 % here)
    return (views.float()[:, None] - mean).div_(std)


def mask_view(mask: np.ndarray, size: int) -> np.ndarray:
    """A truth mask as the defect fraction of each model-input pixel. ``(H, W)`` bool -> ``(S, S)`` float32."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(m, size=(size, size), mode="area")[0, 0].numpy()


def maps_to_frame(maps: torch.Tensor, height: int, width: int, tiles: list[Tile]) -> torch.Tensor:
    """Model-resolution maps back to the frame.

    Args:
        maps: ``(1 + n_tiles, S, S)``; the first is the whole-frame view, used only when untiled.
    Returns:
        ``(H, W)`` float32 on the maps' device: the whole-frame map resized, or the tiles' maps averaged where
        they overlap.
    """
    maps = maps.float()
    if not tiles:
        return resize(maps[:1, None], (height, width))[0, 0]
    acc = torch.zeros(height, width, device=maps.device)
    hits = torch.zeros(height, width, device=maps.device)
    for tile, tile_map in zip(tiles, maps[1:], strict=False):
        up = resize(tile_map[None, None], (tile.height, tile.width))[0, 0]
        acc[tile.y:tile.y + tile.height, tile.x:tile.x + tile.width] += up
        hits[tile.y:tile.y + tile.height, tile.x:tile.x + tile.width] += 1.0
    return acc / hits.clamp_min(1.0)
