"""The grey-level memory (``model/grey_memory.py``, ``fewshot/grey_memory_fit.py``; docs/quality.md rule 17): it finds
a few-pixel defect on routing it never saw, ignores a charging streak's offset, never learns from pixels near a
defect, puts each neighbourhood's score on its centre; ``train`` keeps it only where the held-out frames gain and
``run`` fuses it into every frame's map at the frame's resolution."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from decoded_batch import decoded as decoded_frames

from semclip_batch.fewshot import grey_memory_fit as fit
from semclip_batch.model import grey_memory
from semclip_batch.model.grey_memory import DIM, OUTSIDE_BARS, PATCH, STRIDE, GreyMemory, grid_shape


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


def _levels(amap: np.ndarray) -> np.ndarray:
    """A map in the stored masks' uint8 levels (as ints)."""
    return np.rint(amap * 255).astype(int)


def test_a_five_pixel_particle_on_unseen_routing_is_the_maps_maximum():
    memory = fit.fit_grey_memory(_support(0), seed=0, entries=8192, coreset=False)
    frame = _routing(np.random.default_rng(99))
    clean_max = _levels(memory.frame_map(torch.from_numpy(frame)).numpy()).max()
    y, x = _particle_site(frame)
    rows, cols = np.ogrid[:frame.shape[0], :frame.shape[1]]
    frame[(rows - y) ** 2 + (cols - x) ** 2 <= 6] = 0.95  # a particle 5 px across
    scored = _levels(memory.frame_map(torch.from_numpy(frame)).numpy())
    peak = np.unravel_index(int(np.argmax(scored)), scored.shape)
    assert abs(peak[0] - y) <= 6 and abs(peak[1] - x) <= 6, (peak, (y, x))
    assert scored.max() > clean_max + 40  # uint8 levels: the particle stands well above the same frame without it


def test_a_charging_streaks_offset_is_not_scored():
    memory = fit.fit_grey_memory(_support(1, 10), seed=0, coreset=False)
    frame = _routing(np.random.default_rng(7))
    plain = _levels(memory.frame_map(torch.from_numpy(frame)).numpy())
    streaked = frame.copy()
    streaked[60:100] = np.clip(streaked[60:100] + 0.1, 0, 1)  # a band 0.1 brighter, as charging draws it
    moved = _levels(memory.frame_map(torch.from_numpy(streaked)).numpy())
    inside = slice(60 + PATCH, 100 - PATCH)  # neighbourhoods wholly inside the band
    assert np.abs(moved[inside] - plain[inside]).mean() < 3


def test_no_neighbourhood_near_a_defect_pixel_is_clean():
    mask = np.zeros((60, 60), bool)
    mask[30, 30] = True
    gh, gw = grid_shape(60, 60)
    keep = fit.clean(mask, (60, 60)).reshape(gh, gw).numpy()
    starts = np.arange(gh) * STRIDE  # a neighbourhood covers start .. start + PATCH - 1
    near_axis = (starts + PATCH - 1 >= 30 - fit.MASK_MARGIN) & (starts <= 30 + fit.MASK_MARGIN)
    near = near_axis[:, None] & near_axis[None, :]
    assert near.sum() > 4 and not keep[near].any() and keep[~near].all()
    assert fit.clean(None, (60, 60)).all()
    # random masks of odd sizes, defects at the borders too: as the mask grown by the margin at every pixel, then
    # pooled over each neighbourhood
    rng = np.random.default_rng(3)
    for h, w in ((60, 60), (97, 131), (11, 40)):
        mask = rng.random((h, w)) > 0.995
        mask[0, -1] = mask[-1, 0] = True
        grown = F.max_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], 2 * fit.MASK_MARGIN + 1, 1,
                             fit.MASK_MARGIN)
        assert torch.equal(fit.clean(mask, (h, w)), F.max_pool2d(grown, PATCH, STRIDE).flatten() == 0)


def test_a_neighbourhoods_score_lands_on_its_centre_pixel(monkeypatch):
    """The grid of neighbourhood scores is put back on the frame where each neighbourhood's centre is: one
    neighbourhood scoring alone makes a maximum at ``(PATCH // 2 + i * STRIDE, PATCH // 2 + j * STRIDE)`` that
    reaches no farther than one stride from it (to the frame's edge where the neighbourhood is the first or last
    of its row or column: the pixels no centre covers repeat their nearest one)."""
    memory = GreyMemory(entries=1)
    h, w = 83, 97
    gh, gw = grid_shape(h, w)
    for i, j in ((0, 0), (5, 7), (gh - 1, gw - 1), (3, gw - 2)):
        hot = torch.zeros(gh * gw)
        hot[i * gw + j] = 1.0
        monkeypatch.setattr(memory, "nearest", lambda cols, hot=hot: hot)
        scored = _levels(memory.frame_map(torch.zeros(h, w)).numpy())
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
    kept = fit.greedy_coreset(points, 20)
    assert len(set(kept.tolist())) == 20 and {5000, 5001, 5002} <= set(kept.tolist())
    drawn = torch.randperm(len(points), generator=gen)[:20]
    assert torch.cdist(points, points[kept]).amin(dim=1).max() < torch.cdist(points, points[drawn]).amin(dim=1).max()
    assert torch.equal(fit.greedy_coreset(points[:10], 20), torch.arange(10))  # fewer points than asked: all


