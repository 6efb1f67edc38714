"""The prediction row's numbers (README "Architecture": Scores, maps, thresholds)."""

from __future__ import annotations

import numpy as np
import torch

from semclip_batch.config import Thresholds
from semclip_batch.methods.decisions import (
    DECISION_TEMPERATURE,
    anomaly_score,
    decide,
    defect_regions,
    pixel_level,
    to_mask,
    to_mask_tensor,
    weighed_class_scores,
    weighs_class_scores,
)

CLASSES = ("normal", "bridge", "particle")


def test_mask_rounding():
    assert to_mask(np.array([[0.0, 0.5, 1.0, 0.002]])).tolist() == [[0, 128, 255, 1]]


def test_mask_on_the_device_gives_the_same_bytes():
    """The model actor quantises where the map is; halves (k + 0.5) / 255 included, values outside [0, 1] too."""
    gen = np.random.default_rng(0)
    amap = np.concatenate([gen.random(5000), (np.arange(255) + 0.5) / 255, [-0.2, 1.3]]).astype(np.float32)
    assert np.array_equal(to_mask_tensor(torch.from_numpy(amap)).numpy(), to_mask(amap))


def test_a_nan_level_is_stored_as_0_without_a_warning(recwarn):
    amap = np.array([np.nan, 0.5, np.inf, -np.inf], dtype=np.float32)
    assert to_mask(amap).tolist() == [0, 128, 255, 0]
    assert to_mask_tensor(torch.from_numpy(amap)).tolist() == [0, 128, 255, 0]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


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


def test_weighed_class_scores_follow_the_classifier_moved_by_the_image_decision():
    """Rule 29: normal's log odds against the best defect class are the model's plus (threshold - score) / T; the
    defect classes keep their shares; the scores sum to 1; defect_class (the best defect class) is unchanged."""
    rng = np.random.default_rng(29)
    tau = 0.6
    for _ in range(2000):
        p = rng.dirichlet(np.full(5, 0.5)).astype(np.float32)
        s = float(rng.uniform(0.3, 0.9))
        w = weighed_class_scores(p, s, tau)
        assert w.dtype == np.float32 and w.shape == p.shape
        assert np.isclose(w.sum(), 1.0, atol=1e-5) and (w >= 0).all()
        log_odds = np.log(max(p[0], 1e-12) / max(p[1:].max(), 1e-12)) + (tau - s) / DECISION_TEMPERATURE
        if abs(log_odds) > 1e-3:  # away from a tie the arg-max is normal exactly where the log odds are positive
            assert (int(np.argmax(w)) == 0) == (log_odds > 0)
        assert int(np.argmax(w[1:])) == int(np.argmax(p[1:]))
        assert np.allclose(w[1:] / w[1:].sum(), p[1:] / p[1:].sum(), atol=1e-4)


def test_weighed_class_scores_at_the_edges():
    # the image decision at the threshold leaves the classifier's own say
    w = weighed_class_scores(np.array([0.3, 0.6, 0.1]), 0.5, 0.5)
    assert int(np.argmax(w)) == 1
    # a score far above the threshold overrules a confident normal, far below overrules a confident defect
    assert int(np.argmax(weighed_class_scores(np.array([0.95, 0.04, 0.01]), 0.9, 0.5))) == 1
    assert int(np.argmax(weighed_class_scores(np.array([0.01, 0.95, 0.04]), 0.1, 0.5))) == 0
    # nothing overflows at extreme odds; zero defect scores share uniformly
    assert np.isfinite(weighed_class_scores(np.array([1.0, 0.0, 0.0]), 0.0, 1.0)).all()
    w = weighed_class_scores(np.array([0.0, 0.0, 0.0]), 1.0, 0.0)
    assert np.isclose(w[1], w[2]) and np.isclose(w.sum(), 1.0)
    # normal alone has nothing to weigh against; a row without a finite score keeps the model's scores
    assert np.array_equal(weighed_class_scores(np.array([1.0]), 0.9, 0.5), np.array([1.0], np.float32))
    assert np.array_equal(weighed_class_scores(np.array([0.5, 0.3, 0.2]), float("nan"), 0.5),
                          np.array([0.5, 0.3, 0.2], np.float32))
    # an infinite score stays a finite distribution
    w = weighed_class_scores(np.array([0.5, np.inf, 0.1]), 0.6, 0.5)
    assert np.isfinite(w).all() and np.isclose(w.sum(), 1.0) and int(np.argmax(w)) == 1


def test_only_a_calibrated_or_given_image_threshold_weighs():
    assert not weighs_class_scores(Thresholds())
    given = {"image": "flag", "pixel": "default", "min_region_px": "default"}
    assert weighs_class_scores(Thresholds(image=0.7, source=given))
    calibrated = {"image": "checkpoint", "pixel": "checkpoint", "min_region_px": "checkpoint"}
    assert weighs_class_scores(Thresholds(image=0.7, source=calibrated))
