"""benchmarks/pixel_memory.py: the memory of normal grey-level neighbourhoods finds a few-pixel defect on routing it
never saw, ignores a charging streak's offset, never learns from pixels near a defect and puts each neighbourhood's
score on its centre."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmark_module import load_benchmark

bench = load_benchmark("pixel_memory")
PATCH, STRIDE = 11, 4  # the benchmark's defaults


def _routing(rng: np.random.Generator, size: int = 160, pitch: int = 20, width: int = 6) -> np.ndarray:
    """Routing as real layers draw it: wires of one width on tracks of one pitch, broken into runs (line ends),
    some jogging down to the next track (corners, T-junctions), on a dark field with shot noise; levels in [0, 1]."""
    frame = np.full((size, size), 0.2, np.float32)
    for y0 in range(4, size - width, pitch):
        x = int(rng.integers(-20, 10))
        while x < size:
            run = int(rng.integers(25, 90))
            frame[y0:y0 + width, max(x, 0):x + run] = 0.8
            if rng.random() < 0.5 and y0 + pitch + width < size:
                jog = min(max(x + run - width, 0), size - width)
                frame[y0:y0 + pitch + width, jog:jog + width] = 0.8
            x += run + int(rng.integers(8, 20))
    return np.clip(frame + rng.normal(0, 0.03, frame.shape), 0, 1).astype(np.float32)


def _support(seed: int, n: int = 30) -> list:
    rng = np.random.default_rng(seed)
    return [(torch.from_numpy(_routing(rng)), None) for _ in range(n)]


def _particle_site(frame: np.ndarray) -> tuple[int, int]:
    """The centre of a 13 x 13 window of field (no wire) between two tracks, away from the border."""
    for y in range(17, frame.shape[0] - 10, 20):
        for x in range(20, frame.shape[1] - 20, 3):
            if frame[y - 6:y + 7, x - 6:x + 7].max() < 0.5:
                return y, x
    raise AssertionError("no empty field in the frame")


def test_a_five_pixel_particle_on_unseen_routing_is_the_maps_maximum():
    bank = bench.fit_bank(_support(0), PATCH, STRIDE, 8192, 16, seed=0, coreset=False)
    frame = _routing(np.random.default_rng(99))
    clean_max = bench.pixel_map(torch.from_numpy(frame), bank, PATCH, STRIDE).max()
    y, x = _particle_site(frame)
    rows, cols = np.ogrid[:frame.shape[0], :frame.shape[1]]
    frame[(rows - y) ** 2 + (cols - x) ** 2 <= 6] = 0.95  # a particle 5 px across
    scored = bench.pixel_map(torch.from_numpy(frame), bank, PATCH, STRIDE)
    peak = np.unravel_index(int(np.argmax(scored)), scored.shape)
    assert abs(peak[0] - y) <= 6 and abs(peak[1] - x) <= 6, (peak, (y, x))
    assert scored.max() > clean_max + 40  # uint8 levels: the particle stands well above the same frame without it


def test_a_charging_streaks_offset_is_not_scored():
    bank = bench.fit_bank(_support(1, 10), PATCH, STRIDE, 4096, 16, seed=0, coreset=False)
    frame = _routing(np.random.default_rng(7))
    plain = bench.pixel_map(torch.from_numpy(frame), bank, PATCH, STRIDE).astype(int)
    streaked = frame.copy()
    streaked[60:100] = np.clip(streaked[60:100] + 0.1, 0, 1)  # a band 0.1 brighter, as charging draws it
    moved = bench.pixel_map(torch.from_numpy(streaked), bank, PATCH, STRIDE).astype(int)
    inside = slice(60 + PATCH, 100 - PATCH)  # neighbourhoods wholly inside the band
    assert np.abs(moved[inside] - plain[inside]).mean() < 3


def test_no_neighbourhood_near_a_defect_pixel_is_clean():
    mask = np.zeros((40, 40), bool)
    mask[20, 20] = True
    keep = bench.clean(mask, (40, 40), 5, 1).reshape(36, 36)
    reach = bench.MASK_MARGIN + 5 - 1  # a 5-px neighbourhood starting up to this far before the pixel touches it
    rows = np.arange(36)
    near = (rows[:, None] >= 20 - reach) & (rows[:, None] <= 20 + bench.MASK_MARGIN) \
        & (rows[None, :] >= 20 - reach) & (rows[None, :] <= 20 + bench.MASK_MARGIN)
    assert not keep.numpy()[near].any() and keep.numpy()[~near].all()
    assert bench.clean(None, (40, 40), 5, 1).all()


def test_particles_on_an_independent_routing_lot_rank_high(tmp_path):
    """tests/routing_fixture.py (its own router and SEM-like rendering: three wire widths, vias, edge brightness,
    shot noise): with the greedy memory of 4,096 the particles' pixels rank high (pixel AUROC 0.987 when written)
    though few are the frame's maximum (F1max 0.152): wire and via meetings rare in the support frames score as high
    (docs/quality.md)."""
    import pandas as pd
    from routing_fixture import write_routing_lot

    from semclip_batch.analysis.metrics import PixelCounts

    lot = write_routing_lot(tmp_path, n_support=6, n_test=6, seed=31)
    support = pd.read_csv(lot["support"])
    frames = [(bench.levels(str(tmp_path / row.uri)), bench.load_frame(str(tmp_path / row.mask_uri)) > 0)
              for row in support.itertuples()]
    bank = bench.fit_bank(frames, PATCH, STRIDE, 4096, 16, seed=0)
    counts = PixelCounts()
    for uri in lot["defects"]:
        truth = bench.load_frame(str(tmp_path / uri.replace("_frame", "_mask"))) > 0
        counts.add(bench.pixel_map(bench.levels(str(tmp_path / uri)), bank, PATCH, STRIDE), truth)
    assert counts.auroc() > 0.95


def test_a_neighbourhoods_score_lands_on_its_centre_pixel(monkeypatch):
    """The grid of neighbourhood scores is put back on the frame where each neighbourhood's centre is: one
    neighbourhood scoring alone makes a maximum at ``(patch // 2 + i * stride, patch // 2 + j * stride)`` that
    reaches no farther than one stride from it (to the frame's edge where the neighbourhood is the first or last
    of its row or column: the pixels no centre covers repeat their nearest one)."""
    bank = bench.Bank(torch.zeros(PATCH * PATCH), torch.zeros(PATCH * PATCH, 2), torch.zeros(1, 2), 1.0)
    h, w = 83, 97
    gh, gw = (h - PATCH) // STRIDE + 1, (w - PATCH) // STRIDE + 1
    for i, j in ((0, 0), (5, 7), (gh - 1, gw - 1), (3, gw - 2)):
        hot = torch.zeros(gh * gw)
        hot[i * gw + j] = 1.0
        monkeypatch.setattr(bench, "nearest", lambda cols, bank, hot=hot: hot)
        scored = bench.pixel_map(torch.zeros(h, w), bank, PATCH, STRIDE).astype(int)
        ci, cj = PATCH // 2 + i * STRIDE, PATCH // 2 + j * STRIDE
        if 0 < i < gh - 1 and 0 < j < gw - 1:  # at an edge the maximum is the plateau between the centre and the edge
            assert scored[ci, cj] >= scored.max() - 1, (i, j)
        rows, cols = np.nonzero(scored >= scored.max() - 1)
        assert rows.min() >= (0 if i == 0 else ci - STRIDE) and rows.max() <= (h - 1 if i == gh - 1 else ci + STRIDE)
        assert cols.min() >= (0 if j == 0 else cj - STRIDE) and cols.max() <= (w - 1 if j == gw - 1 else cj + STRIDE)


def test_the_greedy_memory_keeps_rare_neighbourhoods_that_a_random_one_drops():
    """k-centre selection: three far points among 5,000 near ones are all kept in a memory of 20, and the kept
    set covers every point more tightly than a random draw of 20 does."""
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(5000, 16, generator=gen) * 0.1, torch.randn(3, 16, generator=gen) + 10.0])
    kept = bench.greedy_coreset(points, 20)
    assert len(set(kept.tolist())) == 20 and {5000, 5001, 5002} <= set(kept.tolist())
    drawn = torch.randperm(len(points), generator=gen)[:20]
    assert torch.cdist(points, points[kept]).amin(dim=1).max() < torch.cdist(points, points[drawn]).amin(dim=1).max()
    assert torch.equal(bench.greedy_coreset(points[:10], 20), torch.arange(10))  # fewer points than asked: all


def test_a_support_set_it_cannot_fit_is_refused_in_one_line():
    rng = np.random.default_rng(3)
    tiny = [(torch.from_numpy(_routing(rng, size=8)), None) for _ in range(4)]
    with pytest.raises(ValueError, match="support frames of 11 px or more"):
        bench.fit_bank([*tiny, (torch.from_numpy(_routing(rng)), None)], PATCH, STRIDE, 64, 8, seed=0)
    with pytest.raises(ValueError, match=r"mask \(10, 10\) does not match the frame \(160, 160\)"):
        bench.fit_bank([(torch.from_numpy(_routing(rng)), np.ones((10, 10), bool))] * 3, PATCH, STRIDE, 64, 8, seed=0)
