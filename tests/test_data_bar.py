"""Rule 30: data bars found on a frame's levels, and the die-to-die residual left at 0 in them (in ``run``'s memory map
and in the residual's scale as ``train`` fits it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semclip_batch.fewshot import residual_fit
from semclip_batch.fewshot.grey_memory_fit import DEFAULT_STRETCH
from semclip_batch.io.preprocess import FRAME_LEVELS, pack_frame, shipped_levels
from semclip_batch.io.register import register_reference, shift_image
from semclip_batch.model.data_bar import GROW, data_bar_rows, pair_bar_rows
from semclip_batch.model.grey_memory import OUTSIDE_BARS, REFERENCE_PLAIN, GreyMemory
from semclip_batch.synth.render import banner_height, draw_banner


def _imaged(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Lines on a dark field with shot noise, levels in [0, 1]."""
    frame = np.full((h, w), 0.25)
    for y in range(8, h - 8, 24):
        frame[y:y + 10] = 0.7
    return np.clip(frame + rng.normal(0, 0.03, (h, w)), 0, 1)


def _packed(frame: np.ndarray) -> torch.Tensor:
    """As ``run`` ships levels (:func:`~semclip_batch.io.preprocess.pack_frame`), read back in [0, 1]."""
    return torch.from_numpy(pack_frame(frame)).float() / FRAME_LEVELS


@pytest.mark.parametrize("h, w", [(300, 300), (768, 1024), (1024, 768)])
def test_a_drawn_banner_is_found_to_the_row_and_grown_toward_the_image(h, w):
    rng = np.random.default_rng(h)
    frame = draw_banner(_imaged(rng, h, w), "SEM HV 1.0kV MAG 100kx LOT-A0042 W07 DIE (3,-2)")
    bar = banner_height(h)
    rows = data_bar_rows(_packed(frame), grow=0)
    assert rows.nonzero().flatten().tolist() == list(range(h - bar, h))
    assert data_bar_rows(_packed(frame)).nonzero().flatten().tolist() == list(range(h - bar - GROW, h))
    top = data_bar_rows(_packed(frame[::-1].copy()), grow=0)  # a bar at the top edge
    assert top.nonzero().flatten().tolist() == list(range(bar))


def test_imaged_frames_flat_frames_and_clipped_rows_hold_no_bar():
    rng = np.random.default_rng(3)
    assert not data_bar_rows(_packed(_imaged(rng, 512, 512))).any()
    assert not data_bar_rows(torch.full((512, 512), 0.3)).any()  # flat over more than a quarter: not a bar
    clipped = _imaged(rng, 512, 512)
    clipped[-40:, :400] = 0.0  # dark rows clipped at 0 over most of their width: imaged, never bare
    assert not data_bar_rows(_packed(clipped)).any()
    bare_only = _imaged(rng, 512, 512)
    bare_only[-20:] = 0.04  # a blanked strip without text is a bar too (drawn, not imaged)
    assert data_bar_rows(_packed(bare_only), grow=0).nonzero().flatten().tolist() == list(range(492, 512))
    quarter = _imaged(rng, 300, 300)
    quarter[-75:] = 0.04  # a bar a quarter high is a bar; flat for a row more, the frame is flat, not barred
    assert data_bar_rows(_packed(quarter), grow=0).sum() == 75
    quarter[-76:] = 0.04
    assert not data_bar_rows(_packed(quarter)).any()
    assert not data_bar_rows(torch.zeros(2, 0)).any() and not data_bar_rows(torch.zeros(3, 5)).any()
    assert data_bar_rows(torch.from_numpy(pack_frame(bare_only)), grow=0).sum() == 20  # uint8 as packed


