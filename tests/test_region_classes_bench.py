"""benchmarks/region_classes.py: the defect region at the map's maximum, its attributes, the logistic regression
fitted on them and the macro F1 it reports (rule 22's probe in docs/quality.md)."""

from __future__ import annotations

import numpy as np
import pytest
from benchmark_module import load_benchmark

bench = load_benchmark("region_classes")


def test_the_region_is_the_component_holding_the_maximum():
    amap = np.zeros((40, 40), np.uint8)
    amap[5:9, 5:9] = 200  # above the share, but apart from the maximum
    amap[20:30, 20:23] = 220
    amap[25, 21] = 250
    region = bench.region_at_max(amap, 0.8)
    assert region[25, 21] and region[20:30, 20:23].all()
    assert not region[5:9, 5:9].any()
    assert region.sum() == 30


def test_a_flat_map_gives_one_pixel():
    region = bench.region_at_max(np.zeros((8, 8), np.uint8), 0.8)
    assert region.sum() == 1 and region[0, 0]


def _frame_with(shape: str, level: float) -> tuple[np.ndarray, np.ndarray]:
    levels = np.full((64, 64), 0.5)
    region = np.zeros((64, 64), bool)
    if shape == "line":
        region[30:32, 8:56] = True
    else:
        yy, xx = np.mgrid[:64, :64]
        region = (yy - 32) ** 2 + (xx - 32) ** 2 <= 16
    levels[region] = level
    return levels, region


def test_attributes_tell_shape_and_contrast_apart():
    line = bench.attributes(*_frame_with("line", 0.9))
    bright = bench.attributes(*_frame_with("disc", 0.9))
    dark = bench.attributes(*_frame_with("disc", 0.1))
    assert line.shape == (bench.N_ATTRIBUTES,)
    assert line[1] > bright[1] + 3  # log elongation: a 2 x 48 line against a disc
    assert bright[2] == pytest.approx(0.4) and dark[2] == pytest.approx(-0.4)  # mean contrast to the ring
    assert bright[0] == pytest.approx(np.log(49))  # log area of the radius-4 disc
    assert np.isfinite(line).all()


def test_the_logistic_regression_classifies_points_it_did_not_see():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 3.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    labels = rng.integers(0, 3, 300)
    x = centres[labels] + rng.normal(0, 0.5, (300, 3))
    model = bench.fit_logistic(x[:200], labels[:200], 3)
    probs = model.probs(x[200:])
    assert probs.shape == (100, 3) and np.allclose(probs.sum(axis=1), 1.0)
    assert np.mean(probs.argmax(axis=1) == labels[200:]) > 0.95


def test_macro_f1_over_the_named_classes():
    truth = ["a", "a", "b", "c"]
    predicted = ["a", "b", "b", "a"]
    # a: tp 1, fp 1, fn 1 -> 0.5; b: tp 1, fp 1, fn 0 -> 2/3; c: tp 0, fn 1 -> 0; d: never -> 0
    assert bench.macro_f1(truth, predicted, ["a", "b", "c", "d"]) == pytest.approx((0.5 + 2 / 3) / 4)
