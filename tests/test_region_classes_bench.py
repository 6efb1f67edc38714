"""benchmarks/region_classes.py: the probe that led to rule 22 (the package's region, attributes and regression are
tested in tests/test_region_classes.py; its macro F1 is ``eval``'s own ``classification_report``): it refuses a run
whose checkpoint already blends the region's classes, which it would blend twice."""

from __future__ import annotations

import json
import sys

import pytest
from benchmark_module import load_benchmark

bench = load_benchmark("region_classes")


def test_a_run_of_a_checkpoint_with_the_regression_is_refused(tmp_path, monkeypatch):
    outs = []
    for name, holds in (("support-out", False), ("test-out", True)):
        folder = tmp_path / name / "runs" / "r1"
        folder.mkdir(parents=True)
        record = {"run_id": "r1", "attempt": 1, "started_at": "2026-12-06T00:00:00+00:00", "classes": ["normal", "a"],
                  "config": {"model": {"region_classes": holds}}}
        (folder / "attempt-1.json").write_text(json.dumps(record))
        outs.append(str(tmp_path / name))
    monkeypatch.setattr(sys, "argv", ["region_classes.py", "s.csv", "t.csv", "--support-out", outs[0],
                                      "--test-out", outs[1]])
    with pytest.raises(SystemExit, match=r"test-out: its checkpoint already blends the region's classes"):
        bench.main()