def test_a_support_set_it_cannot_fit_is_refused_in_one_line():
    rng = np.random.default_rng(3)
    tiny = [(torch.from_numpy(_routing(rng, size=8)), None) for _ in range(4)]
    with pytest.raises(ValueError, match="two support frames of 11 px or more; got 1"):
        fit.fit_grey_memory([*tiny, (torch.from_numpy(_routing(rng)), None)], seed=0)
    with pytest.raises(ValueError, match=r"mask \(10, 10\) does not match the frame \(160, 160\)"):
        fit.fit_grey_memory([(torch.from_numpy(_routing(rng)), np.ones((10, 10), bool))] * 3, seed=0)


@pytest.mark.parametrize("own", [0, grey_memory.OWN])
def test_a_held_out_frame_that_is_all_defect_is_left_out_of_the_scale(own):
    rng = np.random.default_rng(8)
    frames = [(torch.from_numpy(_routing(rng)), None) for _ in range(9)]
    frames.append((torch.from_numpy(_routing(rng)), np.ones((160, 160), bool)))  # no clean neighbourhood
    seed = next(s for s in range(100) if 9 in np.random.default_rng(s).choice(10, 2, replace=False))  # held out
    memory = fit.fit_grey_memory(frames, seed=seed, entries=64, own=own)  # the other held-out frame fixes the scale
    assert np.isfinite(float(memory.scale)) and float(memory.scale) > grey_memory.MIN_SCALE
    with pytest.raises(ValueError, match="no clean neighbourhood to fit or to hold out"):  # nothing else held out
        fit.fit_grey_memory([*frames[:4], frames[9]], seed=next(
            s for s in range(100) if 4 in np.random.default_rng(s).choice(5, 1, replace=False)), entries=64, own=own)


@pytest.mark.parametrize("chunk", [50, 80, 3 * 37 + 1])  # bands of 1, 2 and 3 grid rows (37 neighbourhoods a row)
def test_a_frame_is_scored_in_bands_with_the_result_of_one_pass(monkeypatch, chunk):
    memory = fit.fit_grey_memory(_support(6, 5), seed=0, entries=64, own=grey_memory.OWN)
    levels = torch.from_numpy(_routing(np.random.default_rng(1), size=160)[:, :155])
    q = memory.project(grey_memory.neighbourhoods(levels))
    whole = torch.minimum(memory.nearest(q), grey_memory.own_nearest(q, grid_shape(160, 155)[1], int(memory.own)))
    monkeypatch.setattr(grey_memory, "CHUNK", chunk)
    assert torch.allclose(memory.grid_distances(levels), whole, atol=1e-5)  # the same up to float rounding
    at = torch.tensor([0, 5, 36, 37, 600, len(q) - 1])
    assert torch.allclose(memory.distances_at(levels, at), whole[at], atol=1e-5)


def test_a_memory_without_own_neighbourhoods_scores_band_by_band_as_before_rule_18(monkeypatch):
    """own 0 (checkpoints written before rule 18): the distances of the code before it, to the bit: each band of
    grid rows projected and searched on its own."""
    memory = fit.fit_grey_memory(_support(6, 5), seed=0, entries=64)  # own 0: train's default
    levels = torch.from_numpy(_routing(np.random.default_rng(1), size=160)[:, :155])
    monkeypatch.setattr(grey_memory, "CHUNK", 80)  # bands of 2 grid rows: 37 neighbourhoods a row, 38 rows
    bands = [grey_memory.neighbourhoods(levels[r * STRIDE:(min(38, r + 2) - 1) * STRIDE + PATCH]) for r in range(0, 38, 2)]
    before = torch.cat([memory.nearest((cols.float() - memory.mean) @ memory.axes) for cols in bands])
    assert torch.equal(memory.grid_distances(levels), before)


@pytest.mark.parametrize(("entries", "exact"), [(32, True), (16, True), (64, True), (24, False), (8, False), (60, False)])
def test_nearest_entries_are_searched_block_by_block_with_the_whole_matrix_least(monkeypatch, entries, exact):
    """The running least over blocks of the memory's 64 entries is the whole distance matrix's least: to the bit
    where the blocks are full and wide (2 or 4 blocks, or one), within float rounding where one is short or narrow
    (24 + 24 + 16, eight blocks of 8, 60 + 4: the matrix product's kernel for that width rounds apart); and the
    distance to the nearest entry (against cdist)."""
    memory = fit.fit_grey_memory(_support(6, 5), seed=0, entries=64)
    assert len(memory.entries) == 64
    q = memory.project(grey_memory.neighbourhoods(torch.from_numpy(_routing(np.random.default_rng(2), size=120))))
    squared = (memory.entries * memory.entries).sum(dim=1)
    whole = (torch.addmm(squared, q, memory.entries.T, alpha=-2).amin(dim=1) + (q * q).sum(dim=1)).clamp_min(0).sqrt()
    monkeypatch.setattr(grey_memory, "NEAREST_ENTRIES", entries)
    monkeypatch.setattr(grey_memory, "NEAREST_ROWS", 100)
    blocked = memory.nearest(q)
    # a squared distance ~1 ulp apart; its root is not where it is near 0
    assert torch.equal(blocked, whole) if exact else torch.allclose(blocked.square(), whole.square(), atol=1e-6)
    assert torch.allclose(blocked, torch.cdist(q.double(), memory.entries.double()).amin(dim=1).float(), atol=1e-4)


