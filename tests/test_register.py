"""``io.phase_shift`` and ``io.register``: shift estimate (accuracy, sign, search limit), sub-pixel shift,
intensity match (robust to defects and to different noise), weak/flat pairs, odd shapes and ranges, large frames."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from semclip_batch.io.phase_shift import MAX_SHIFT_FRACTION, MIN_PEAK, estimate_shift
from semclip_batch.io.register import Registration, register_reference, shift_image

DARK, BRIGHT = 40.0, 190.0  # background and line grey levels of the synthetic layout (8-bit range)


def routing(height: int, width: int, seed: int, region: tuple[slice, slice] | None = None) -> np.ndarray:
    """A routing-like layout: L-shaped horizontal/vertical lines of 2-8 px widths, bright on dark, slightly
    blurred. Noise-free float32. ``region``: draw only there (the rest stays background)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=np.float32)
    sub = mask if region is None else mask[region]
    h, w = sub.shape
    for _ in range(max(6, (h + w) // 40)):
        t = int(rng.integers(2, 9))
        if rng.random() < 0.5:  # horizontal run, then down
            y = int(rng.integers(0, h - t))
            x0, x1 = sorted(int(v) for v in rng.integers(0, w - t, 2))
            sub[y : y + t, x0 : x1 + t] = 1.0
            sub[y : y + int(rng.integers(10, max(11, h // 3))), x1 : x1 + t] = 1.0
        else:  # vertical run, then right
            x = int(rng.integers(0, w - t))
            y0, y1 = sorted(int(v) for v in rng.integers(0, h - t, 2))
            sub[y0 : y1 + t, x : x + t] = 1.0
            sub[y1 : y1 + t, x : x + int(rng.integers(10, max(11, w // 3)))] = 1.0
    return (DARK + (BRIGHT - DARK) * ndimage.gaussian_filter(mask, 1.2)).astype(np.float32)


def noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return (image + np.random.default_rng(seed).normal(0.0, sigma, image.shape)).astype(np.float32)


def pair(clean: np.ndarray, shift: tuple[float, float], sigma: float = 7.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(frame, reference) with independent noise and ``frame ~= ndimage.shift(reference, shift)``."""
    reference = ndimage.shift(clean, (-shift[0], -shift[1]), order=3, mode="nearest")
    return noisy(clean, sigma, 1000 + seed), noisy(reference, sigma, 2000 + seed)


def mad(a: np.ndarray, b: np.ndarray, margin: int = 8) -> float:
    """Mean absolute difference away from the border."""
    inner = (slice(margin, -margin), slice(margin, -margin))
    return float(np.abs(a[inner].astype(np.float64) - b[inner]).mean())


SHIFTS = [(2.6, -3.3), (0.0, 5.0), (-4.25, 1.5), (0.5, -0.5), (-7.8, -6.1)]


@pytest.mark.parametrize("shift", SHIFTS)
def test_estimate_recovers_known_subpixel_shift(shift):
    frame, reference = pair(routing(256, 256, seed=1), shift, seed=3)
    dy, dx, peak = estimate_shift(frame, reference)
    assert abs(dy - shift[0]) < 0.15 and abs(dx - shift[1]) < 0.15, (dy, dx)
    assert 0.2 < peak <= 1.0
    # the other way round is the opposite shift
    back = estimate_shift(reference, frame)
    assert abs(back[0] + shift[0]) < 0.15 and abs(back[1] + shift[1]) < 0.15, back


def test_accuracy_over_many_layouts_and_shifts():
    rng = np.random.default_rng(7)
    errors = []
    for seed in range(8):
        shift = (float(rng.uniform(-6, 6)), float(rng.uniform(-6, 6)))
        frame, reference = pair(routing(192, 192, seed=10 + seed), shift, seed=seed)
        dy, dx, _ = estimate_shift(frame, reference)
        errors.append(max(abs(dy - shift[0]), abs(dx - shift[1])))
    print(f"shift error over 8 layouts: max {max(errors):.3f} px, mean {np.mean(errors):.3f} px")
    assert max(errors) < 0.2
    assert float(np.mean(errors)) < 0.08


def test_sign_convention_single_blob():
    """A blob at (60, 70) in the reference and at (63, 68) in the frame: dy = +3, dx = -2, and the registered
    reference has its blob where the frame has it."""
    yy, xx = np.mgrid[:128, :128]
    blob = lambda y, x: (10 + 200 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 18.0)).astype(np.float32)  # noqa: E731
    frame, reference = blob(63, 68), blob(60, 70)
    dy, dx, _ = estimate_shift(frame, reference)
    assert dy == pytest.approx(3.0, abs=0.1) and dx == pytest.approx(-2.0, abs=0.1)
    aligned, reg = register_reference(frame, reference)
    assert np.unravel_index(int(np.argmax(aligned)), aligned.shape) == (63, 68)
    assert (reg.dy, reg.dx) == (dy, dx)
    # same convention as scipy.ndimage.shift
    assert mad(ndimage.shift(reference, (dy, dx), order=3, mode="nearest"), frame) < 0.2 * mad(reference, frame)


@pytest.mark.parametrize("shift", SHIFTS[:3])
def test_register_reference_aligns(shift):
    frame, reference = pair(routing(256, 256, seed=2), shift, sigma=3.0, seed=5)
    aligned, reg = register_reference(frame, reference)
    assert aligned.dtype == np.float32 and aligned.shape == frame.shape
    assert isinstance(reg, Registration)
    assert (reg.dy, reg.dx) == pytest.approx(shift, abs=0.15)
    before, after = mad(reference, frame), mad(aligned, frame)
    noise_only = 3.0 * np.sqrt(2) * np.sqrt(2 / np.pi)  # E|n1 - n2| for two independent N(0, 3^2)
    print(f"shift {shift}: MAD before {before:.1f}, after {after:.1f} (noise alone {noise_only:.1f})")
    assert after < 0.4 * before
    assert after < 1.15 * noise_only
    # the opposite sign would make it worse, not better
    wrong = shift_image(reference, -reg.dy, -reg.dx)
    assert mad(wrong, frame) > before


def test_gain_and_offset_match_the_frame():
    clean = routing(256, 256, seed=4)
    frame = noisy(clean, 4.0, 1)
    shifted_clean = ndimage.shift(clean, (-1.7, 2.4), order=3, mode="nearest")
    reference = noisy(0.5 * shifted_clean + 100.0, 2.0, 2)  # darker, lower contrast, its own noise
    aligned, reg = register_reference(frame, reference)
    assert (reg.dy, reg.dx) == pytest.approx((1.7, -2.4), abs=0.15)
    assert reg.gain == pytest.approx(2.0, rel=0.02)
    assert reg.offset == pytest.approx(-200.0, abs=4.0)
    # what is left is the two noises: frame 4, reference 2 * 2 after the gain
    residual = (aligned - frame)[8:-8, 8:-8]
    assert abs(float(np.median(residual))) < 0.5
    assert float(residual.std()) < 1.15 * np.hypot(4.0, 2.0 * 2.0)


def test_gain_unbiased_when_noise_levels_differ():
    """Matching each frame's percentiles separately would fold the noise into the gain; this must not."""
    clean = routing(256, 256, seed=6)
    frame = noisy(clean, 2.0, 1)
    reference = noisy(0.8 * ndimage.shift(clean, (2.2, 0.7), order=3, mode="nearest") + 30.0, 15.0, 2)
    _, reg = register_reference(frame, reference)
    assert reg.gain == pytest.approx(1.25, rel=0.05)
    assert reg.offset == pytest.approx(-30.0 * 1.25, abs=5.0)


def test_bright_defect_does_not_throw_off_the_intensity_match():
    clean = routing(256, 256, seed=8)
    frame = noisy(clean, 4.0, 1)
    yy, xx = np.mgrid[:256, :256]
    for y, x in ((80, 90), (170, 200)):  # two 5 px (radius) disks, far brighter than the lines
        frame[(yy - y) ** 2 + (xx - x) ** 2 <= 25] = 255.0
    reference = noisy(0.5 * ndimage.shift(clean, (-2.5, 3.0), order=3, mode="nearest") + 100.0, 2.0, 2)
    aligned, reg = register_reference(frame, reference)
    assert (reg.dy, reg.dx) == pytest.approx((2.5, -3.0), abs=0.2)
    assert reg.gain == pytest.approx(2.0, rel=0.05)
    assert reg.offset == pytest.approx(-200.0, abs=10.0)
    # the defects stand out against the registered reference, the rest does not
    diff = np.abs(aligned - frame)
    assert float(diff[80, 90]) > 50.0 and float(diff[170, 200]) > 50.0
    assert float(np.median(diff[8:-8, 8:-8])) < 6.0


def test_constant_frame_and_constant_reference():
    texture = noisy(routing(128, 128, seed=9), 5.0, 1)
    flat = np.full((128, 128), 77.0, dtype=np.float32)

    assert estimate_shift(flat, texture)[:2] == (0.0, 0.0)
    aligned, reg = register_reference(flat, texture)  # nothing to align to: flat frame
    assert (reg.dy, reg.dx) == (0.0, 0.0) and reg.peak == 0.0
    assert np.isfinite(aligned).all() and np.isfinite(reg.gain) and reg.gain > 0
    assert float(np.abs(aligned - 77.0).max()) < 1.0

    aligned, reg = register_reference(texture, flat)  # flat reference: gain 1, offset = difference of medians
    assert (reg.dy, reg.dx, reg.gain) == (0.0, 0.0, 1.0)
    assert reg.offset == pytest.approx(float(np.median(texture)) - 77.0, abs=1.0)
    assert aligned.dtype == np.float32 and np.isfinite(aligned).all()

    aligned, reg = register_reference(flat, np.full_like(flat, 3.0))
    assert (reg.dy, reg.dx, reg.gain, reg.offset) == (0.0, 0.0, 1.0, 74.0)
    assert np.array_equal(aligned, flat)


def test_unrelated_noise_pair_is_not_moved():
    rng = np.random.default_rng(11)
    for size in (32, 64, 256):
        frame = rng.normal(100, 10, (size, size)).astype(np.float32)
        reference = rng.normal(50, 30, (size, size)).astype(np.float32)
        dy, dx, peak = estimate_shift(frame, reference)
        assert (dy, dx) == (0.0, 0.0), (size, peak)
        aligned, reg = register_reference(frame, reference)
        assert (reg.dy, reg.dx) == (0.0, 0.0) and np.isfinite(aligned).all()
        assert 0.0 <= reg.peak < (MIN_PEAK if size >= 256 else 0.5)
        # no alignment: the distributions are matched (median and 5-95 % spread)
        assert float(np.median(aligned)) == pytest.approx(100.0, abs=1.0)
        assert reg.gain == pytest.approx(1 / 3, rel=0.1)


def test_shape_mismatch_and_bad_dimensions_raise():
    a = np.zeros((100, 100), dtype=np.float32)
    with pytest.raises(ValueError, match=r"reference 100x120 does not match frame 100x100"):
        register_reference(a, np.zeros((100, 120), dtype=np.float32))
    with pytest.raises(ValueError, match=r"reference 90x100 does not match frame 100x100"):
        estimate_shift(a, np.zeros((90, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        estimate_shift(np.zeros((3, 100, 100)), np.zeros((3, 100, 100)))


def test_search_is_limited_to_max_shift():
    frame, reference = pair(routing(256, 256, seed=12), (10.0, -9.0), seed=1)
    assert estimate_shift(frame, reference)[:2] == pytest.approx((10.0, -9.0), abs=0.15)
    dy, dx, _ = estimate_shift(frame, reference, max_shift=4)
    assert abs(dy) <= 4.5 and abs(dx) <= 4.5
    # beyond the default limit (MAX_SHIFT_FRACTION of the shorter side) a shift is not found
    far = MAX_SHIFT_FRACTION * 128 + 6
    frame, reference = pair(routing(128, 128, seed=13), (far, 0.0), seed=2)
    assert abs(estimate_shift(frame, reference)[0] - far) > 2


def test_non_square_frame():
    shift = (-3.4, 4.7)
    frame, reference = pair(routing(512, 768, seed=14), shift, seed=3)
    aligned, reg = register_reference(frame, reference)
    assert aligned.shape == (512, 768)
    assert (reg.dy, reg.dx) == pytest.approx(shift, abs=0.15)
    assert mad(aligned, frame) < 0.4 * mad(reference, frame)
    # and transposed
    dy, dx, _ = estimate_shift(frame.T.copy(), reference.T.copy())
    assert (dy, dx) == pytest.approx(shift[::-1], abs=0.15)


def test_sixteen_bit_and_unit_ranges():
    clean = routing(256, 256, seed=15)
    unit = (clean - DARK) / (BRIGHT - DARK)  # [0, 1]
    shift = (1.3, -2.2)
    for scale, base in ((60000.0, 2000.0), (1.0, 0.0), (1e-3, 0.5)):
        image = (base + scale * unit).astype(np.float32)
        sigma = 0.04 * scale
        frame, reference = pair(image, shift, sigma=sigma, seed=4)
        reference = (0.7 * reference + 0.1 * base).astype(np.float32)
        aligned, reg = register_reference(frame, reference)
        assert (reg.dy, reg.dx) == pytest.approx(shift, abs=0.15), scale
        assert reg.gain == pytest.approx(1 / 0.7, rel=0.03), scale
        assert np.isfinite(aligned).all() and aligned.dtype == np.float32
        assert mad(aligned, frame) < 1.2 * sigma * np.sqrt(2) * np.sqrt(2 / np.pi)  # ~ the two noises alone


def test_shift_image_matches_scipy_cubic_and_integer_shifts():
    rng = np.random.default_rng(16)
    image = ndimage.gaussian_filter(rng.normal(size=(96, 80)), 2.0).astype(np.float32)
    for dy, dx in ((2.6, -3.3), (-0.25, 0.75), (4.0, -1.0)):
        ours = shift_image(image, dy, dx)
        theirs = ndimage.shift(image, (dy, dx), order=3, mode="nearest")
        assert ours.dtype == np.float32 and ours.shape == image.shape
        assert float(np.abs(ours - theirs)[8:-8, 8:-8].max()) < 0.02 * float(np.abs(image).max())
    moved = shift_image(image, 3.0, -2.0)
    assert np.array_equal(moved[3:, :-2], image[:-3, 2:])
    assert np.array_equal(moved[:3, :-2], np.repeat(image[:1, 2:], 3, axis=0))  # nearest border
    assert np.array_equal(shift_image(image, 0.0, 0.0), image)


def test_large_frame_coarse_then_refine():
    """2048 x 2048 goes through the block-mean estimate and a full-resolution refinement; the layout fills one
    quadrant only, so the refinement must pick a textured crop."""
    shift = (-4.6, 3.35)
    clean = routing(2048, 2048, seed=17, region=(slice(1024, 2048), slice(0, 1024)))
    frame, reference = pair(clean, shift, seed=6)
    estimate_shift(frame, reference)  # warm up
    start = time.perf_counter()
    dy, dx, peak = estimate_shift(frame, reference)
    took_estimate = time.perf_counter() - start
    start = time.perf_counter()
    aligned, reg = register_reference(frame, reference)
    took_register = time.perf_counter() - start
    print(f"2048x2048: error ({dy - shift[0]:+.3f}, {dx - shift[1]:+.3f}) px, peak {peak:.2f}, "
          f"estimate {took_estimate:.3f} s, register {took_register:.3f} s")
    assert (dy, dx) == pytest.approx(shift, abs=0.25)
    assert aligned.shape == (2048, 2048) and aligned.dtype == np.float32
    assert (reg.dy, reg.dx) == (dy, dx)
    quadrant = (slice(1032, 2040), slice(8, 1016))
    assert mad(aligned[quadrant], frame[quadrant]) < 0.4 * mad(reference[quadrant], frame[quadrant])


def test_strips_the_shift_brings_in_are_the_frames_own_pixels():
    """Where the reference has nothing (the strip a shift brings in from outside, and the cubic kernel's 2 px),
    the registered reference is the frame itself: no made-up border differs from it."""
    frame, reference = pair(routing(256, 256, seed=4), (3.4, -5.2), sigma=3.0, seed=9)
    aligned, reg = register_reference(frame, reference)
    assert (reg.dy, reg.dx) == pytest.approx((3.4, -5.2), abs=0.15)
    np.testing.assert_array_equal(aligned[:6], frame[:6])  # dy > 0: rows 0..ceil(3.4) + 2 came from outside
    np.testing.assert_array_equal(aligned[:, -8:], frame[:, -8:])  # dx < 0: the last ceil(5.2) + 2 columns
    inner = aligned[8:-8, 8:-8] - frame[8:-8, 8:-8]
    assert np.abs(inner).mean() > 1.0  # elsewhere the reference's own (independent) noise: not the frame copied
    _, reg0 = register_reference(frame, frame.copy())
    assert (reg0.dy, reg0.dx) == pytest.approx((0.0, 0.0), abs=0.05)


def test_a_frame_registered_onto_itself_is_itself_to_the_edge():
    """A shift a hair below 0 (-1e-7 px) must not move the last row or column by a whole pixel."""
    frame = noisy(routing(40, 40, seed=6), 3.0, seed=1)
    aligned, reg = register_reference(frame, frame.copy())
    assert (reg.dy, reg.dx) == (0.0, 0.0) or max(abs(reg.dy), abs(reg.dx)) > 1e-6
    assert np.abs(aligned - frame).max() < 0.05 * (frame.max() - frame.min())
