"""benchmarks/region_classes.py: the probe that led to rule 22 (the package's region, attributes and regression are
tested in tests/test_region_classes.py): its macro F1 as ``eval`` reads it."""

from __future__ import annotations

import pytest
from benchmark_module import load_benchmark

bench = load_benchmark("region_classes")


def test_macro_f1_over_the_named_classes():
    truth = ["a", "a", "b", "c"]
    predicted = ["a", "b", "b", "a"]
    # a: tp 1, fp 1, fn 1 -> 0.5; b: tp 1, fp 1, fn 0 -> 2/3; c: tp 0, fn 1 -> 0; d: never -> 0
    assert bench.macro_f1(truth, predicted, ["a", "b", "c", "d"]) == pytest.approx((0.5 + 2 / 3) / 4)