def _own_by_hand(q: torch.Tensor, columns: int, size: int) -> torch.Tensor:
    """Rule 18's own distance the slow way: every pair, those within OWN_GAP grid steps in both row and column out."""
    bank = torch.randperm(len(q), generator=torch.Generator().manual_seed(grey_memory.OWN_SEED))[:size]
    rows, cols = torch.arange(len(q)) // columns, torch.arange(len(q)) % columns
    d = torch.cdist(q.double(), q[bank].double())
    near = ((rows[:, None] - rows[bank][None]).abs() <= grey_memory.OWN_GAP) & (
        (cols[:, None] - cols[bank][None]).abs() <= grey_memory.OWN_GAP)
    return d.masked_fill(near, float("inf")).amin(dim=1).float()


@pytest.mark.parametrize(("shape", "size"), [((30, 17), 200), ((30, 17), 10_000), ((9, 40), 64), ((5, 5), 50)])
def test_own_distances_match_a_search_of_every_pair_outside_the_gap(monkeypatch, shape, size):
    monkeypatch.setattr(grey_memory, "CHUNK", 37)  # blocks that cut grid rows
    q = torch.randn(shape[0] * shape[1], DIM, generator=torch.Generator().manual_seed(size))
    ours = grey_memory.own_nearest(q, shape[1], size)
    expected = _own_by_hand(q, shape[1], size)
    assert torch.allclose(ours, expected, atol=1e-4)
    at = torch.randperm(len(q), generator=torch.Generator().manual_seed(1))[:len(q) // 3]  # unsorted, a third
    assert torch.allclose(grey_memory.own_nearest(q, shape[1], size, at), expected[at], atol=1e-4)
    assert grey_memory.own_nearest(q, shape[1], size, torch.zeros(0, dtype=torch.long)).shape == (0,)
    if shape == (5, 5):  # every neighbourhood within the gap of every other: none to compare with
        assert torch.isinf(ours).all()


def test_own_neighbourhoods_quiet_a_structure_the_frame_repeats_but_not_a_lone_particle():
    """Rule 18: line ends that no support frame holds but the frame repeats score low against the frame's own
    neighbourhoods; a particle the frame holds once keeps its score (its own neighbourhoods lie within the gap)."""
    rng = np.random.default_rng(4)
    support = []
    for _ in range(10):  # unbroken lines across the field: no line end anywhere
        frame = np.full((160, 160), 0.2, np.float32)
        for y0 in range(4, 154, 20):
            frame[y0:y0 + 6] = 0.8
        support.append((torch.from_numpy(np.clip(frame + rng.normal(0, 0.03, frame.shape), 0, 1).astype(np.float32)),
                        None))
    with_own = fit.fit_grey_memory(support, seed=0, entries=512, own=grey_memory.OWN)
    without = fit.fit_grey_memory(support, seed=0, entries=512)
    assert int(with_own.own) == grey_memory.OWN and int(without.own) == 0
    for name in ("mean", "axes", "entries"):  # the same memory: only the distance and so the scale differ
        assert torch.equal(getattr(with_own, name), getattr(without, name))
    assert float(with_own.scale) < float(without.scale)  # the held-out frames' distances taken with their own too
    with pytest.raises(ValueError, match="own neighbourhoods must be 0 to 16384; got 16385"):
        fit.fit_grey_memory(support, seed=0, own=grey_memory.OWN_MAX + 1)
    frame = np.full((320, 320), 0.2, np.float32)
    for y0 in range(4, 314, 20):
        for x0 in range(0, 320, 80):  # 60 px runs: a line end every 80 px, 64 of them in the frame
            frame[y0:y0 + 6, x0:x0 + 60] = 0.8
    frame = np.clip(frame + rng.normal(0, 0.03, frame.shape), 0, 1).astype(np.float32)
    y, x = 237, 150  # field between two tracks
    rows, cols = np.ogrid[:320, :320]
    frame[(rows - y) ** 2 + (cols - x) ** 2 <= 6] = 0.95
    levels = torch.from_numpy(frame)
    maps = {name: m.frame_map(levels).numpy() for name, m in (("own", with_own), ("support", without))}
    particle = {name: amap[y - 2:y + 3, x - 2:x + 3].max() for name, amap in maps.items()}
    ends = {name: np.array([amap[4 + 20 * k:10 + 20 * k, 57:63].max() for k in range(3, 12)])  # runs' right ends
            for name, amap in maps.items()}
    peak = np.unravel_index(int(np.argmax(maps["own"])), maps["own"].shape)
    assert abs(peak[0] - y) <= 6 and abs(peak[1] - x) <= 6, peak
    assert ends["support"].min() >= 0.5 * particle["support"]  # the support alone: line ends score like the particle
    assert ends["own"].max() < 0.5 * particle["own"]  # against the frame's own: they drop, the particle stays


def test_a_frame_under_a_neighbourhood_gets_an_empty_map_and_fusion_weights_the_maps():
    memory = fit.fit_grey_memory(_support(2, 5), seed=0)
    assert memory.frame_map(torch.rand(8, 40)).eq(0).all()
    small = torch.rand(8, 40)
    memory.weight.fill_(0.5)
    assert torch.equal(memory.fuse(small, torch.rand(8, 40)), small)  # no neighbourhood: the map as it is
    memory.weight.zero_()
    levels = torch.from_numpy(_routing(np.random.default_rng(5)))
    base = torch.rand(levels.shape)
    assert torch.equal(memory.fuse(base, levels), base)  # weight 0: the map as it was
    memory.weight.fill_(0.5)
    assert torch.allclose(memory.fuse(base, levels), 0.5 * base + 0.5 * memory.frame_map(levels))
    assert memory.entries.shape[1] == DIM and 0 < float(memory.scale) < 1


def test_particles_on_an_independent_routing_lot_rank_high(tmp_path):
    """tests/routing_fixture.py (its own router and SEM-like rendering: three wire widths, vias, edge brightness,
    shot noise), the levels as run ships them: with the greedy memory of 4,096 the particles' pixels rank high
    (pixel AUROC 0.987 when written on float levels), though few are the frame's maximum (docs/quality.md)."""
    import pandas as pd
    from routing_fixture import write_routing_lot

    from semclip_batch.analysis.metrics import PixelCounts
    from semclip_batch.io.manifest import read_manifest

    lot = write_routing_lot(tmp_path, n_support=6, n_test=6, seed=31)
    support = fit.native_frames(read_manifest(str(lot["support"])), None)
    assert len(support) == len(pd.read_csv(lot["support"]))
    memory = fit.fit_grey_memory([(f.as_levels(), f.mask) for f in support.values()], seed=0)
    test = fit.native_frames(read_manifest(str(lot["test"])), None)
    counts = PixelCounts()
    for frame in test.values():
        counts.add(_levels(memory.frame_map(frame.as_levels()).numpy()).astype(np.uint8), frame.truth())
    assert counts.auroc() > 0.95


def _frames(n: int, seed: int) -> tuple[dict, dict]:
    """``n`` 64 x 64 frames, half with a 6-px square defect: truths and NativeFrames by position."""
    rng = np.random.default_rng(seed)
    truths, frames = {}, {}
    for k in range(n):
        truth = np.zeros((64, 64), bool)
        if k % 2:
            y, x = rng.integers(5, 53, size=2)
            truth[y:y + 6, x:x + 6] = True
        truths[k] = truth
        frames[k] = fit.NativeFrame(np.zeros((64, 64), np.uint8), truth if k % 2 else None, normal=not k % 2)
    return truths, frames


def test_the_held_out_frames_keep_the_memory_only_where_it_gains_pixel_auroc_and_keeps_f1max():
    truths, frames = _frames(8, 0)
    gen = torch.Generator().manual_seed(1)
    noisy = {k: torch.rand(64, 64, generator=gen) * 0.6 + torch.from_numpy(t).float() * 0.3 for k, t in truths.items()}
    maps = [fit.FrameMap(k, noisy[k], 0.5, bool(k % 2)) for k in truths]
    sharp = {k: torch.from_numpy(t).float() for k, t in truths.items()}.__getitem__
    kept = fit.choose_weight(maps, frames, sharp)
    assert kept["weight"] == fit.WEIGHT and kept["gain"] >= fit.MIN_GAIN
    blind = {k: torch.rand(64, 64, generator=gen) for k in truths}.__getitem__
    dropped = fit.choose_weight(maps, frames, blind)
    assert dropped["weight"] == 0.0 and dropped["gain"] < 0
    assert dropped["figures"]["0"] == kept["figures"]["0"]  # the map alone scored once, the same way
    normal_only = {k: f for k, f in frames.items() if not k % 2}
    none = fit.choose_weight([m for m in maps if m.position in normal_only], normal_only, sharp)
    assert none["weight"] == 0.0 and "no defect pixel" in none["note"]


@pytest.mark.parametrize(("figures", "weight"), [
    ({0.0: (0.90, 0.30), 0.5: (0.91, 0.30)}, 0.5),  # +0.01 and F1max kept: kept
    ({0.0: (0.90, 0.30), 0.5: (0.95, 0.29)}, 0.0),  # a gain that costs F1max: not kept
    ({0.0: (0.90, 0.30), 0.5: (0.909, 0.40)}, 0.0),  # under +0.01: not kept
])
def test_the_rule_needs_the_gain_and_no_f1max_lost(monkeypatch, figures, weight):
    class Counts:
        def __init__(self, auroc: float, f1: float) -> None:
            self.auroc, self.f1_max = (lambda: auroc), (lambda: f1)

    monkeypatch.setattr(fit, "fused_counts", lambda *args: {w: Counts(*f) for w, f in figures.items()})
    assert fit.choose_weight([], {}, torch.zeros)["weight"] == weight


def test_thresholds_are_fitted_on_the_fused_frame_maps():
    truths, frames = _frames(6, 2)
    maps = [fit.FrameMap(k, torch.zeros(64, 64), 0.9 if k % 2 else 0.1, bool(k % 2)) for k in truths]
    grey = {k: torch.from_numpy(t).float() for k, t in truths.items()}.__getitem__
    th = fit.fused_thresholds(maps, frames, grey, 0.5, "max")  # image score: the fused map's maximum alone
    assert 0.0 < th["image"] < 0.5  # defect frames peak at 0.5, normal frames at 0
    assert 0.0 < th["pixel"] <= 0.5  # any level up to the defects' 0.5 separates them


def _actors_build_with(monkeypatch, tiny_clip, memory):
    """The model stage's actors build the tiny model with ``memory`` as its grey-level memory; returns the builder."""
    from semclip_batch.methods import scoring as scoring_module
    from semclip_batch.pipeline import inference

    def built(spec, text, sha=None):
        scoring = scoring_module.build_model(replace(spec, grey_memory=False), text, backbone=tiny_clip)
        scoring.grey = memory
        return scoring

    monkeypatch.setattr(inference, "build_model", built)
    return built


def test_run_fuses_every_frames_map_with_the_memory_before_its_mask_score_and_defect_view(tmp_path, monkeypatch,
                                                                                       tiny_clip):
    """The model actor: every frame ships its levels (``frame_levels``), its stored mask and image score read the
    fused map, and only a frame large enough takes a defect view (cut at the fused map's maximum)."""
    from semclip_batch.config import ModelSpec
    from semclip_batch.io.preprocess import (
        defect_view,
        frame_tiles,
        maps_to_frame,
        normalize,
        unpack_frame,
        unpack_views,
    )
    from semclip_batch.methods.decisions import anomaly_score, to_mask
    from semclip_batch.methods.prompts import load_prompts, text_embeddings
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.pipeline.inference import Predictor, PredictorSetup

    spec = ModelSpec(backbone="semclip-tiny", defect_view=True, grey_memory=True)
    prep = preprocess_config(spec.backbone, tile_above=1024, defect_view=True, frame_levels=True)
    text = text_embeddings(tiny_clip, load_prompts())
    memory = fit.fit_grey_memory(_support(4, 6), seed=0)
    memory.weight.fill_(0.5)

    built = _actors_build_with(monkeypatch, tiny_clip, memory)
    shapes = ((700, 1100), (256, 256))
    decoded = decoded_frames(tmp_path, prep, shapes)
    assert all(len(f) == h * w for f, (h, w) in zip(decoded["frame_pixels"], shapes, strict=True))
    setup = PredictorSetup(spec=spec, prep=prep, text_embeddings=text, weights_sha256=tiny_clip.sha256,
                           batch_size=4, threads=1, use_gpu=False)
    rows = Predictor(setup)(decoded).to_pylist()
    plain = built(spec, text)
    with torch.no_grad():
        for row, (h, w), packed, shipped in zip(rows, shapes, decoded["pixels"], decoded["frame_pixels"], strict=True):
            views = unpack_views(torch.from_numpy(np.frombuffer(packed, np.uint16).reshape(-1, 240, 240).copy()))
            out = plain(normalize(views, prep))
            levels = unpack_frame(shipped, h, w)
            fused = memory.fuse(maps_to_frame(out.maps, h, w, frame_tiles(h, w, prep)), levels.float() / 255)
            assert not torch.allclose(fused, maps_to_frame(out.maps, h, w, frame_tiles(h, w, prep)))
            stored = np.frombuffer(row["mask"], np.uint8).reshape(h, w)
            assert np.abs(stored.astype(int) - to_mask(fused.numpy()).astype(int)).max() <= 1
            whole = out.class_probs[0]
            assert row["anomaly_score"] == pytest.approx(anomaly_score(float(whole[0]), float(fused.max())), abs=1e-5)
            expected = whole
            if max(h, w) >= 480:  # DEFECT_VIEW_ABOVE model inputs: the defect view at the fused map's maximum
                crop = plain(normalize(defect_view(levels, fused, 240)[None], prep)).class_probs[0]
                expected = 0.5 * (whole + crop)
            assert np.allclose(row["class_scores"], expected.numpy(), atol=1e-5)


def test_a_model_with_a_memory_refuses_a_decode_stage_that_shipped_no_levels(tmp_path, monkeypatch, tiny_clip):
    from semclip_batch.config import ModelSpec
    from semclip_batch.methods.prompts import load_prompts, text_embeddings
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.pipeline import inference

    spec = ModelSpec(backbone="semclip-tiny", grey_memory=True)
    memory = fit.fit_grey_memory(_support(4, 6), seed=0)

    _actors_build_with(monkeypatch, tiny_clip, memory)
    prep = preprocess_config(spec.backbone, tile_above=1024)
    decoded = decoded_frames(tmp_path, prep, ((256, 256),))
    assert decoded["frame_pixels"][0] == b""
    setup = inference.PredictorSetup(spec=spec, prep=prep, text_embeddings=text_embeddings(tiny_clip, load_prompts()),
                                     weights_sha256=tiny_clip.sha256, batch_size=4, threads=1, use_gpu=False)
    row = inference.Predictor(setup)(decoded).to_pylist()[0]
    assert row["status"] == "model_error" and "grey-level memory needs every frame's levels" in row["error"]


def test_a_checkpoints_memory_is_loaded_with_its_size_and_a_missing_one_is_refused(tiny_clip):
    from semclip_batch.config import ModelSpec
    from semclip_batch.errors import WeightsError
    from semclip_batch.methods.checkpoint import BACKBONE_PREFIXES
    from semclip_batch.methods.registry import new_model
    from semclip_batch.methods.scoring import build_model
    from semclip_batch.model.grey_memory import GREY_MEMORY

    text = torch.randn(7, 64)
    spec = ModelSpec(backbone="semclip-tiny", grey_memory=True, checkpoint="ckpt")
    own = {k: v for k, v in new_model(spec, tiny_clip.clip, text).state_dict().items()
           if not k.startswith(BACKBONE_PREFIXES)}
    memory = fit.fit_grey_memory(_support(5, 5), seed=0, entries=37, own=grey_memory.OWN)
    memory.weight.fill_(0.5)
    with_memory = {**own, **{f"{GREY_MEMORY}.{k}": v for k, v in memory.state_dict().items()}}
    scoring = build_model(spec, text.numpy(), backbone=tiny_clip, tensors=with_memory)
    assert scoring.grey is not None and scoring.grey.entries.shape == (37, DIM) and float(scoring.grey.weight) == 0.5
    assert torch.equal(scoring.grey.entries, memory.entries) and int(scoring.grey.own) == grey_memory.OWN
    assert set(memory.checkpoint_tensors()) == {"mean", "axes", "entries", "scale", "weight", "own"}
    memory.own.zero_()  # train's default: the tensors a checkpoint held before rule 18, so its checksum stays
    assert set(memory.checkpoint_tensors()) == {"mean", "axes", "entries", "scale", "weight"}
    before_rule_18 = {k: v for k, v in with_memory.items() if k != f"{GREY_MEMORY}.own"}
    older = build_model(spec, text.numpy(), backbone=tiny_clip, tensors=before_rule_18).grey
    assert older is not None and int(older.own) == 0  # scored against the support's entries only, as it was written
    levels = torch.from_numpy(_routing(np.random.default_rng(2)))
    assert torch.equal(older.grid_distances(levels), older.nearest(older.project(grey_memory.neighbourhoods(levels))))
    with pytest.raises(WeightsError, match=r"does not fit this model \(missing grey_memory\.entries\)"):
        build_model(spec, text.numpy(), backbone=tiny_clip, tensors=own)
    no_axes = {k: v for k, v in with_memory.items() if k != f"{GREY_MEMORY}.axes"}
    with pytest.raises(WeightsError, match="grey_memory: Error"):
        build_model(spec, text.numpy(), backbone=tiny_clip, tensors=no_axes)


def test_specs_and_preprocessing_without_it_keep_their_records():
    """Run ids of runs the memory does not touch stay as they were: neither field is recorded unless set."""
    from semclip_batch.config import ModelSpec, PreprocessConfig

    prep = PreprocessConfig(image_size=224, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert "frame_levels" not in prep.as_record() and replace(prep, frame_levels=True).as_record()["frame_levels"]
    assert "grey_memory" not in ModelSpec().output_affecting()
    assert ModelSpec(grey_memory=True).output_affecting()["grey_memory"] is True


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_stores_a_kept_memory_and_run_fuses_it(tmp_path, ray_cluster, monkeypatch):
    """``train`` with the default recipe fits the memory (here with rule 18's own neighbourhoods and rule 27's
    die-to-die residual, options; the residual's choice overruled so that ``run`` reads every row's reference),
    reports its held-out figures and (its choice overruled here, so that it is kept on this small lot) stores it
    with thresholds fitted on fused maps; ``run`` with that checkpoint ships every frame's levels and scores every
    frame."""
    import json

    from click.testing import CliRunner
    from routing_fixture import write_routing_lot

    from semclip_batch.cli import main
    from semclip_batch.methods.checkpoint import load_checkpoint
    from semclip_batch.model.grey_memory import GREY_MEMORY

    lot = write_routing_lot(tmp_path, n_support=7, n_test=3, seed=12, size=(256, 256))  # frames 5 and 13 held out
    chosen = fit.choose_weight
    monkeypatch.setattr(fit, "choose_weight", lambda *args, **kwargs: {**chosen(*args, **kwargs), "weight": fit.WEIGHT})
    weighed = fit.choose_reference

    def reference_kept(memory, *args, **kwargs):  # rule 30's choice made on the 2 held-out frames, then overruled
        record = weighed(memory, *args, **kwargs)
        memory.reference.fill_(OUTSIDE_BARS)
        memory.reference_scale.fill_(record["scale"])
        return {**record, "kept": True}

    monkeypatch.setattr(fit, "REFERENCE_MIN_FRAMES", 2)
    monkeypatch.setattr(fit, "choose_reference", reference_kept)
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    res = runner.invoke(main, ["train", str(lot["support"]), "--out", str(ckpt), "--backbone", "semclip-tiny",
                               "--pretrained", "shipped", "--adapt-steps", "0", "--epochs", "2",
                               "--own-neighbourhoods", str(grey_memory.OWN), "--die-to-die"])
    assert res.exit_code == 0, res.output
    loaded = load_checkpoint(str(ckpt))
    record = loaded.meta.training["grey_memory"]
    assert loaded.meta.grey_memory and record["weight"] == fit.WEIGHT and record["fitted_on"] == 12
    steps = loaded.meta.training["seconds_by_step"]  # where train's time went, in the order of its steps
    assert list(steps) == ["support set", "backbone", "fit", "maps' policy and thresholds", "grey-level memory",
                           "region classes"]  # --adapt-steps 0: no zero-shot check either
    assert 0 < sum(steps.values()) <= loaded.meta.training["seconds"] + 0.05 * (len(steps) + 1)  # each rounded
    assert "time by step: support set" in res.output
    assert set(record["figures"]) == {"0", "0.5"} and record["figures"]["0"]["pAUROC"] is not None
    assert loaded.tensors[f"{GREY_MEMORY}.entries"].shape[1] == DIM
    assert float(loaded.tensors[f"{GREY_MEMORY}.weight"]) == fit.WEIGHT
    own = loaded.tensors[f"{GREY_MEMORY}.own"]  # rule 18's count, an integer through safetensors
    assert own.dtype == torch.int64 and int(own) == grey_memory.OWN == record["own"]
    assert f"each frame also against {grey_memory.OWN} of its own" in res.output
    assert loaded.meta.thresholds.pixel != record["thresholds_before"]["pixel"] or \
        loaded.meta.thresholds.image != record["thresholds_before"]["image"]
    assert "grey-level memory (" in res.output and "kept at weight 0.5" in res.output
    lines = record["lines"]  # rule 26's choice, recorded and printed whichever way it went
    assert lines["length"] == 15 and isinstance(lines["kept"], bool) and lines["seconds"] >= 0
    assert "line residual (15 px lines): " in res.output
    assert (f"{GREY_MEMORY}.lines" in loaded.tensors) == lines["kept"]
    reference = record["reference"]  # rule 30's, kept: run reads every row's reference
    assert reference["held_out_with_reference"] == 2 and reference["seconds"] >= 0
    assert set(reference["figures"]) == {"without", "with"}
    assert int(loaded.tensors[f"{GREY_MEMORY}.reference"]) == OUTSIDE_BARS
    assert ("die-to-die residual (2 held-out frames with a reference, 0 with a data bar (its rows left out)): kept in the "
            "memory's map") in res.output
    test = lot["test"].read_text().splitlines()
    broken = test[1].split(",")  # a fourth test row whose reference is gone
    (tmp_path / "test" / "extra.png").write_bytes((tmp_path / broken[0]).read_bytes())
    broken[0], broken[-1] = "test/extra.png", "test/gone_ref.png"
    lot["test"].write_text("\n".join([*test, ",".join(broken)]) + "\n")
    out = tmp_path / "out"
    res = runner.invoke(main, ["run", str(lot["test"]), "--out", str(out), "--model", str(ckpt)])
    assert res.exit_code == 0, res.output
    run_record = json.loads(next((out / "runs").rglob("attempt-*.json")).read_text())
    assert run_record["counts"] == {"ok": 3, "reference_error": 1} and run_record["preprocessing"]["frame_levels"]


def test_each_frames_memory_map_is_computed_once(monkeypatch):
    memory = fit.fit_grey_memory(_support(3, 5), seed=0, entries=64)
    calls = []
    monkeypatch.setattr(memory, "neighbourhood_map", lambda levels: calls.append(1) or torch.zeros(levels.shape))
    frames = {7: fit.NativeFrame(np.zeros((30, 40), np.uint8), None, normal=True)}
    grey = fit.memory_maps(memory, frames)
    assert grey(7).shape == (30, 40) and grey(7) is grey(7) and len(calls) == 1


def test_held_out_frames_and_defect_frames_without_a_mask_stay_out_of_the_fit():
    mask = np.zeros((20, 20), bool)
    mask[5, 5] = True
    frames = {0: fit.NativeFrame(np.full((20, 20), 0, np.uint8), None, normal=True),
              1: fit.NativeFrame(np.full((20, 20), 1, np.uint8), mask, normal=False),
              2: fit.NativeFrame(np.full((20, 20), 2, np.uint8), None, normal=False),  # a defect, but where?
              3: fit.NativeFrame(np.full((20, 20), 3, np.uint8), None, normal=True)}
    kept = fit.fitting_frames(frames, held=[3])
    assert [round(float(levels[0, 0]) * 255) for levels, _ in kept] == [0, 1]
    assert not kept[0][1].any() and kept[1][1] is mask


def test_a_lot_whose_neighbourhoods_all_match_gets_the_floor_scale_not_a_nan_map():
    flat = [(torch.full((40, 40), 0.5), None) for _ in range(5)]
    memory = fit.fit_grey_memory(flat, seed=0, entries=16)
    assert float(memory.scale) == pytest.approx(grey_memory.MIN_SCALE)  # float32
    assert torch.isfinite(memory.frame_map(torch.rand(40, 40))).all()


def test_a_frame_run_ships_no_levels_for_keeps_its_map_in_train_too(monkeypatch):
    from semclip_batch.config import PreprocessConfig
    from semclip_batch.io import preprocess

    cfg = PreprocessConfig(image_size=224, mean=(0.5,) * 3, std=(0.25,) * 3, frame_levels=True)
    assert preprocess.ships_levels(4096, 4096, cfg) and not preprocess.ships_levels(4097, 4096, cfg)
    assert not preprocess.ships_levels(64, 64, replace(cfg, frame_levels=False))
    item = fit.FrameMap(0, torch.rand(30, 30), 0.5, True)
    grey = {0: torch.ones(30, 30)}.__getitem__
    assert torch.allclose(fit.fuse(item, grey, 0.5), 0.5 * item.map + 0.5)
    from semclip_batch.io import preprocess as preprocess_module

    monkeypatch.setattr(preprocess_module, "FRAME_MAX_PIXELS", 899)  # over the limit: unfused, as run leaves it
    assert torch.equal(fit.fuse(item, grey, 0.5), item.map)


@pytest.mark.parametrize(("field", "value"), [("entries", torch.zeros(0, DIM)), ("scale", torch.tensor(0.0)),
                                              ("weight", torch.tensor(0.0)), ("weight", torch.tensor(1.5)),
                                              ("own", torch.tensor(-1)), ("own", torch.tensor(16_385))])
def test_a_checkpoints_memory_that_cannot_score_is_refused(field, value):
    from semclip_batch.methods.scoring import grey_memory_from

    memory = fit.fit_grey_memory(_support(5, 5), seed=0, entries=8)
    memory.weight.fill_(0.5)
    tensors = {f"grey_memory.{k}": v for k, v in memory.state_dict().items()} | {f"grey_memory.{field}": value}
    problems: list[str] = []
    assert grey_memory_from(tensors, problems) is None
    assert problems and "needs entries, a scale above 0, a weight in (0, 1] and own 0 to 16384" in problems[0]


def test_run_leaves_a_frame_over_the_levels_limit_unfused(tmp_path, monkeypatch, tiny_clip):
    """A frame whose levels would not cross the object store keeps its map (it still takes its defect view where it
    ships levels for it); the others are fused."""
    from semclip_batch.config import ModelSpec
    from semclip_batch.io import preprocess
    from semclip_batch.io.preprocess import frame_tiles, maps_to_frame, normalize, unpack_frame, unpack_views
    from semclip_batch.methods.decisions import to_mask
    from semclip_batch.methods.prompts import load_prompts, text_embeddings
    from semclip_batch.methods.weights import preprocess_config
    from semclip_batch.pipeline import inference

    spec = ModelSpec(backbone="semclip-tiny", defect_view=True, grey_memory=True)
    prep = preprocess_config(spec.backbone, tile_above=1024, defect_view=True, frame_levels=True)
    memory = fit.fit_grey_memory(_support(4, 6), seed=0)
    memory.weight.fill_(0.5)

    built = _actors_build_with(monkeypatch, tiny_clip, memory)
    monkeypatch.setattr(preprocess, "FRAME_MAX_PIXELS", 300 * 300)
    shapes = ((700, 1100), (256, 256))
    decoded = decoded_frames(tmp_path, prep, shapes)
    text = text_embeddings(tiny_clip, load_prompts())
    setup = inference.PredictorSetup(spec=spec, prep=prep, text_embeddings=text, weights_sha256=tiny_clip.sha256,
                                     batch_size=4, threads=1, use_gpu=False)
    rows = inference.Predictor(setup)(decoded).to_pylist()
    plain = built(spec, text)
    with torch.no_grad():
        for row, (h, w), packed, shipped in zip(rows, shapes, decoded["pixels"], decoded["frame_pixels"], strict=True):
            views = unpack_views(torch.from_numpy(np.frombuffer(packed, np.uint16).reshape(-1, 240, 240).copy()))
            frame_map = maps_to_frame(plain(normalize(views, prep)).maps, h, w, frame_tiles(h, w, prep))
            expected = frame_map if h * w > 300 * 300 else memory.fuse(frame_map, unpack_frame(shipped, h, w) / 255)
            stored = np.frombuffer(row["mask"], np.uint8).reshape(h, w).astype(int)
            assert np.abs(stored - to_mask(expected.numpy()).astype(int)).max() <= 1, (h, w)


@pytest.mark.parametrize(("extra", "expected"), [
    (["--own-neighbourhoods", "-1"], "--own-neighbourhoods must be 0 to 16384, got -1"),
    (["--own-neighbourhoods", "16385"], "--own-neighbourhoods must be 0 to 16384, got 16385"),
    (["--own-neighbourhoods", "64", "--recipe", "paper"], "which --recipe paper with --method semclip does not fit"),
    (["--own-neighbourhoods", "64", "--method", "winclip"], "which --recipe transfer with --method winclip does not"),
    (["--die-to-die", "--recipe", "paper"], "--die-to-die is the grey-level memory's, which --recipe paper with"),
    (["--die-to-die", "--method", "winclip"], "--die-to-die is the grey-level memory's, which --recipe transfer with"),
])
def test_own_neighbourhoods_that_no_memory_would_use_are_refused_in_one_line(tmp_path, extra, expected):
    from click.testing import CliRunner
    from routing_fixture import write_routing_lot

    from semclip_batch.cli import main

    lot = write_routing_lot(tmp_path, n_support=2, n_test=1, seed=3, size=(128, 128))
    result = CliRunner().invoke(main, ["train", str(lot["support"]), "--out", str(tmp_path / "ckpt"), "--backbone",
                                       "semclip-tiny", "--pretrained", "shipped", *extra])
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error")]
    assert result.exit_code != 0 and "Traceback" not in result.output and len(errors) == 1, result.output
    assert expected in errors[0] and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(("extra", "tried"), [
    ([], True),  # rule 29: tried wherever the grey-level memory is fitted
    (["--no-die-to-die"], False),
    (["--die-to-die"], True),
    (["--recipe", "paper"], False),  # no memory: nothing to try, and no refusal
    (["--method", "winclip"], False),
    (["--no-die-to-die", "--recipe", "paper"], False),
])
def test_train_tries_the_die_to_die_residual_by_default_where_a_memory_is_fitted(tmp_path, monkeypatch, extra, tried):
    from click.testing import CliRunner
    from routing_fixture import write_routing_lot
    from train_handed import STOPPED, handed_to_train

    from semclip_batch.cli import main

    lot = write_routing_lot(tmp_path, n_support=2, n_test=1, seed=3, size=(128, 128))
    with handed_to_train(monkeypatch) as handed:
        result = CliRunner().invoke(main, ["train", str(lot["support"]), "--out", str(tmp_path / "ckpt"), "--backbone",
                                           "semclip-tiny", "--pretrained", "shipped", *extra])
    assert STOPPED in result.output and [cfg.reference_residual for cfg in handed] == [tried], result.output
