"""The one preprocessing function and the inverse mapping of model maps to H x W."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from semclip_batch.config import PreprocessConfig
from semclip_batch.io.preprocess import (
    MAX_TILES,
    VIEW_LEVELS,
    Tile,
    maps_to_frame,
    model_inputs,
    normalize,
    packed_views,
    stretch,
    tile_grid,
    unpack_views,
)

CFG = PreprocessConfig(image_size=240, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_stretch_uses_full_range_for_12_in_16_bit():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 4096, (100, 100)).astype(np.float32) / 65535.0  # 12 bits inside 16
    out = stretch(frame, 0.5, 99.5)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out) > 0.4


def test_stretch_of_a_large_periodic_frame_sees_every_phase():
    """Lines every 4 px on a 1024 x 1024 frame: a stride of 4 would sample one phase only."""
    rng = np.random.default_rng(1)
    frame = np.where(np.arange(1024) % 4 == 0, 0.8, 0.2)[None, :] + rng.normal(0, 0.01, (1024, 1024))
    frame = frame.astype(np.float32)
    out = stretch(frame, 0.5, 99.5)
    lo, hi = np.percentile(frame, [0.5, 99.5])
    exact = np.clip((frame - lo) / (hi - lo), 0, 1)
    assert np.abs(out - exact).max() < 0.02 and out.dtype == np.float32


def test_stretch_constant_frame_is_zero():
    assert not stretch(np.full((20, 20), 0.3, np.float32), 0.5, 99.5).any()


def test_no_tiles_up_to_tile_above():
    assert tile_grid(1024, 1024, 1024) == []
    assert tile_grid(300, 200, 1024) == []


def test_tiles_cover_frame_with_quarter_overlap():
    tiles = tile_grid(4096, 4096, 1024)
    assert len(tiles) == 25 and all(t.side == 1024 for t in tiles)
    cover = np.zeros((4096, 4096), np.int32)
    for t in tiles:
        cover[t.y:t.y + t.side, t.x:t.x + t.side] += 1
    assert cover.min() >= 1
    xs = sorted({t.x for t in tiles})
    assert all(b - a <= 768 for a, b in itertools.pairwise(xs))


def test_tiles_of_a_long_thin_frame_are_square():
    tiles = tile_grid(200, 3000, 1024)
    assert all(t.side == 200 and t.y == 0 for t in tiles)
    assert tiles[-1].x + 200 == 3000


def test_model_inputs_shape_and_normalisation():
    frame = np.tile(np.linspace(0, 1, 320, dtype=np.float32), (200, 1))
    x = model_inputs(frame, CFG)
    assert x.shape == (1, 3, 240, 240) and x.dtype == np.float32
    assert np.allclose(x[0, 0], x[0, 2])
    assert np.isclose(x.min(), (0 - 0.5) / 0.25, atol=0.05) and np.isclose(x.max(), (1 - 0.5) / 0.25, atol=0.05)
    big = model_inputs(np.zeros((1500, 1100), np.float32), CFG)
    assert big.shape[0] == 1 + len(tile_grid(1500, 1100, 1024))


def test_packed_views_are_the_model_inputs_in_uint16():
    """What run's decode stage ships (one grey channel in uint16) normalises in the actor to the model inputs,
    within half a level; every view (whole frame and tiles) is packed."""
    rng = np.random.default_rng(3)
    for shape in ((200, 320), (1500, 1100)):
        ramp = np.linspace(0.0, 1.0, shape[1], dtype=np.float32)[None, :] ** 2
        frame = ramp + 0.05 * rng.random(shape, dtype=np.float32)
        packed = packed_views(frame, CFG)
        assert packed.dtype == np.uint16 and packed.shape == (1 + len(tile_grid(*shape, 1024)), 240, 240)
        assert int(packed.max()) - int(packed.min()) > 0.9 * VIEW_LEVELS  # the stretch spans the levels
        x = normalize(unpack_views(torch.from_numpy(packed)), CFG).numpy()
        assert np.abs(x - model_inputs(frame, CFG)).max() <= 0.5 / VIEW_LEVELS / 0.25 + 1e-6


def test_maps_back_to_frame_untiled_and_tiled():
    maps = torch.full((1, 240, 240), 0.5)
    assert maps_to_frame(maps, 123, 77, []).shape == (123, 77)
    tiles = tile_grid(2000, 1500, 1024)
    stack = torch.cat([torch.zeros(1, 240, 240), torch.full((len(tiles), 240, 240), 0.25)])
    frame = maps_to_frame(stack, 2000, 1500, tiles)
    assert frame.shape == (2000, 1500)
    assert torch.allclose(frame, torch.full_like(frame, 0.25), atol=1e-6)


def _uncapped_starts(length: int, side: int, stride: int) -> list[int]:
    if length <= side:
        return [0]
    n = math.ceil((length - side) / stride) + 1
    return [round(k * (length - side) / (n - 1)) for k in range(n)]


def _uncapped_count(height: int, width: int, tile_above: int, overlap: float) -> int:
    if max(height, width) <= tile_above:
        return 0
    side = min(tile_above, height, width)
    stride = max(1, round(side * (1.0 - overlap)))
    return len(_uncapped_starts(height, side, stride)) * len(_uncapped_starts(width, side, stride))


def _uncapped_grid(height: int, width: int, tile_above: int, overlap: float) -> list[Tile]:
    """The tiling before the cap existed, written out independently."""
    if max(height, width) <= tile_above:
        return []
    side = min(tile_above, height, width)
    stride = max(1, round(side * (1.0 - overlap)))
    ys, xs = _uncapped_starts(height, side, stride), _uncapped_starts(width, side, stride)
    return [Tile(y, x, side, side) for y in ys for x in xs]


def _assert_covering(tiles: list[Tile], height: int, width: int) -> None:
    assert all(t.y >= 0 and t.x >= 0 and t.y + t.height <= height and t.x + t.width <= width for t in tiles)
    rows, cols = np.zeros(height, bool), np.zeros(width, bool)  # the grid is a product of row and column starts
    for t in tiles:
        rows[t.y:t.y + t.height] = True
        cols[t.x:t.x + t.width] = True
    assert rows.all() and cols.all()


def test_tiling_below_the_cap_is_unchanged():
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(16, 9000, 2))
        tile_above = int(rng.choice([16, 64, 256, 512, 1024, 2048]))
        overlap = float(rng.choice([0.0, 0.25, 0.5]))
        if _uncapped_count(h, w, tile_above, overlap) <= MAX_TILES:
            assert tile_grid(h, w, tile_above, overlap) == _uncapped_grid(h, w, tile_above, overlap)
            checked += 1
    assert checked > 50


def test_tiles_are_capped_and_still_cover_the_frame():
    rng = np.random.default_rng(2)
    shapes = [(16, 100_000), (100_000, 16), (8192, 8192), (16, 3000), (17, 65_000), (4000, 16_000)]
    shapes += [tuple(int(v) for v in rng.integers(16, 20_000, 2)) for _ in range(200)]
    capped = 0
    for h, w in shapes:
        for tile_above in (16, 100, 1024):
            tiles = tile_grid(h, w, tile_above, 0.25)
            assert len(tiles) <= MAX_TILES
            _assert_covering(tiles, h, w)
            if _uncapped_count(h, w, tile_above, 0.25) > MAX_TILES:
                capped += 1
                t = tiles[0]
                assert max(t.height, t.width) > min(tile_above, h, w)  # grown, i.e. reduced resolution
                assert t.height == t.width or min(t.height, t.width) == min(h, w)  # square unless the frame forbids
    assert capped > 200


def test_capped_square_frame_keeps_square_tiles():
    tiles = tile_grid(8192, 8192, 1024)
    assert len(tiles) == 49 and all(t.height == t.width > 1024 for t in tiles)
    assert tile_grid(5632, 5632, 1024) == _uncapped_grid(5632, 5632, 1024, 0.25)  # 7 x 7 = 49: not capped


def test_strip_tiles_are_rectangular_and_map_back():
    tiles = tile_grid(16, 100_000, 1024)
    assert 1 < len(tiles) <= MAX_TILES and all(t.height == 16 and t.width > 16 for t in tiles)
    with pytest.raises(ValueError, match="not square"):
        _ = tiles[0].side
    x = model_inputs(np.random.default_rng(0).random((16, 100_000), dtype=np.float32), CFG)
    assert x.shape == (1 + len(tiles), 3, 240, 240)
    ramp = torch.linspace(0, 1, len(tiles))[:, None, None].expand(-1, 240, 240)
    frame = maps_to_frame(torch.cat([torch.zeros(1, 240, 240), ramp]), 16, 100_000, tiles)
    assert frame.shape == (16, 100_000)
    assert torch.allclose(frame[:, 0], torch.zeros(16)) and torch.allclose(frame[:, -1], torch.ones(16))
