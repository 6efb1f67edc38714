"""The prediction row's numbers (README "Architecture": Scores, maps, thresholds)."""

from __future__ import annotations

import numpy as np
import torch

from semclip_batch.config import Thresholds
from semclip_batch.methods.decisions import (
    anomaly_score,
    decide,
    defect_regions,
    pixel_level,
    to_mask,
    to_mask_tensor,
)

CLASSES = ("normal", "bridge", "particle")


def test_mask_rounding():
    assert to_mask(np.array([[0.0, 0.5, 1.0, 0.002]])).tolist() == [[0, 128, 255, 1]]


def test_mask_on_the_device_gives_the_same_bytes():
    """The model actor quantises where the map is; halves (k + 0.5) / 255 included, values outside [0, 1] too."""
    gen = np.random.default_rng(0)
    amap = np.concatenate([gen.random(5000), (np.arange(255) + 0.5) / 255, [-0.2, 1.3]]).astype(np.float32)
    assert np.array_equal(to_mask_tensor(torch.from_numpy(amap)).numpy(), to_mask(amap))


def test_pixel_level_is_ceil():
    assert pixel_level(0.9) == 230
    assert pixel_level(0.2) == 51
    assert pixel_level(0.0) == 0


def test_regions_eight_connected_and_min_size():
    mask = np.zeros((10, 10), np.uint8)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = 255  # diagonal: one 8-connected region of 3
    mask[7:9, 7:9] = 240  # a 4-pixel region
    mask[5, 9] = 100  # below the pixel threshold
    r = defect_regions(mask, 0.9, 3)
    assert (r.n_regions, r.area_px) == (2, 7)
    assert np.isclose(r.area_frac, 0.07)
    r4 = defect_regions(mask, 0.9, 4)
    assert (r4.n_regions, r4.area_px) == (1, 4)


def test_anomaly_score_modes():
    assert np.isclose(anomaly_score(0.14, 0.5), 0.5 * 0.86 + 0.25)
    assert anomaly_score(0.14, 0.5, "max") == 0.5


def test_decide_picks_best_non_normal_class():
    th = Thresholds(image=0.6)
    assert decide(0.7, np.array([0.9, 0.02, 0.08]), CLASSES, th) == (True, "particle")
    assert decide(0.5, np.array([0.1, 0.8, 0.1]), CLASSES, th) == (False, None)


def test_default_thresholds_do_not_flag_uniform_zero_shot():
    uniform = 1 - 1 / 7
    assert anomaly_score(1 / 7, uniform) < Thresholds().image
    assert to_mask(np.array([[uniform]]))[0, 0] < pixel_level(Thresholds().pixel)