def _pair_with_banners(rng: np.random.Generator, shift: int = 2) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A frame with a particle and its reference (no particle, the same banner moved ``shift`` rows up, as a
    registration that aligns the dies moves the reference's bar), packed levels; the particle's mask."""
    clean = _imaged(rng, 320, 320)
    frame = clean.copy()
    frame[94:99, 150:155] += 0.2  # a faint particle on the dark field between two lines
    mask = np.zeros(frame.shape, bool)
    mask[94:99, 150:155] = True
    reference = np.clip(clean + rng.normal(0, 0.03, clean.shape), 0, 1)
    text = "SEM HV 1.0kV MAG 100kx LOT-B0017 W03"
    banded, bar = draw_banner(frame, text), banner_height(320)
    moved = reference.copy()
    moved[320 - bar - shift:320 - shift] = draw_banner(reference, text)[320 - bar:]  # the bar, moved up
    moved[320 - shift:] = banded[320 - shift:]  # the strip a registration brings in: the frame's own pixels
    return _packed(banded), _packed(moved), mask


def test_the_residual_outside_the_bars_is_zero_there_and_finds_the_particle_the_bar_outshone():
    levels, reference, mask = _pair_with_banners(np.random.default_rng(4))
    plain = GreyMemory.reference_residual(levels, reference)
    outside = GreyMemory.reference_residual(levels, reference, outside_bars=True)
    bar = pair_bar_rows(levels, reference)
    assert bar[-banner_height(320) - GROW:].all() and not bar[:300 - 2 * GROW - 20].any()
    assert float(plain[bar].max()) > float(plain[torch.from_numpy(mask)].max())  # the bar outshines the particle
    assert float(outside[bar].abs().max()) == 0.0 and torch.equal(outside[~bar], plain[~bar])
    assert mask[divmod(int(outside.argmax()), 320)]  # outside the bar, the residual's peak is the particle
    memory = GreyMemory()
    memory.reference_scale.fill_(0.05)
    memory.reference.fill_(REFERENCE_PLAIN)  # a checkpoint written before rule 30 keeps its residual
    assert torch.equal(memory.reference_map(levels, reference), torch.clamp(plain / 0.1, 0, 1))
    memory.reference.fill_(OUTSIDE_BARS)
    assert torch.equal(memory.reference_map(levels, reference), torch.clamp(outside / 0.1, 0, 1))


def test_the_bars_do_not_set_the_residuals_scale():
    rng = np.random.default_rng(6)
    pairs = [_pair_with_banners(rng) for _ in range(3)]
    scale = residual_fit.fit_reference_scale(pairs)
    cut = 320 - banner_height(320) - 2 - GROW  # the rows above both bars
    above = residual_fit.fit_reference_scale([(f[:cut], r[:cut], m[:cut]) for f, r, m in pairs])
    assert scale == pytest.approx(above, rel=0.05)
    with_bars = residual_fit._scale([(GreyMemory.reference_residual(f, r), m) for f, r, m in pairs])
    assert with_bars > 1.5 * scale  # read on every row, the bars' text would have divided every residual


def _die(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Irregular conductor blocks on a dark field: a die the registration can lock onto, levels in [0, 1]."""
    die = np.full((h, w), 0.2)
    for _ in range(h * w // 1200):
        y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
        dh, dw = rng.integers(4, 16, 2)
        die[y:y + dh, x:x + dw] = 0.75
    return die


@pytest.mark.parametrize("moved", [3.4, 5.5, 6.5, 9.8, 12.4])
def test_a_reference_the_registration_moves_toward_its_bar_leaves_no_bar_edge_in_the_residual(moved):
    """Through ``run``'s path: the reference (its die ``moved`` rows below the frame's, a brighter detector) registered
    onto the frame, which moves its bar ``moved`` rows up and fills the strip the shift uncovers with the frame's own
    bar; both stretched on their own percentiles and packed (the two bars end a level apart)."""
    rng = np.random.default_rng(round(10 * moved))
    h = w = 320
    die = _die(rng, h + 40, w)
    frame = np.clip(die[20:20 + h] + rng.normal(0, 0.02, (h, w)), 0, 1)
    frame[120:125, 150:155] += 0.25  # a particle the reference lacks
    shifted = shift_image(die, moved, 0.0)[20:20 + h]
    reference = np.clip(1.08 * shifted + rng.normal(0, 0.02, (h, w)), 0, 1)
    text = "SEM HV 1.0kV MAG 100kx LOT-C0099 W11"
    frame, reference = draw_banner(frame, text), draw_banner(reference, text)
    registered, shift = register_reference(frame, reference)
    assert shift.dy == pytest.approx(-moved, abs=0.3)  # up
    levels = torch.from_numpy(shipped_levels(frame, DEFAULT_STRETCH)).float() / FRAME_LEVELS
    ref = torch.from_numpy(shipped_levels(registered, DEFAULT_STRETCH)).float() / FRAME_LEVELS
    outside = GreyMemory.reference_residual(levels, ref, outside_bars=True)
    particle = float(outside[120:125, 150:155].max())
    near_bar = slice(h - banner_height(h) - 15, h)  # the rows the reference's bar may have been moved into
    assert float(outside[near_bar].max()) < 0.5 * particle
    plain = GreyMemory.reference_residual(levels, ref)
    assert float(plain[near_bar].max()) > particle  # left in, the bar's edges outshine the particle
