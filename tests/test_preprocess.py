"""The one preprocessing function and the inverse mapping of model maps to H x W."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from semclip_batch.config import PreprocessConfig
from semclip_batch.preprocess import maps_to_frame, model_inputs, stretch, tile_grid

CFG = PreprocessConfig(image_size=240, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_stretch_uses_full_range_for_12_in_16_bit():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 4096, (100, 100)).astype(np.float32) / 65535.0  # 12 bits inside 16
    out = stretch(frame, 0.5, 99.5)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out) > 0.4


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


def test_maps_back_to_frame_untiled_and_tiled():
    maps = torch.full((1, 240, 240), 0.5)
    assert maps_to_frame(maps, 123, 77, []).shape == (123, 77)
    tiles = tile_grid(2000, 1500, 1024)
    stack = torch.cat([torch.zeros(1, 240, 240), torch.full((len(tiles), 240, 240), 0.25)])
    frame = maps_to_frame(stack, 2000, 1500, tiles)
    assert frame.shape == (2000, 1500)
    assert torch.allclose(frame, torch.full_like(frame, 0.25), atol=1e-6)
